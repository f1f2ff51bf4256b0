"""Packed sequences (``cu_seqlens_q``/``cu_seqlens_k``): equal to separate calls per document,
against the NumPy reference per document, values and gradients, with GQA, per-document offsets,
masks, windows, biases and every form of ``w``; and the argument errors."""

from __future__ import annotations

import numpy as np
import pytest

import fastrope
import fastrope.reference as ref

L = 40  # tables cover |δ| < L


def _maxabs(x):
    return float(np.abs(x).max(initial=0.0))


def _w(kind, rng, d, dtype):
    if kind == "none":
        return None
    if kind == "rotary":
        return fastrope.Rotary(base=100.0)
    blocks = (rng.standard_normal((2 * L - 1, d // 2, 2, 2)) * 0.3).astype(dtype)
    return fastrope.BlockW(blocks)


def _problem(seed, dtype, lens_q, lens_k, d=8, dv=6, hq=4, hk=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, hq, sum(lens_q), d)).astype(dtype)
    k = rng.standard_normal((2, hk, sum(lens_k), d)).astype(dtype)
    v = rng.standard_normal((2, hk, sum(lens_k), dv)).astype(dtype)
    cq = np.concatenate([[0], np.cumsum(lens_q)])
    ck = np.concatenate([[0], np.cumsum(lens_k)])
    return rng, q, k, v, cq, ck


CASES = [
    # lens_q, lens_k, q_offset, k_offset, causal, window
    ([5, 7, 3], [5, 7, 3], 0, 0, True, None),
    ([1, 2, 9], [6, 2, 11], [5, 0, 2], 0, True, None),  # per-document KV-cache offsets
    ([4, 0, 6], [4, 3, 6], 0, 0, False, None),  # a document without queries
    ([3, 5], [0, 5], 0, 0, False, None),  # a document without keys: rows of 0, lse -inf
    ([8, 13], [8, 13], 0, 0, True, (3, None)),  # sliding window
    ([6, 6], [6, 6], 0, [1, -2], False, (2, 4)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "rotary", "block"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_documents_one_by_one(case, kind, dtype):
    lens_q, lens_k, qo, ko, causal, window = CASES[case]
    rng, q, k, v, cq, ck = _problem(case, dtype, lens_q, lens_k)
    w = _w(kind, rng, q.shape[-1], dtype)
    bias = (rng.standard_normal((4, 2 * L - 1)) * 0.2).astype(dtype) if case % 2 else None
    kw = dict(causal=causal, window=window, bias=bias)
    out, lse = fastrope.attention(
        q,
        k,
        v,
        w,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        q_offset=qo,
        k_offset=ko,
        return_lse=True,
        **kw,
    )
    dout = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(dtype)
    g = fastrope.attention_grad(
        q,
        k,
        v,
        w,
        dout,
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
        q_offset=qo,
        k_offset=ko,
        dlse=dlse,
        **kw,
    )
    tol = 2e-5 if dtype == np.float32 else 1e-11
    n = len(lens_q)
    qo = np.broadcast_to(qo, n)
    ko = np.broadcast_to(ko, n)
    dw = None if g.dw is None else np.zeros_like(g.dw, dtype=np.float64)
    dbias = None if g.dbias is None else np.zeros_like(g.dbias, dtype=np.float64)
    for r in range(n):
        qs, ks = slice(cq[r], cq[r + 1]), slice(ck[r], ck[r + 1])
        doc = dict(q_offset=int(qo[r]), k_offset=int(ko[r]), **kw)
        if qs.stop == qs.start:
            assert not g.dk[..., ks, :].any() and not g.dv[..., ks, :].any()
            continue
        o_r, l_r = ref.attention(
            q[..., qs, :], k[..., ks, :], v[..., ks, :], w, return_lse=True, **doc
        )
        assert _maxabs(out[..., qs, :] - o_r) <= tol
        seen = np.isfinite(l_r)
        assert np.array_equal(np.isfinite(lse[..., qs]), seen)
        assert _maxabs(np.where(seen, lse[..., qs], 0) - np.where(seen, l_r, 0)) <= tol
        g_r = ref.attention_grad(
            q[..., qs, :],
            k[..., ks, :],
            v[..., ks, :],
            w,
            dout[..., qs, :],
            dlse=np.where(seen, dlse[..., qs], 0),
            **doc,
        )
        for got, want in (
            (g.dq[..., qs, :], g_r.dq),
            (g.dk[..., ks, :], g_r.dk),
            (g.dv[..., ks, :], g_r.dv),
        ):
            assert _maxabs(got - want) <= tol * max(1.0, _maxabs(want))
        if dw is not None:
            dw += g_r.dw
        if dbias is not None:
            dbias += g_r.dbias
    if dw is not None:
        assert np.abs(g.dw - dw).max() <= tol * max(1.0, np.abs(dw).max())
    if dbias is not None:
        assert np.abs(g.dbias - dbias).max() <= tol * max(1.0, np.abs(dbias).max())


def test_documents_do_not_see_each_other():
    """Changing one document's keys leaves every other document's output bit for bit."""
    _, q, k, v, cq, _ = _problem(7, np.float64, [4, 5, 6], [4, 5, 6])
    w = fastrope.Rotary()
    out = fastrope.attention(q, k, v, w, causal=True, cu_seqlens_q=cq)
    k2, v2 = k.copy(), v.copy()
    k2[..., 4:9, :] += 1.0
    v2[..., 4:9, :] -= 2.0
    out2 = fastrope.attention(q, k2, v2, w, causal=True, cu_seqlens_q=cq)
    assert np.array_equal(out[..., :4, :], out2[..., :4, :])
    assert np.array_equal(out[..., 9:, :], out2[..., 9:, :])
    assert not np.array_equal(out[..., 4:9, :], out2[..., 4:9, :])


def test_fast_method_per_document():
    """The fast method's certificate holds per document (eps bounds every entry)."""
    rng = np.random.default_rng(3)
    lens = [700, 300]
    q = rng.uniform(-0.3, 0.3, (1, 2, sum(lens), 2))
    k = rng.uniform(-0.3, 0.3, (1, 2, sum(lens), 2))
    v = rng.uniform(-1, 1, (1, 2, sum(lens), 4))
    cq = np.array([0, 700, 1000])
    w = fastrope.Rotary()
    eps = 1e-3
    got = fastrope.attention(q, k, v, w, eps, method="fast", causal=True, cu_seqlens_q=cq)
    for a, b in ((0, 700), (700, 1000)):
        want = ref.attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], w, causal=True)
        assert np.abs(got[..., a:b, :] - want).max() <= eps


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(cu_seqlens_q=[0, 3, 9]), ValueError, "from 0 to 10"),
        (dict(cu_seqlens_q=[1, 10]), ValueError, "cu_seqlens_q: expected non-decreasing"),
        (dict(cu_seqlens_q=[0, 6, 4, 10]), ValueError, "non-decreasing"),
        (dict(cu_seqlens_q=[0.0, 10.0]), TypeError, "cu_seqlens_q: expected a 1-D int"),
        (dict(cu_seqlens_q=[[0, 10]]), TypeError, "1-D int"),
        (dict(cu_seqlens_k=[0, 10]), ValueError, "cu_seqlens_q: needed"),
        (dict(cu_seqlens_q=[0, 5, 10], cu_seqlens_k=[0, 10]), ValueError, "number of documents"),
        (dict(cu_seqlens_q=[0, 5, 10], q_offset=[1, 2, 3]), TypeError, "q_offset: with cu_seqlens"),
    ],
)
def test_errors_name_the_argument(kw, err, match):
    q = np.zeros((2, 10, 4))
    with pytest.raises(err, match=match):
        fastrope.attention(q, q, q, None, **kw)


