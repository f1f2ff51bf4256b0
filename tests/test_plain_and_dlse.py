"""``w=None`` (plain scaled dot-product attention, ``W_δ = I``) and ``attention_grad(dlse=...)``
(a cotangent for ``lse``), against the NumPy oracle, finite differences and SDPA-style formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_grad_close,
    check_forward,
    check_grad,
    make_bias,
    make_qkv,
    make_w,
    needed_L,
)

import fastrope


def _plain(q, k, v, scale=None, causal=False, bias_fn=None):
    """softmax(q kᵀ scale [+ bias]) v in float64, the textbook formula."""
    d = q.shape[-1]
    s = (q @ np.swapaxes(k, -1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    i, j = np.arange(q.shape[-2])[:, None], np.arange(k.shape[-2])[None, :]
    if bias_fn is not None:
        s = s + bias_fn(i - j)
    if causal:
        s = np.where(i >= j, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("d", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_w_none_is_plain_attention(rng, d, dtype):
    q, k, v = make_qkv(rng, (2, 4), 9, 11, d, 5, dtype=dtype, group=2)
    out = fastrope.attention(q, k, v, None, causal=True)
    kk = np.repeat(k.astype(np.float64), 2, axis=-3)
    vv = np.repeat(v.astype(np.float64), 2, axis=-3)
    ref = _plain(q.astype(np.float64), kk, vv, causal=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, 1e-12 if dtype == np.float64 else 2e-6, "out")
    check_forward(q, k, v, None, kind="dense", causal=True)


@pytest.mark.parametrize("d", [3, 8])
def test_w_none_gradients_with_a_t5_style_bias(rng, d):
    """Positions only through a learned bias (T5-style buckets are a Toeplitz bias): dq, dk, dv
    and dbias against the oracle; dw is None."""
    n_q, n_k = 7, 12
    q, k, v = make_qkv(rng, (3,), n_q, n_k, d, 4)
    L = needed_L(n_q, n_k, q_offset=2)
    bias = make_bias(rng, L, lead=(3,))
    dout = rng.standard_normal((3, n_q, 4))
    kw = dict(bias=bias, q_offset=2, window=(6, 1))
    check_forward(q, k, v, None, kind="dense", **kw)
    g, _ = check_grad(q, k, v, None, dout, kind="dense", **kw)
    assert g.dw is None and g.dbias.shape == bias.shape


def test_w_none_equals_identity_blockw_and_rotary_with_zero_angle(rng):
    q, k, v = make_qkv(rng, (2,), 6, 6, 4, 3)
    L = needed_L(6, 6)
    eye = np.broadcast_to(np.eye(2), (2 * L - 1, 2, 2, 2)).copy()
    a = fastrope.attention(q, k, v, None, causal=True)
    b = fastrope.attention(q, k, v, fastrope.BlockW(eye), causal=True)
    assert_close(a, b, 1e-13, "BlockW(I)")
    dout = rng.standard_normal(a.shape)
    ga = fastrope.attention_grad(q, k, v, None, dout, causal=True)
    gb = fastrope.attention_grad(q, k, v, fastrope.BlockW(eye), dout, causal=True)
    for name, x, y in zip(("dq", "dk", "dv"), ga, gb):
        assert_close(x, y, 1e-13, name)


def test_w_none_fast_method(rng):
    """The fast method serves w=None too (a zero-frequency Rotary): certified within eps."""
    n, d = 256, 3
    q = rng.uniform(-0.5, 0.5, (n, d))
    k = rng.uniform(-0.5, 0.5, (n, d))
    v = rng.standard_normal((n, 8))
    exact = fastrope.attention(q, k, v, None, causal=True)
    fast = fastrope.attention(q, k, v, None, 1e-3, method="fast", causal=True)
    assert np.abs(fast - exact).max() <= 1e-3
    dout = rng.standard_normal(exact.shape)
    ge = fastrope.attention_grad(q, k, v, None, dout, causal=True)
    gf = fastrope.attention_grad(q, k, v, None, dout, 1e-3, method="fast", causal=True)
    for name, x, y in zip(("dq", "dk", "dv"), gf, ge):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= 1e-3, name


def test_w_none_shape_checks_still_name_the_argument(rng):
    q, k, v = make_qkv(rng, (), 4, 5, 3, 2)
    with pytest.raises(ValueError, match="k: expected shape"):
        fastrope.attention(q, k[:, :2], v, None)
    with pytest.raises(TypeError, match="or None"):
        fastrope.attention(q, k, v, "rotary")


# ---------------------------------------------------------------------------------------------
# dlse
# ---------------------------------------------------------------------------------------------

DLSE_CASES = [
    # kind, lead, group, n_q, n_k, d_v, kw
    ("rotary", (2, 4), 2, 6, 9, 3, dict(causal=True)),
    ("block", (4,), 1, 7, 7, 2, dict(window=(3, 1), q_offset=1)),
    ("sparse", (2,), 1, 5, 8, 0, dict(causal=True, q_offset=3)),
    ("dense", (), 1, 4, 6, 3, dict(bias=True)),
    ("none", (2, 2), 2, 5, 5, 4, dict(causal=True)),
]


def _w(kind, rng, L, d, lead):
    if kind == "none":
        return None
    return make_w(kind, rng, L, d, lead=lead if kind in ("block", "sparse") else ())


@pytest.mark.parametrize("kind,lead,group,n_q,n_k,dv,kw", DLSE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dlse_matches_the_oracle(rng, kind, lead, group, n_q, n_k, dv, kw, dtype):
    d = 4
    q, k, v = make_qkv(rng, lead, n_q, n_k, d, dv, dtype=dtype, group=group)
    L = needed_L(n_q, n_k, q_offset=kw.get("q_offset", 0))
    w = _w(kind, rng, L, d, lead[-1:] if lead else ())
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["bias"] = make_bias(rng, L).astype(dtype)
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(dtype)
    ref = fastrope.reference.attention_grad(q, k, v, w, dout, dlse=dlse, **kw)
    t = 1e-11 if dtype == np.float64 else 2e-5
    for given in (dict(), dict(out=out, lse=lse)):
        g = fastrope.attention_grad(q, k, v, w, dout, dlse=dlse, **given, **kw)
        for name, a, b in zip(("dq", "dk", "dv", "dw", "dbias"), g, ref):
            if a is not None:
                assert a.dtype == dtype, name
            assert_grad_close(a, b, t, name)
        assert g.dv.shape == v.shape and g.dq.shape == q.shape


def test_dlse_by_finite_differences_of_the_oracle(rng):
    """d/dq, d/dk, d/dv of sum(out * dout) + sum(lse * dlse), central differences in float64."""
    q, k, v = make_qkv(rng, (2,), 4, 5, 2, 3)
    w = fastrope.Rotary(base=50.0)
    dout = rng.standard_normal((2, 4, 3))
    dlse = rng.standard_normal((2, 4))
    kw = dict(causal=True, q_offset=1)

    def f(q, k, v):
        o, s = fastrope.reference.attention(q, k, v, w, return_lse=True, **kw)
        return float(np.sum(o * dout) + np.sum(s * dlse))

    g = fastrope.attention_grad(q, k, v, w, dout, dlse=dlse, **kw)
    h = 1e-6
    for name, x, gx in (("dq", q, g.dq), ("dk", k, g.dk), ("dv", v, g.dv)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            args = {"dq": (xp, k, v), "dk": (q, xp, v), "dv": (q, k, xp)}[name]
            argm = {"dq": (xm, k, v), "dk": (q, xm, v), "dv": (q, k, xm)}[name]
            num[idx] = (f(*args) - f(*argm)) / (2 * h)
        assert_close(gx, num, 1e-7, name)


def test_dlse_zero_is_plain_attention_grad(rng):
    q, k, v = make_qkv(rng, (3,), 6, 6, 4, 2)
    dout = rng.standard_normal((3, 6, 2))
    a = fastrope.attention_grad(q, k, v, fastrope.Rotary(), dout, causal=True)
    b = fastrope.attention_grad(
        q, k, v, fastrope.Rotary(), dout, causal=True, dlse=np.zeros((3, 6))
    )
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)


def test_dlse_and_the_fast_method(rng):
    """The fast backward takes an lse cotangent on its low-rank path (Rotary / w=None without a
    bias or masking window), certified to eps; elsewhere method='fast' refuses naming dlse and
    'auto' runs the exact backward."""
    n = 300
    q = rng.uniform(-0.5, 0.5, (2, n, 4))
    k = rng.uniform(-0.5, 0.5, (2, n, 4))
    v = rng.standard_normal((2, n, 3))
    w = fastrope.Rotary()
    dout = rng.standard_normal((2, n, 3))
    dlse = 3.0 * rng.standard_normal((2, n))
    for kw in (dict(), dict(causal=True, q_offset=-5)):
        ref = fastrope.reference.attention_grad(q, k, v, w, dout, dlse=dlse, **kw)
        for eps in (1e-3, 1e-6):
            g = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", dlse=dlse, **kw)
            for name, a, b in zip(("dq", "dk", "dv"), g, ref):
                assert np.abs(a - b).max() <= eps, (name, kw, eps)
        # the cotangent matters: without it the fast gradients are far off
        g0 = fastrope.attention_grad(q, k, v, w, dout, 1e-6, method="fast", **kw)
        assert np.abs(g0.dq - ref.dq).max() > 1e-3
    bias = fastrope.alibi(2, n)
    with pytest.raises(fastrope.ApproximationError, match="dlse"):
        fastrope.attention_grad(q, k, v, w, dout, 1e-3, method="fast", dlse=dlse, bias=bias)
    g = fastrope.attention_grad(q, k, v, w, dout, 1e-3, dlse=dlse, bias=bias)
    ref = fastrope.reference.attention_grad(q, k, v, w, dout, dlse=dlse, bias=bias)
    for name, a, b in zip(("dq", "dk", "dv"), g, ref):
        assert_close(a, b, 1e-12, name)
