"""fastrope.jax: jit, grad (against fastrope.reference gradients, float64) and vmap, validation at
trace time, gradients through lse, low precision."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, make_bias, make_qkv, make_w

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # this test module compares in float64

import jax.numpy as jnp  # noqa: E402

import fastrope  # noqa: E402
import fastrope.jax as fj  # noqa: E402

TOL = 1e-12


def _values(w):
    if isinstance(w, fastrope.BlockW):
        return w.blocks
    if isinstance(w, fastrope.SparseW):
        return w.values
    return w if isinstance(w, np.ndarray) else None


def _with(w, vals):
    if isinstance(w, fastrope.BlockW):
        return fastrope.BlockW(vals, layout=w.layout)
    if isinstance(w, fastrope.SparseW):
        return fastrope.SparseW(w.support, vals)
    return w if isinstance(w, fastrope.Rotary) else vals


@pytest.mark.parametrize("kind", ["rotary_llama3", "block", "sparse", "dense"])
def test_jit_grad_match_reference(rng, kind):
    q, k, v = make_qkv(rng, (2, 4), 5, 8, 4, 3, group=2)
    L = 12
    w = make_w(kind, rng, L, 4, lead=(4,) if kind == "block" else ())
    bias = make_bias(rng, L, lead=(4,))
    dout = rng.standard_normal((2, 4, 5, 3))
    kw = dict(causal=True, q_offset=3, window=(6, None))

    @jax.jit
    def loss(q, k, v, vals, bias):
        out = fj.attention(q, k, v, _with(w, vals), bias=bias, **kw)
        return jnp.sum(out * dout), out

    vals = _values(w)
    argnums = (0, 1, 2, 4) if vals is None else (0, 1, 2, 3, 4)
    grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, vals, bias)
    ref_out = fastrope.reference.attention(q, k, v, w, bias=bias, **kw)
    ref = fastrope.reference.attention_grad(q, k, v, w, dout, bias=bias, **kw)
    assert out.dtype == jnp.float64
    assert_close(np.asarray(out), ref_out, TOL, "out")
    names = ["dq", "dk", "dv", "dw", "dbias"]
    refs = [ref.dq, ref.dk, ref.dv, ref.dw, ref.dbias]
    if vals is None:
        del names[3], refs[3]
    for name, g, r in zip(names, grads, refs):
        assert_close(np.asarray(g), r, 1e-11 * max(1.0, np.abs(r).max()), name)


def test_vmap(rng):
    """vmap over a new batch axis, with the table mapped too, nested, and grad of a vmapped loss
    with an unmapped table (its cotangent sums over the batch)."""
    q, k, v = make_qkv(rng, (2, 4), 5, 6, 4, 3, group=2)
    L = 8
    blocks = make_w("block", rng, L, 4, lead=(4,)).blocks  # per-head tables
    qs = rng.standard_normal((3,) + q.shape)
    bs = 0.5 * rng.standard_normal((3,) + blocks.shape)
    kw = dict(causal=True, q_offset=1)

    def f(q, b):
        return fj.attention(q, k, v, fastrope.BlockW(b), **kw)

    out = jax.jit(jax.vmap(f))(qs, bs)
    for i in range(3):
        ref = fastrope.attention(qs[i], k, v, fastrope.BlockW(bs[i]), **kw)
        assert_close(np.asarray(out[i]), ref, TOL, f"out[{i}]")
    nested = jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(None, 0))(qs, bs)
    assert nested.shape == (3, 3) + q.shape[:-1] + (3,)
    assert_close(
        np.asarray(nested[2, 1]),
        fastrope.attention(qs[1], k, v, fastrope.BlockW(bs[2]), **kw),
        TOL,
        "nested",
    )

    def loss(b):
        return jnp.sum(jax.vmap(lambda q: f(q, b))(qs) ** 2)

    got = jax.grad(loss)(blocks)
    ref = 0.0
    for i in range(3):
        o = fastrope.attention(qs[i], k, v, fastrope.BlockW(blocks), **kw)
        ref = ref + fastrope.attention_grad(qs[i], k, v, fastrope.BlockW(blocks), 2 * o, **kw).dw
    assert_close(np.asarray(got), ref, 1e-11, "dw")


def test_lse_gradient(rng):
    """Gradients through the returned lse (the route merge_partials needs): check_grads compares
    them with finite differences."""
    from jax.test_util import check_grads

    q, k, v = make_qkv(rng, (2,), 4, 5, 4, 2)
    blocks = make_w("block", rng, 6, 4).blocks

    def f(q, k, v, b):
        out, lse = fj.attention(q, k, v, fastrope.BlockW(b), causal=True, q_offset=1,
                                return_lse=True)  # fmt: skip
        return jnp.sum(out**2) + jnp.sum(jnp.sin(lse))

    check_grads(f, (q, k, v, blocks), order=1, modes=("rev",))


def test_validation_at_trace_time(rng):
    q, k, v = make_qkv(rng, (2,), 5, 6, 4, 3)
    spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
    short = fastrope.BlockW(np.zeros((5, 2, 2, 2)))
    with pytest.raises(ValueError, match="L >= 6"):  # the core's message, before any data
        jax.jit(lambda q: fj.attention(q, k, v, short)).lower(spec)
    with pytest.raises(ValueError, match="v: expected shape"):
        jax.jit(lambda q: fj.attention(q, k, v[:, :3], fastrope.Rotary())).lower(spec)
    with pytest.raises(TypeError, match="q_offset"):
        jax.jit(lambda q, o: fj.attention(q, k, v, fastrope.Rotary(), q_offset=o))(q, 1)
    with pytest.raises(TypeError, match="w: expected"):
        fj.attention(q, k, v, "rope")
    with pytest.raises(ValueError, match="method"):
        fj.attention(q, k, v, fastrope.Rotary(), method="fastest")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision(rng, dtype):
    q, k, v = (jnp.asarray(x, dtype) for x in make_qkv(rng, (2,), 6, 6, 4, 4))
    out, lse = fj.attention(q, k, v, fastrope.Rotary(), causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    ref = fastrope.attention(*(np.asarray(x, np.float32) for x in (q, k, v)), fastrope.Rotary(),
                             causal=True)  # fmt: skip
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert_close(np.asarray(out, np.float32), ref, tol, "out")
    g = jax.grad(lambda q: jnp.sum(fj.attention(q, k, v, fastrope.Rotary()).astype(jnp.float32)))(q)
    assert g.dtype == dtype


def test_fast_method_through_the_adapter(rng):
    """eps and method reach the core under jit: the fast forward equals NumPy's fast call."""
    q, k, v = make_qkv(rng, (2, 4), 24, 24, 4, 4, group=2)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    w = fastrope.BlockW(make_w("block", rng, 24, 4).blocks)
    ref = fastrope.attention(q, k, v, w, 1e-3, method="fast", causal=True)
    out = jax.jit(lambda q: fj.attention(q, k, v, w, 1e-3, method="fast", causal=True))(q)
    assert_close(np.asarray(out), ref, 1e-12, "out")
    assert np.abs(ref - fastrope.attention(q, k, v, w, causal=True)).max() <= 1e-3