def test_cu_seqlens_k_needed_when_lengths_differ():
    q, k = np.zeros((2, 10, 4)), np.zeros((2, 12, 4))
    with pytest.raises(ValueError, match="cu_seqlens_k: needed"):
        fastrope.attention(q, k, k, None, cu_seqlens_q=[0, 10])


def _packed_problem():
    rng, q, k, v, cq, ck = _problem(11, np.float64, [3, 6, 4], [5, 6, 4])
    dout = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    kw = dict(causal=True, q_offset=[2, 0, 0], cu_seqlens_q=cq, cu_seqlens_k=ck)
    return q, k, v, dout, kw


def test_torch_adapter_values_and_autograd():
    torch = pytest.importorskip("torch")
    import fastrope.torch as frt

    q, k, v, dout, kw = _packed_problem()
    w = fastrope.Rotary()
    want = fastrope.attention(q, k, v, w, **kw)
    g = fastrope.attention_grad(q, k, v, w, dout, **kw)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = frt.attention(tq, tk, tv, w, **dict(kw, cu_seqlens_q=torch.tensor(kw["cu_seqlens_q"])))
    assert np.abs(out.detach().numpy() - want).max() <= 1e-12
    (out * torch.tensor(dout)).sum().backward()
    for t, ref_g in ((tq, g.dq), (tk, g.dk), (tv, g.dv)):
        assert np.abs(t.grad.numpy() - ref_g).max() <= 1e-12


def test_jax_adapter_values_and_grad():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import fastrope.jax as frj

    q, k, v, dout, kw = _packed_problem()
    w = fastrope.Rotary()
    want = fastrope.attention(q, k, v, w, **kw)
    g = fastrope.attention_grad(q, k, v, w, dout, **kw)

    def loss(q, k, v):
        return jnp.sum(frj.attention(q, k, v, w, **kw) * dout)

    out = frj.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), w, **kw)
    assert np.abs(np.asarray(out) - want).max() <= 1e-12
    for got, ref_g in zip(jax.grad(loss, argnums=(0, 1, 2))(q, k, v), (g.dq, g.dk, g.dv)):
        assert np.abs(np.asarray(got) - ref_g).max() <= 1e-12
