"""fastrope.merge_partials: attention over key shards merged by lse equals attention over all keys,
forward and backward (the global-statistics route and the through-the-merge route)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, make_bias, make_qkv, make_w

import fastrope
from fastrope._merge import grad_with_lse_cotangent

TOL = 1e-12  # float64 throughout; observed ~1e-15


def _shards(n_k: int, cuts):
    edges = [0, *cuts, n_k]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


CASES = [
    # kind, causal, window, q_offset, k_offset, cuts
    ("rotary", True, None, 0, 0, (4, 9)),
    ("rotary_half", False, None, 3, 1, (5,)),
    ("block", True, (4, 0), 6, 0, (2, 3, 11)),
    ("sparse", False, (3, 2), 2, 0, (7,)),
    ("dense", True, None, 5, 0, (6,)),
]


@pytest.mark.parametrize("kind,causal,window,q_off,k_off,cuts", CASES)
def test_merge_equals_full_attention(rng, kind, causal, window, q_off, k_off, cuts):
    n_q, n_k, d = 7, 13, 4
    q, k, v = make_qkv(rng, (2, 4), n_q, n_k, d, 3, group=2)
    L = 20
    w = make_w(kind, rng, L, d, lead=(4,) if kind in ("block", "sparse") else ())
    bias = make_bias(rng, L, lead=(4,))
    kw = dict(causal=causal, window=window, bias=bias, q_offset=q_off)
    full, full_lse = fastrope.attention(q, k, v, w, k_offset=k_off, return_lse=True, **kw)
    parts = [
        fastrope.attention(
            q, k[..., a:b, :], v[..., a:b, :], w, k_offset=k_off + a, return_lse=True, **kw
        )
        for a, b in _shards(n_k, cuts)
    ]
    out, lse = fastrope.merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert_close(out, full, TOL, "out")
    assert_close(lse, full_lse, TOL, "lse")


def test_fully_masked_rows_stay_zero_and_neg_inf(rng):
    """Causal shards after the queries contribute nothing; rows that see no key anywhere (here:
    queries before every key) give out 0 and lse -inf, never NaN."""
    q, k, v = make_qkv(rng, (2,), 5, 8, 4, 3)
    w = fastrope.Rotary()
    kw = dict(causal=True, q_offset=2, return_lse=True)
    parts = [
        fastrope.attention(q, k[:, a : a + 4], v[:, a : a + 4], w, k_offset=4 + a, **kw)
        for a in (0, 4)
    ]
    assert np.isneginf(parts[1][1]).all()  # the second shard is entirely in the future
    out, lse = fastrope.merge_partials(*zip(*parts))
    full, full_lse = fastrope.attention(q, k, v, w, k_offset=4, **kw)
    assert not np.isnan(out).any()
    assert np.isneginf(lse[:, :2]).all() and (out[:, :2] == 0).all()
    assert_close(out, full, TOL, "out")
    assert_close(lse, full_lse, TOL, "lse")


def test_stacked_input_and_errors():
    outs = np.zeros((2, 3, 4))
    lses = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, 1.0]])
    out, lse = fastrope.merge_partials(outs, lses)
    np.testing.assert_allclose(lse, [0.0, -np.inf, 1.0 + np.log(2.0)])
    with pytest.raises(ValueError, match="lses"):
        fastrope.merge_partials(outs, lses[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        fastrope.merge_partials(outs, np.full((2, 3), np.nan))
    with pytest.raises(TypeError, match="float"):
        fastrope.merge_partials(outs.astype(int), lses)


@pytest.mark.parametrize("kind", ["rotary", "block"])
def test_sharded_backward_with_global_statistics(rng, kind):
    """Each shard's attention_grad with the GLOBAL out/lse gives that shard's exact dk, dv and an
    additive share of dq, dw, dbias (docs/DESIGN.md §11: P and D are global row statistics)."""
    n_q, n_k, d = 6, 11, 4
    q, k, v = make_qkv(rng, (1, 2), n_q, n_k, d, 3)
    L = 16
    w = make_w(kind, rng, L, d)
    bias = make_bias(rng, L)
    dout = rng.standard_normal((1, 2, n_q, 3))
    kw = dict(causal=True, bias=bias, q_offset=n_k - n_q)
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    ref = fastrope.attention_grad(q, k, v, w, dout, **kw)
    dq = np.zeros_like(q)
    dw = None if ref.dw is None else np.zeros_like(ref.dw)
    dbias = np.zeros_like(bias)
    dk, dv = [], []
    for a, b in _shards(n_k, (3, 8)):
        g = fastrope.attention_grad(
            q, k[..., a:b, :], v[..., a:b, :], w, dout, out=out, lse=lse, k_offset=a, **kw
        )
        dq += g.dq
        dbias += g.dbias
        if dw is not None:
            dw += g.dw
        dk.append(g.dk)
        dv.append(g.dv)
    assert_close(dq, ref.dq, TOL, "dq")
    assert_close(np.concatenate(dk, -2), ref.dk, TOL, "dk")
    assert_close(np.concatenate(dv, -2), ref.dv, TOL, "dv")
    assert_close(dbias, ref.dbias, TOL, "dbias")
    if dw is not None:
        assert_close(dw, ref.dw, TOL, "dw")


def test_lse_cotangent_matches_finite_differences(rng):
    """grad_with_lse_cotangent (the route through the merge) against central differences of
    sum(out * dout) + sum(lse * dlse)."""
    q, k, v = make_qkv(rng, (2,), 4, 5, 4, 2)
    w = make_w("block", rng, 8, 4)
    kw = dict(causal=True, q_offset=1)
    dout = rng.standard_normal((2, 4, 2))
    dlse = rng.standard_normal((2, 4))
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    g = grad_with_lse_cotangent(q, k, v, w, dout, dlse, out=out, lse=lse, **kw)

    def f(q_, k_, v_, blocks_):
        o, s = fastrope.attention(q_, k_, v_, fastrope.BlockW(blocks_), return_lse=True, **kw)
        return float(np.sum(o * dout) + np.sum(s * dlse))

    args = [q, k, v, w.blocks]
    h = 1e-6
    for i, (name, got) in enumerate(zip(("dq", "dk", "dv", "dw"), (g.dq, g.dk, g.dv, g.dw))):
        num = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[i][idx] += h
            minus[i][idx] -= h
            num[idx] = (f(*plus) - f(*minus)) / (2 * h)
        assert_close(got, num, 1e-7, name)


def test_merge_torch_is_differentiable(rng):
    """Autograd through merge_partials on fastrope.torch shards equals the unsharded gradient."""
    torch = pytest.importorskip("torch")
    import fastrope.torch as ft

    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, (2,), 6, 9, 4, 3))
    blocks = torch.from_numpy(make_w("block", rng, 16, 4).blocks).requires_grad_()
    w = fastrope.BlockW(blocks)
    kw = dict(causal=True, q_offset=3, return_lse=True)
    full, full_lse = ft.attention(q, k, v, w, **kw)
    parts = [
        ft.attention(q, k[:, a:b], v[:, a:b], w, k_offset=a, **kw) for a, b in _shards(9, (4,))
    ]
    out, lse = fastrope.merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert isinstance(out, torch.Tensor)
    co, cl = torch.randn_like(out), torch.randn_like(lse)
    ref = torch.autograd.grad((full * co).sum() + (full_lse * cl).sum(), (q, k, v, blocks))
    got = torch.autograd.grad((out * co).sum() + (lse * cl).sum(), (q, k, v, blocks))
    assert_close(out.detach().numpy(), full.detach().numpy(), TOL, "out")
    for name, a, b in zip(("dq", "dk", "dv", "dblocks"), got, ref):
        assert_close(a.numpy(), b.numpy(), 1e-11, name)


def test_merge_partials_argument_errors():
    import fastrope

    with pytest.raises(ValueError, match="outs: expected at least one shard"):
        fastrope.merge_partials([], [])
    o = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="one lse per partial output"):
        fastrope.merge_partials([o, o], [np.zeros((2, 3))])