@pytest.mark.parametrize("grad_error", ["relative", "absolute"])
def test_grad_error_reaches_the_fast_backward(rng, grad_error):
    q, k, v = make_qkv(rng, (2, 4), 24, 24, 4, 4, group=2)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    dout = rng.standard_normal((2, 4, 24, 4))
    w, kw = fastrope.Rotary(), dict(method="fast", causal=True, grad_error=grad_error)
    g = jax.jit(jax.grad(lambda q: jnp.sum(fj.attention(q, k, v, w, 1e-3, **kw) * dout)))(q)
    want = fastrope.attention_grad(q, k, v, w, dout, 1e-3, **kw)
    assert_close(np.asarray(g), want.dq, 1e-12, "dq")
    with pytest.raises(ValueError, match="grad_error"):
        fj.attention(q, k, v, w, 1e-3, grad_error="abs")


def test_a_fixed_bias_takes_the_low_rank_backward(rng):
    """bias_grad=False: the ALiBi bias gets a zero cotangent and the fast backward its low-rank
    route (without it the route cannot serve dbias)."""
    q, k, v = make_qkv(rng, (2,), 40, 40, 4, 3)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    bias = fastrope.alibi(2, 40)
    dout = rng.standard_normal((2, 40, 3))
    w, kw = fastrope.Rotary(), dict(method="fast", causal=True)

    def f(q, b):
        return jnp.sum(fj.attention(q, k, v, w, 1e-3, bias=b, bias_grad=False, **kw) * dout)

    gq, gb = jax.jit(jax.grad(f, argnums=(0, 1)))(q, bias)
    assert not np.asarray(gb).any()
    want = fastrope.attention_grad(q, k, v, w, dout, 1e-3, bias=bias, bias_grad=False, **kw)
    assert_close(np.asarray(gq), want.dq, 1e-12, "dq")
    p = fastrope.plan(q, k, v, w, 1e-3, bias=bias, bias_grad=False, backward=True, **kw)
    assert p.details["path"] == "lowrank"


def test_w_none_with_a_bias_under_jit_and_grad(rng):
    """w=None (W_δ = I, positions only through a T5-style bias): jit + grad against the
    reference gradients, through out and lse."""
    q, k, v = make_qkv(rng, (2,), 5, 6, 3, 2)
    bias = make_bias(rng, 7, lead=(2,))
    dout = rng.standard_normal((2, 5, 2))
    dlse = rng.standard_normal((2, 5))

    def f(q, k, v, b):
        out, lse = fj.attention(q, k, v, None, bias=b, causal=True, q_offset=1, return_lse=True)
        return jnp.sum(out * dout) + jnp.sum(lse * dlse)

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    ref = fastrope.reference.attention_grad(
        q, k, v, None, dout, dlse=dlse, bias=bias, causal=True, q_offset=1
    )
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g, (ref.dq, ref.dk, ref.dv, ref.dbias)):
        assert_close(np.asarray(a), b, 1e-11, name)
