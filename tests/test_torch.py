"""fastrope.torch: the custom ops (opcheck), gradients (gradcheck in float64, to q, k, v, position
tables and bias, and through lse), torch.compile, SDPA agreement for Rotary, low precision, the
device error, and the RopeAttention module with GQA and a KV cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_bias, make_qkv, make_w

torch = pytest.importorskip("torch")

import fastrope  # noqa: E402
import fastrope.torch as ft  # noqa: E402

F = torch.nn.functional


def _t(x, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.requires_grad_() if grad else t


def _w_tensor(w, grad=False):
    """The same w with its stored values as (leaf) tensors."""
    if isinstance(w, fastrope.BlockW):
        return fastrope.BlockW(_t(w.blocks, grad), layout=w.layout)
    if isinstance(w, fastrope.SparseW):
        return fastrope.SparseW(w.support, _t(w.values, grad))
    if isinstance(w, np.ndarray):
        return _t(w, grad)
    return w


def _values(w):
    if isinstance(w, fastrope.BlockW):
        return w.blocks
    if isinstance(w, fastrope.SparseW):
        return w.values
    return w if isinstance(w, torch.Tensor) else None


KINDS = ["rotary", "rotary_yarn", "block_half", "sparse", "dense"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_grad_match_numpy(rng, kind):
    q, k, v = make_qkv(rng, (2, 4), 5, 7, 4, 3, group=2)
    L = 12
    w = make_w(kind, rng, L, 4, lead=(4,) if kind == "sparse" else ())
    bias = make_bias(rng, L, lead=(4,))
    kw = dict(causal=True, q_offset=2, window=(5, None))
    ref, ref_lse = fastrope.attention(q, k, v, w, bias=bias, return_lse=True, **kw)
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    tw, tb = _w_tensor(w, True), _t(bias, True)
    out, lse = ft.attention(tq, tk, tv, tw, bias=tb, return_lse=True, **kw)
    assert out.dtype == torch.float64 and lse.shape == ref_lse.shape
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse.detach().numpy(), ref_lse, rtol=0, atol=1e-13)
    dout = rng.standard_normal(ref.shape)
    out.backward(_t(dout))
    g = fastrope.attention_grad(q, k, v, w, dout, bias=bias, **kw)
    got = [tq.grad, tk.grad, tv.grad, None if _values(tw) is None else _values(tw).grad, tb.grad]
    for name, a, b in zip(("dq", "dk", "dv", "dw", "dbias"), got, g):
        if b is None:
            assert a is None, name
        else:
            np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-12, err_msg=name)


def _fwd_args(q, k, v, w, bias=None, **kw):
    kind, spec, values, support = ft._encode_w(w)
    cfg = dict(
        eps=0.0, scale=math.nan, causal=False, window=None, q_offset=0, k_offset=0,
        method="auto", memory_limit=None, check_finite=True, num_threads=None,
        grad_error="relative",
    )  # fmt: skip
    cfg.update(kw)
    return (q, k, v, values, support, bias, kind, spec, *cfg.values())


@pytest.mark.parametrize("kind", ["rotary", "block", "sparse", "dense"])
def test_opcheck(rng, kind):
    q, k, v = make_qkv(rng, (1, 2), 4, 5, 4, 3, group=2)
    w = _w_tensor(make_w(kind, rng, 8, 4), grad=True)
    bias = _t(make_bias(rng, 8), True)
    args = _fwd_args(
        _t(q, True), _t(k, True), _t(v, True), w, bias, causal=True, window=[2, ft._UNBOUNDED]
    )
    torch.library.opcheck(ft._attention_fwd, args)
    out, lse = ft._attention_fwd(*args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd = (dout, dlse, *args[:3], out.detach(), lse.detach(), *args[3:], True)  # bias_grad
    torch.library.opcheck(ft._attention_bwd, bwd, test_utils=("test_schema", "test_faketensor"))


def test_gradcheck_float64(rng):
    """q, k, v, a BlockW tensor and a bias, through out and through lse."""
    q, k, v = make_qkv(rng, (1, 2), 4, 5, 4, 3, group=2)
    L = 6
    blocks = _t(make_w("block", rng, L, 4).blocks, True)
    bias = _t(make_bias(rng, L, lead=(2,)), True)
    inputs = (_t(q, True), _t(k, True), _t(v, True), blocks, bias)

    def f(q, k, v, b, bias):
        out, lse = ft.attention(
            q, k, v, fastrope.BlockW(b), bias=bias, causal=True, q_offset=1, return_lse=True
        )
        return out, lse

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gradcheck_sparse_and_dense(rng, kind):
    q, k, v = make_qkv(rng, (2,), 3, 4, 3, 2)
    w = _w_tensor(make_w(kind, rng, 5, 3), grad=True)
    vals = _values(w)

    def f(q, k, v, vals):
        ww = fastrope.SparseW(w.support, vals) if kind == "sparse" else vals
        return ft.attention(q, k, v, ww, window=(1, 2), q_offset=1)

    assert torch.autograd.gradcheck(f, (_t(q, True), _t(k, True), _t(v, True), vals))


@pytest.mark.parametrize("w_kind", ["rotary", "block"])
def test_torch_compile(rng, w_kind):
    """fullgraph compile (aot_eager: fake tensors + AOT autograd) equals eager, forward and
    backward; the Rotary spec is a compile-time constant."""
    q, k, v = (_t(x, True) for x in make_qkv(rng, (1, 4), 6, 6, 4, 4, group=2))
    w = fastrope.Rotary(scaling={"rope_type": "linear", "factor": 2.0})
    if w_kind == "block":
        w = _w_tensor(make_w("block", rng, 8, 4), grad=True)

    def f(q, k, v):
        return ft.attention(q, k, v, w, causal=True).square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    got = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, f(q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_module(rng):
    """A compiled RopeAttention module with a learnable BlockW table, forward and backward.
    (The default inductor backend works too, but its first C++ compile takes ~35 s here.)"""
    attn = ft.RopeAttention("block", head_dim=4, max_len=8, layout="half").double()
    q, k, v = (_t(x, True) for x in make_qkv(rng, (1, 2), 8, 8, 4, 4))
    out = torch.compile(attn, backend="aot_eager", fullgraph=True)(q, k, v)
    out.sum().backward()
    ref = attn(q, k, v)
    torch.testing.assert_close(out, ref)
    assert attn.blocks.grad is not None and attn.blocks.grad.abs().sum() > 0


def _rotate_half(x, pos, base):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * theta[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


@pytest.mark.parametrize("n_q,n_k", [(9, 9), (3, 11)])
def test_rotary_agrees_with_sdpa_on_rotated_qk(rng, n_q, n_k):
    """Rotary(layout="half") == rotate q and k like Hugging Face, then SDPA (GQA, causal,
    bottom-right aligned for a KV cache)."""
    q, k, v = (_t(x).float() for x in make_qkv(rng, (2, 4), n_q, n_k, 8, 8, group=2))
    base = 500.0
    off = n_k - n_q
    out = ft.attention(q, k, v, fastrope.Rotary(base, "half"), causal=True, q_offset=off)
    qr = _rotate_half(q, torch.arange(off, off + n_q), base)
    kr = _rotate_half(k, torch.arange(n_k), base)
    mask = torch.arange(off, off + n_q)[:, None] >= torch.arange(n_k)[None, :]
    ref = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(rng, dtype):
    q, k, v = (_t(x).to(dtype).requires_grad_() for x in make_qkv(rng, (2,), 6, 6, 4, 4))
    blocks = _t(make_w("block", rng, 8, 4).blocks).to(dtype).requires_grad_()
    out, lse = ft.attention(q, k, v, fastrope.BlockW(blocks), causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = ft.attention(
        q.float(), k.float(), v.float(), fastrope.BlockW(blocks.float()), causal=True
    )
    torch.testing.assert_close(out, ref.to(dtype))
    out.float().sum().backward()
    assert q.grad.dtype == dtype and blocks.grad.dtype == dtype


def test_errors(rng):
    q, k, v = (_t(x) for x in make_qkv(rng, (2,), 3, 3, 4, 4))
    w = fastrope.Rotary()
    with pytest.raises(ValueError, match="meta"):
        ft.attention(q.to("meta"), k.to("meta"), v.to("meta"), w)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        ft.attention(q.numpy(), k, v, w)
    with pytest.raises(TypeError, match="one dtype"):
        ft.attention(q.float(), k, v, w)
    with pytest.raises(TypeError, match="int"):
        ft.attention(q.long(), k.long(), v.long(), w)
    with pytest.raises(ValueError, match="L >= 3"):  # the core's message, unchanged
        ft.attention(q, k, v, fastrope.BlockW(torch.zeros(3, 2, 2, 2, dtype=torch.float64)))
    with pytest.raises(TypeError, match="w: expected"):
        ft.attention(q, k, v, "rope")


def test_rope_attention_module_kv_cache_and_gqa(rng):
    """Decoding one token at a time through a KVCache equals one causal call; the BlockW module
    initialised to RoPE equals the Rotary module, and its table learns."""
    q, k, v = (_t(x) for x in make_qkv(rng, (2, 4), 7, 7, 8, 5, group=2))
    rot = ft.RopeAttention(fastrope.Rotary(base=100.0))
    blk = ft.RopeAttention("block", head_dim=8, max_len=16, base=100.0).double()
    full = rot(q, k, v)
    torch.testing.assert_close(blk(q, k, v), full)
    cache = ft.KVCache()
    steps = [rot(q[..., i : i + 1, :], k[..., i : i + 1, :], v[..., i : i + 1, :], cache=cache)
             for i in range(7)]  # fmt: skip
    assert len(cache) == 7
    torch.testing.assert_close(torch.cat(steps, dim=-2), full)
    prefill = ft.KVCache()
    head = rot(q[..., :4, :], k[..., :4, :], v[..., :4, :], cache=prefill)
    tail = rot(q[..., 4:, :], k[..., 4:, :], v[..., 4:, :], cache=prefill)
    torch.testing.assert_close(torch.cat([head, tail], dim=-2), full)
    blk(q, k, v).square().sum().backward()
    assert blk.blocks.grad.shape == blk.blocks.shape and blk.blocks.grad.abs().sum() > 0
    ident = ft.RopeAttention("block", head_dim=8, max_len=16, init="identity", heads=4).double()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ident(q, k, v), plain)


@pytest.mark.parametrize(
    "w",
    [
        fastrope.Rotary(base=100.0),
        fastrope.Rotary(base=500000.0, layout="half"),
        fastrope.Rotary(
            layout="half",
            scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ],
    ids=["interleaved", "half", "yarn"],
)
def test_rotate_then_plain_attention_equals_rotary(rng, w):
    """``rotate`` applies fastrope's rotation (with YaRN's attention factor): plain attention on
    rotated q and k equals Rotary attention, forward and gradients."""
    q, k, v = (_t(x, grad=True) for x in make_qkv(rng, (2, 4), 5, 9, 8, 3, group=2))
    kw = dict(causal=True, q_offset=30, k_offset=26)
    want = ft.attention(q, k, v, w, **kw)
    got = ft.attention(ft.rotate(q, w, 30), ft.rotate(k, w, 26), v, None, **kw)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(want.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    # Without autograd, rotate and attention skip torch's op dispatch (NumPy, the core directly):
    # the same numbers.
    rq = ft.rotate(q, w, 30)
    assert rq.requires_grad
    with torch.inference_mode():
        rq_np = ft.rotate(q, w, 30)
        fast = ft.attention(rq_np, ft.rotate(k, w, 26), v, None, **kw)
    assert not rq_np.requires_grad
    torch.testing.assert_close(rq_np, rq.detach())
    torch.testing.assert_close(fast, got.detach())


def test_kv_cache_holds_rotated_keys_for_rotary_modules(rng):
    """A Rotary module's cache stores rotated keys (one rotation per key, w=None per step) and
    decodes like one causal call; a BlockW module's and a dynamic-NTK module's stay unrotated;
    a cache cannot change module kind or k_offset."""
    q, k, v = (_t(x) for x in make_qkv(rng, (1, 4), 6, 6, 8, 4, group=2))
    w = fastrope.Rotary(base=100.0)
    rot = ft.RopeAttention(w)
    full = rot(q, k, v, k_offset=3)
    cache = ft.KVCache()
    steps = [rot(q[..., i : i + 1, :], k[..., i : i + 1, :], v[..., i : i + 1, :], cache=cache,
                 k_offset=3) for i in range(6)]  # fmt: skip
    torch.testing.assert_close(torch.cat(steps, dim=-2), full)
    assert cache.rotated and cache.k_offset == 3
    torch.testing.assert_close(cache.k, ft.rotate(k, w, 3))
    with pytest.raises(ValueError, match="k_offset: the cache's keys start at position 3"):
        rot(q[..., :1, :], k[..., :1, :], v[..., :1, :], cache=cache)
    blk = ft.RopeAttention("block", head_dim=8, max_len=16, base=100.0).double()
    with pytest.raises(ValueError, match="cache: it holds rotated keys"):
        blk(q[..., :1, :], k[..., :1, :], v[..., :1, :], cache=cache, k_offset=3)
    bcache = ft.KVCache()
    blk(q[..., :2, :], k[..., :2, :], v[..., :2, :], cache=bcache)
    assert bcache.rotated is False
    torch.testing.assert_close(bcache.k, k[..., :2, :])
    dyn = ft.RopeAttention(
        fastrope.Rotary(scaling={"rope_type": "dynamic", "factor": 2.0,
                                 "original_max_position_embeddings": 4})
    )  # fmt: skip
    dcache = ft.KVCache()
    steps = [dyn(q[..., i : i + 1, :], k[..., i : i + 1, :], v[..., i : i + 1, :], cache=dcache)
             for i in range(6)]  # fmt: skip
    assert dcache.rotated is False
    # Dynamic NTK's frequencies follow the call's length: each step as a call on its own.
    for i, step in enumerate(steps):
        want = dyn(q[..., i : i + 1, :], k[..., : i + 1, :], v[..., : i + 1, :])
        torch.testing.assert_close(step, want)


def _fast_problem(rng):
    """Unit-norm q and k (scores bounded by scale = 0.5), where the fast method certifies 1e-3."""
    q, k, v = make_qkv(rng, (2, 4), 24, 24, 4, 4, group=2)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return q, k, v


def test_fast_method_through_the_adapter(rng):
    """eps and method reach the core: the fast forward equals NumPy's fast call, within eps of
    exact; the gradients meet eps too, or, when the core refuses a fast backward, the adapter
    raises the same ApproximationError and method="auto" gives exact gradients."""
    q, k, v = _fast_problem(rng)
    w = fastrope.Rotary()
    eps = 1e-3
    ref = fastrope.attention(q, k, v, w, eps, method="fast", causal=True)
    exact = fastrope.attention(q, k, v, w, causal=True)
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    out = ft.attention(tq, tk, tv, w, eps, method="fast", causal=True)
    np.testing.assert_array_equal(out.detach().numpy(), ref)
    assert np.abs(ref - exact).max() <= eps
    dout = rng.standard_normal(out.shape)
    g = fastrope.attention_grad(q, k, v, w, dout, causal=True)
    method = "fast"
    try:
        fastrope.plan(q, k, v, w, eps, method="fast", causal=True, backward=True)
    except fastrope.ApproximationError as refusal:
        method = "auto"
        with pytest.raises(fastrope.ApproximationError, match="method='fast'"):
            out.backward(_t(dout))
        assert "method='fast'" in str(refusal)
        tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
        out = ft.attention(tq, tk, tv, w, eps, method="auto", causal=True)
        assert np.abs(out.detach().numpy() - exact).max() <= eps
    out.backward(_t(dout))
    # the adapter's gradients are the NumPy API's, within eps times each gradient's certified
    # magnitude (the default relative contract)
    mine = fastrope.attention_grad(q, k, v, w, dout, eps, method=method, causal=True)
    p = fastrope.plan(q, k, v, w, eps, method=method, causal=True, backward=True, dout=dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), (tq.grad, tk.grad, tv.grad), g, mine):
        np.testing.assert_array_equal(a.numpy(), c)
        if p.method == "fast":
            assert np.abs(a.numpy() - b).max() <= eps * p.details["grad_scale"][name], name
        else:
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_error", ["relative", "absolute"])
def test_grad_error_reaches_the_fast_backward(rng, grad_error):
    q, k, v = _fast_problem(rng)
    w, eps = fastrope.Rotary(), 1e-3
    dout = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    tq = _t(q, True)
    out = ft.attention(tq, _t(k), _t(v), w, eps, method="fast", grad_error=grad_error)
    out.backward(_t(dout))
    want = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", grad_error=grad_error)
    np.testing.assert_array_equal(tq.grad.numpy(), want.dq)
    m = ft.RopeAttention(causal=False, eps=eps, grad_error=grad_error)
    assert m.grad_error == grad_error
    with pytest.raises(ValueError, match="grad_error"):
        ft.attention(tq, _t(k), _t(v), w, eps, grad_error="relatve")


def test_w_none_equals_sdpa_forward_and_backward(rng):
    """w=None is plain attention on the q, k given: SDPA's forward and gradients (GQA, causal),
    and gradcheck through out and lse with a T5-style bias (positions only through the bias)."""
    import torch.nn.functional as F

    q, k, v = make_qkv(rng, (2, 4), 9, 9, 6, 5, group=2)
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    out = ft.attention(tq, tk, tv, None, causal=True)
    rq, rk, rv = _t(q, True), _t(k, True), _t(v, True)
    ref = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    dout = _t(rng.standard_normal(out.shape))
    out.backward(dout)
    ref.backward(dout)
    for a, b in ((tq, rq), (tk, rk), (tv, rv)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)

    q, k, v = make_qkv(rng, (2,), 4, 5, 3, 2)
    bias = _t(make_bias(rng, 6, lead=(2,)), True)

    def f(q, k, v, bias):
        return ft.attention(q, k, v, None, bias=bias, q_offset=1, return_lse=True)

    assert torch.autograd.gradcheck(f, (_t(q, True), _t(k, True), _t(v, True), bias))


def test_double_backward_is_refused_with_the_op_name():
    """Gradients of gradients are not provided (README): the second backward raises, naming
    fastrope's backward op, rather than returning a silent zero."""
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    out = fastrope.torch.attention(q, q, q, fastrope.Rotary(), causal=True)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_bwd"):
        g.sum().backward()


