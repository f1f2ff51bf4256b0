"""No input crashes the interpreter or returns a silent NaN: hypothesis over the Python API with
arbitrary (often invalid) arguments, each call ending in a result or a documented exception."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrope

ALLOWED = (TypeError, ValueError, MemoryError)  # ApproximationError is a ValueError

dims = st.integers(min_value=0, max_value=9)
dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.complex64, bool, object])


@st.composite
def arrays(draw, ndim_max=4):
    ndim = draw(st.integers(min_value=0, max_value=ndim_max))
    shape = tuple(draw(dims) for _ in range(ndim))
    dtype = draw(dtypes)
    data = np.asarray(np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape))
    data = np.asarray(data * draw(st.sampled_from([0.0, 0.1, 1.0, 30.0, 1e30])))
    with np.errstate(all="ignore"):
        arr = np.asarray(data.astype(dtype) if dtype is not object else data.astype(object))
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if special is not None and arr.size and arr.dtype.kind == "f":
        arr.flat[0] = special
    if draw(st.booleans()) and arr.ndim >= 2:
        arr = arr.swapaxes(-1, -2)
    return arr


def w_forms(d_hint: int):
    return st.one_of(
        st.just(fastrope.Rotary()),
        st.just(fastrope.Rotary(layout="half")),
        st.builds(
            lambda L: fastrope.BlockW(np.zeros((2 * L - 1, max(d_hint // 2, 1), 2, 2))),
            st.integers(1, 12),
        ),
        st.builds(lambda L: np.zeros((2 * L - 1, d_hint, d_hint)), st.integers(1, 12)),
        st.builds(
            lambda L, s: fastrope.SparseW(
                np.array(s, dtype=np.int64).reshape(-1, 2), np.zeros((2 * L - 1, len(s)))
            ),
            st.integers(1, 12),
            st.lists(st.tuples(st.integers(-1, 5), st.integers(-1, 5)), max_size=4),
        ),
        st.just("rotary"),
        st.just(None),
    )


@settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    q=arrays(),
    k=arrays(),
    v=arrays(),
    data=st.data(),
    eps=st.sampled_from([0.0, 1e-3, -1.0, float("nan"), 1e300]),
    method=st.sampled_from(["auto", "exact", "fast", "slow"]),
    causal=st.sampled_from([False, True, 1]),
    window=st.sampled_from([None, (2, 3), (-1, 2), (None, 0), (10**30, 1), "x"]),
    q_offset=st.sampled_from([0, 5, -7, 2**60, 1.5]),
    grad=st.booleans(),
)
def test_any_input_gives_a_result_or_a_clear_exception(
    q, k, v, data, eps, method, causal, window, q_offset, grad
):
    d = q.shape[-1] if q.ndim else 2
    w = data.draw(w_forms(max(d, 1)))
    try:
        if grad:
            dout = np.ones(q.shape[:-1] + v.shape[-1:]) if q.ndim and v.ndim else np.ones(2)
            res = fastrope.attention_grad(
                q,
                k,
                v,
                w,
                dout,
                eps,
                method=method,
                causal=causal,
                window=window,
                q_offset=q_offset,
            )
            outs = [x for x in res if x is not None]
        else:
            outs = [
                fastrope.attention(
                    q, k, v, w, eps, method=method, causal=causal, window=window, q_offset=q_offset
                )
            ]
    except ALLOWED as e:
        assert str(e), "exceptions carry a message"
        return
    for x in outs:
        assert isinstance(x, np.ndarray)
        assert not np.isnan(x).any(), "a silent NaN"


@pytest.mark.parametrize("n", [2**36, 2**40])
def test_huge_shapes_raise_memory_error_before_allocating(n):
    """Shape tuples let us ask for a working set no machine has, without allocating inputs."""
    with pytest.raises(MemoryError, match="working set"):
        fastrope.plan((8, n, 64), (8, n, 64), (8, n, 64), fastrope.Rotary(), bound_r=1.0)


@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize(
    "limit, shown", [(10, "10 bytes"), (5000, "4.9 KiB"), (3 << 20, "3.0 MiB")]
)
def test_a_small_memory_limit_is_reported_in_a_unit_that_shows_it(rng, method, limit, shown):
    """The exact method's refusal names both sizes legibly (not "0.0 MiB"), for an exact call
    that plans nothing (eps = 0) and through fastrope.plan()."""
    n = 1024 if limit > 4096 else 64
    q, k, v = (rng.standard_normal((8, n, 64)) for _ in range(3))
    shapes = re.escape(f"(shapes (1, 8, 8, {n}, {n}, 64, 64))")
    pattern = rf"more than memory_limit = {re.escape(shown)} {shapes}"
    with pytest.raises(MemoryError, match=pattern):
        fastrope.attention(q, k, v, fastrope.Rotary(), method=method, memory_limit=limit)
    with pytest.raises(MemoryError, match=pattern):
        fastrope.plan(q, k, v, fastrope.Rotary(), method=method, memory_limit=limit)
    ws = fastrope.plan(q, k, v, fastrope.Rotary()).working_set_bytes
    assert ws > limit
    with pytest.raises(MemoryError, match="working set of " + re.escape(fmt_bytes(ws))):
        fastrope.attention(q, k, v, fastrope.Rotary(), method=method, memory_limit=limit)


def fmt_bytes(b: int) -> str:
    return fastrope._fastrope.format_bytes(b)


def test_without_check_finite_nan_propagates_but_nothing_crashes():
    """check_finite=False skips the scan: documented as undefined results, never a crash."""
    q = np.ones((4, 2))
    q[1, 0] = np.nan
    out = fastrope.attention(q, q, q, fastrope.Rotary(), check_finite=False)
    assert out.shape == (4, 2)
    with pytest.raises(ValueError, match="q: expected finite"):
        fastrope.attention(q, q, q, fastrope.Rotary())


def test_a_bias_whose_exponential_underflows_is_not_taken_for_a_mask():
    """A finite bias of -800 on every visible δ: e^b underflows to 0, so the fast method would
    see the rows as fully masked; it refuses (method="fast") and auto runs the exact method,
    which matches the reference, forward and backward."""
    rng = np.random.default_rng(0)
    n = 64
    q = rng.uniform(-0.5, 0.5, (n, 4))
    v = rng.uniform(-1, 1, (n, 3))
    bias = np.full(2 * n - 1, -800.0)
    bias[n + 5 :] = 0.0  # δ <= -6 stays near 0: masked by causal anyway
    w = fastrope.Rotary()
    with pytest.raises(fastrope.ApproximationError, match="underflows"):
        fastrope.attention(q, q, v, w, 1e-3, causal=True, bias=bias, method="fast")
    ref = fastrope.reference.attention(q, q, v, w, causal=True, bias=bias)
    got = fastrope.attention(q, q, v, w, 1e-3, causal=True, bias=bias)
    assert np.all(np.isfinite(got)) and np.abs(got - ref).max() <= 1e-3
    g = fastrope.attention_grad(q, q, v, w, v, 1e-3, causal=True, bias=bias)
    gr = fastrope.reference.attention_grad(q, q, v, w, v, causal=True, bias=bias)
    assert np.abs(g.dq - gr.dq).max() <= 1e-3 and np.abs(g.dv - gr.dv).max() <= 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("w_kind", ["rotary", "block", "sparse"])
def test_dv_zero_gives_the_lse_of_the_scores_and_its_gradients(dtype, w_kind):
    """d_v = 0 (fuzz/regressions/exact/crash-13aaa9…): lse does not depend on v, so it is the
    scores' own and finite, not -inf; out is empty. The backward of sum(lse * dlse) alone
    (dout empty) matches the reference, and without dlse every gradient is zero."""
    rng = np.random.default_rng(3)
    nq, nk, d = 11, 13, 4
    q = rng.uniform(-1, 1, (2, nq, d)).astype(dtype)
    k = rng.uniform(-1, 1, (2, nk, d)).astype(dtype)
    v = np.zeros((2, nk, 0), dtype)
    L = max(nq, nk) + 2
    if w_kind == "rotary":
        w = fastrope.Rotary()
    elif w_kind == "block":
        w = fastrope.BlockW(rng.uniform(-0.5, 0.5, (2 * L - 1, d // 2, 2, 2)))
    else:
        w = fastrope.SparseW(np.array([[0, 0], [1, 3], [2, 1]]), rng.uniform(-1, 1, (2 * L - 1, 3)))
    kw = dict(causal=True, q_offset=3)
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    ref_out, ref_lse = fastrope.reference.attention(q, k, v, w, return_lse=True, **kw)
    atol = 1e-12 if dtype == np.float64 else 1e-5
    assert out.shape == (2, nq, 0) and lse.shape == (2, nq)
    assert np.all(np.isfinite(lse)), lse
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=atol)
    dout = np.zeros((2, nq, 0), dtype)
    dlse = rng.uniform(-1, 1, (2, nq)).astype(dtype)
    g = fastrope.attention_grad(q, k, v, w, dout, out=out, lse=lse, dlse=dlse, **kw)
    gr = fastrope.reference.attention_grad(q, k, v, w, dout, dlse=dlse, **kw)
    assert g.dv.shape == (2, nk, 0)
    assert np.abs(gr.dq).max() > 1e-2  # the gradients from dlse alone are not trivial
    for name in ("dq", "dk"):
        np.testing.assert_allclose(getattr(g, name), getattr(gr, name), rtol=0, atol=10 * atol)
    if gr.dw is not None:
        np.testing.assert_allclose(g.dw, gr.dw, rtol=0, atol=10 * atol)
    g0 = fastrope.attention_grad(q, k, v, w, dout, **kw)
    assert not np.any(g0.dq) and not np.any(g0.dk)


OVERFLOW = (
    r"not finite: the scores or an intermediate of them .* overflow float(32|64) "
    r".* every input is finite; rescale q, k, v or scale"
)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("n_q", [3, 1])  # GEMM path, decode path
def test_scores_that_overflow_an_intermediate_raise_a_clear_value_error(dtype, sign, n_q):
    """``scale q`` overflows (1e300 * 1e10) while ``scale (q k)`` = 1e10 does not: the row came
    back as ``lse = -inf`` / NaN, silently (fuzz regressions crash-833680..., a6874d...)."""
    big, tiny = (1e300, 1e-300) if dtype == np.float64 else (1e30, 1e-30)
    q = np.zeros((n_q, 2), dtype)
    q[:, 0] = sign * big
    k = np.full((2, 2), tiny, dtype)
    v = np.ones((2, 2), dtype)
    with pytest.raises(ValueError, match=OVERFLOW):
        fastrope.attention(q, k, v, None, scale=1e10)
    with pytest.raises(ValueError, match=OVERFLOW):
        fastrope.attention_grad(q, k, v, None, np.ones((n_q, 2), dtype), scale=1e10)
    # A fully masked row keeps lse = -inf, no error.
    _, lse = fastrope.attention(q / big, k, v, None, causal=True, q_offset=-5, return_lse=True)
    assert np.all(lse == -np.inf)


def test_gradients_that_overflow_raise_a_clear_value_error():
    """``dout`` = 1e300 times ``v`` = +-1e300: ``dP`` overflows and the gradients were NaN."""
    q = np.ones((3, 2))
    v = np.array([[1e300, 1.0], [-1e300, 1.0]])
    out = fastrope.attention(q, q[:2], v, fastrope.Rotary())
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match=r"^dq, dk, dv, dw, dbias: " + OVERFLOW):
        fastrope.attention_grad(q, q[:2], v, fastrope.Rotary(), np.full((3, 2), 1e300))
    grads = fastrope.attention_grad(q, q[:2], v, fastrope.Rotary(), np.ones((3, 2)))
    assert all(np.isfinite(g).all() for g in grads[:3])