def test_numpy_api_points_torch_users_to_the_adapter():
    t = torch.zeros(2, 4, 8)
    for x in (t, t.requires_grad_(), t.to(torch.bfloat16)):
        with pytest.raises(TypeError, match="q: got a torch.Tensor.*fastrope.torch.attention"):
            fastrope.attention(x, np.zeros((2, 4, 8)), np.zeros((2, 4, 8)), None)


@pytest.mark.parametrize("bias_grad", [False, True])
def test_fixed_alibi_bias_keeps_the_fast_backward_low_rank(rng, bias_grad):
    """A bias tensor without requires_grad (ALiBi's fixed slopes) asks for no dbias, so
    method="fast" differentiates on the low-rank route; with requires_grad, dbias is computed
    (by a route that gives it) and matches the exact gradient."""
    n, d, dv, eps = 200, 4, 3, 1e-3
    q, k = rng.uniform(-0.5, 0.5, (2, n, d)), rng.uniform(-0.5, 0.5, (2, n, d))
    v, dout = rng.uniform(-1, 1, (2, n, dv)), rng.uniform(-1, 1, (2, n, dv))
    w, bias = fastrope.Rotary(), fastrope.alibi(2, n)
    kw = dict(causal=True, window=(64, 0))
    ref = fastrope.attention_grad(q, k, v, w, dout, bias=bias, **kw)
    assert fastrope.plan(
        q, k, v, w, eps, method="fast", backward=True, bias=bias, bias_grad=bias_grad, **kw
    ).details["path"] == (  # fmt: skip
        "toeplitz" if bias_grad else "lowrank"
    )
    tq, tk, tv, tb = _t(q, True), _t(k, True), _t(v, True), _t(bias, bias_grad)
    out = ft.attention(tq, tk, tv, w, eps, method="fast", bias=tb, **kw)
    out.backward(_t(dout))
    for name, t, r in (("dq", tq, ref.dq), ("dk", tk, ref.dk), ("dv", tv, ref.dv)):
        assert np.abs(t.grad.numpy() - r).max() <= eps, name
    if bias_grad:
        assert np.abs(tb.grad.numpy() - ref.dbias).max() <= eps
    else:
        assert tb.grad is None
