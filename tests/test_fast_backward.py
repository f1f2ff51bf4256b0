"""The fast backward: ``attention_grad(..., eps, method="fast" | "auto")``.

Every gradient ``G`` the fast backward returns must meet its contract against the exact
gradient (the NumPy reference): ``max|G_fast - G| <= eps * S_G`` under ``grad_error="relative"``
(``S_G``, the certified magnitude, from the native plan of the same call) and ``<= eps`` under
``"absolute"``, and lie within the per-gradient bound the native certificate states — for every
position-matrix form, masks, biases, offsets, GQA and both dtypes.  The design is
"the exact gradient of the approximate forward": central finite differences of that forward (a
fixed Taylor polynomial, so it is one smooth function) must match the returned gradients.
Sizes stay small (n <= ~300).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import FAST_FORMS, bounded, make_fast_w, unit_rows
from conftest import LOWRANK_CASES as COMMON_LOWRANK_CASES

import fastrope
from fastrope import _fastrope as native
from fastrope import reference
from fastrope._api import prepare

EPS = (1e-2, 1e-4, 1e-6)
FORMS = FAST_FORMS
GRADS = ("dq", "dk", "dv", "dw", "dbias")
CONTRACTS = ("relative", "absolute")


def make_w(form: str, rng, L: int, d: int, lead=(), dtype=np.float64):
    return make_fast_w(form, rng, L, d, lead, dtype, dense=0.4)


def grads_or_refusal(q, k, v, w, dout, eps, method="fast", **kw):
    """The fast gradients, or None when the fast backward cannot certify ``eps`` (allowed)."""
    try:
        return fastrope.attention_grad(q, k, v, w, dout, eps, method=method, **kw)
    except fastrope.ApproximationError as e:
        assert "method='fast'" in str(e) or "fast backward" in str(e), str(e)
        return None


def errors(got, ref) -> dict:
    out = {}
    for name, a, b in zip(GRADS, got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == got.dq.dtype, name
            out[name] = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
    return out


def native_certificate(q, k, v, w, dout, eps, bias_grad=True, grad_error="relative", **kw):
    """The native plan of the run (a dict): the per-gradient certified bounds of the run
    (``certified_run``, sums over heads) and the certified magnitudes ``grad_scale``."""
    call = prepare(q, k, v, w, full_dense_support=True, **kw)
    b, hq, hk, nq, nk, d, dv = call.shape
    dout4 = np.ascontiguousarray(dout.reshape(b, hq, nq, dv), dtype=call.dtype)
    res = native.fast_backward(
        call.q4, call.k4, call.v4, dout4, **call.native_args(), eps=eps,
        want_dw=call.values is not None, want_dbias=bias_grad and call.bias is not None,
        max_terms=1_000_000, max_degree=40, memory_limit=8 << 30, run=True, num_threads=None,
        grad_error=grad_error,
    )  # fmt: skip
    assert res[7]["grad_error"] == grad_error
    return res[7]


def budgets(eps, info, grad_error) -> dict:
    """What ``eps`` allows each gradient under ``grad_error`` (``info`` a native plan)."""
    if grad_error == "absolute":
        return {g: eps for g in GRADS}
    return {g: eps * s for g, s in info["grad_scale"].items()}


def assert_within_contract(err, eps, info, grad_error, check_cert=True):
    """Each measured error within its budget, and (``check_cert``) within the run's own
    certificate, which is within the budget."""
    budget = budgets(eps, info, grad_error)
    for name, e in err.items():
        assert e <= budget[name], (name, e, budget)
        if check_cert:
            c = info["certified_run"][name]
            assert e <= c <= budget[name], (name, e, c, budget)


def assert_magnitudes_bound_the_gradients(ref, info):
    """``S_G >= max|G|``: the scales of the relative contract bound the exact gradients."""
    for name, g in zip(GRADS, ref):
        if g is not None and g.size:
            assert np.abs(g).max() <= info["grad_scale"][name] * (1 + 1e-12), name


@pytest.mark.parametrize("grad_error", CONTRACTS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("eps", EPS)
def test_every_gradient_within_eps_and_its_certificate(form, eps, grad_error):
    rng = np.random.default_rng(abs(hash((form, eps))) % 2**32)
    nq, nk, d, dv = 37, 53, 2 if form == "dense" else 4, 3
    L = nq + nk
    q, k = bounded(rng, (2, nq, d)), bounded(rng, (2, nk, d))
    v = rng.standard_normal((2, nk, dv))
    dout = rng.uniform(-1, 1, (2, nq, dv))
    w = make_w(form, rng, L, d)
    got = grads_or_refusal(q, k, v, w, dout, eps, grad_error=grad_error)
    if eps >= 1e-4:
        assert got is not None, "R ~ 1 with eps >= 1e-4 must be certifiable"
    if got is None:
        return
    ref = reference.attention_grad(q, k, v, w, dout)
    info = native_certificate(q, k, v, w, dout, eps, grad_error=grad_error)
    assert_within_contract(errors(got, ref), eps, info, grad_error)
    assert_magnitudes_bound_the_gradients(ref, info)


CASES = {
    "causal": dict(causal=True),
    "causal_bottom_right": dict(causal=True, q_offset=21),
    "window": dict(window=(9, 4)),
    "alibi": dict(bias="alibi"),
    "causal_window_bias_offsets": dict(
        causal=True, window=(30, 0), bias="random", q_offset=7, k_offset=3
    ),
    "gqa": dict(gqa=True),
    "gqa_per_head_tables": dict(gqa=True, per_head=True, bias="random", causal=True),
    "empty_rows": dict(causal=True, q_offset=-4),
}  # fmt: skip


@pytest.mark.parametrize("grad_error", CONTRACTS)
@pytest.mark.parametrize("form", ["rotary", "blockw", "sparse"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("eps", EPS)
def test_masks_bias_offsets_gqa(form, case, eps, grad_error):
    c = dict(CASES[case])
    rng = np.random.default_rng(abs(hash((form, case, eps))) % 2**32)
    nq, nk, d, dv = 29, 40, 4, 2
    hq, hk = (4, 2) if c.pop("gqa", False) else (2, 2)
    per_head = c.pop("per_head", False)
    q = bounded(rng, (hq, nq, d))
    k = bounded(rng, (hk, nk, d))
    v = rng.standard_normal((hk, nk, dv))
    dout = rng.uniform(-1, 1, (hq, nq, dv))
    L = nq + nk + abs(c.get("q_offset", 0)) + abs(c.get("k_offset", 0))
    lead = (hq,) if per_head else ()
    w = make_w(form, rng, L, d, lead=lead)
    kind = c.pop("bias", None)
    if kind == "alibi":
        c["bias"] = fastrope.alibi(hq, L)
    elif kind == "random":
        c["bias"] = rng.uniform(-1.0, 0.3, lead + (2 * L - 1,))
    got = grads_or_refusal(q, k, v, w, dout, eps, grad_error=grad_error, **c)
    if eps >= 1e-4 and case != "gqa_per_head_tables":
        assert got is not None
    if got is None:
        return
    ref = reference.attention_grad(q, k, v, w, dout, **c)
    info = native_certificate(q, k, v, w, dout, eps, grad_error=grad_error, **c)
    assert_within_contract(errors(got, ref), eps, info, grad_error)
    assert_magnitudes_bound_the_gradients(ref, info)
    if case == "empty_rows":
        # Rows without a visible key get no gradient at all.
        assert not got.dq[:, :4].any()


@pytest.mark.parametrize("grad_error", CONTRACTS)
@pytest.mark.parametrize("form", ["rotary", "blockw", "dense"])
@pytest.mark.parametrize("eps", (1e-2, 1e-4))
def test_float32(form, eps, grad_error):
    rng = np.random.default_rng(abs(hash((form, eps, "f32"))) % 2**32)
    nq, nk, d, dv = 33, 33, 2, 3
    f32 = np.float32
    q, k = bounded(rng, (nq, d), dtype=f32), bounded(rng, (nk, d), dtype=f32)
    v = rng.standard_normal((nk, dv)).astype(f32)
    dout = rng.uniform(-1, 1, (nq, dv)).astype(f32)
    w = make_w(form, rng, nq + nk, d, dtype=f32)
    bias = np.full(2 * (nq + nk) - 1, -0.1, f32)
    got = grads_or_refusal(q, k, v, w, dout, eps, bias=bias, grad_error=grad_error)
    assert got is not None
    assert got.dq.dtype == f32 and got.dk.dtype == f32 and got.dv.dtype == f32
    ref = reference.attention_grad(q, k, v, w, dout, bias=bias)
    info = native_certificate(q, k, v, w, dout, eps, grad_error=grad_error, bias=bias)
    assert_within_contract(errors(got, ref), eps, info, grad_error)


def test_float32_eps_below_rounding_is_refused_or_met():
    rng = np.random.default_rng(5)
    q, k = bounded(rng, (20, 2), dtype=np.float32), bounded(rng, (20, 2), dtype=np.float32)
    v = rng.standard_normal((20, 2)).astype(np.float32)
    dout = rng.uniform(-1, 1, (20, 2)).astype(np.float32)
    got = grads_or_refusal(q, k, v, fastrope.Rotary(), dout, 1e-8, grad_error="absolute")
    if got is not None:
        ref = reference.attention_grad(q, k, v, fastrope.Rotary(), dout)
        assert max(errors(got, ref).values()) <= 1e-8


def _fixed_polynomial(q, k, v, w, dout, degree=6, dlse=None, bias_grad=True, **kw):
    """Gradients and approximate forward with a fixed Taylor polynomial (test hook)."""
    call = prepare(q, k, v, w, full_dense_support=True, **kw)
    b, hq, hk, nq, nk, d, dv = call.shape
    g3 = None if dlse is None else np.ascontiguousarray(dlse.reshape(b, hq, nq))
    res = native.fast_backward(
        call.q4, call.k4, call.v4, np.ascontiguousarray(dout.reshape(b, hq, nq, dv)),
        **call.native_args(), eps=1e6, want_dw=call.values is not None,
        want_dbias=bias_grad and call.bias is not None, max_terms=1_000_000, max_degree=40,
        memory_limit=8 << 30, run=True, num_threads=None, poly=("taylor", degree, 2.0),
        dlse=g3,
    )  # fmt: skip
    return res, call


@pytest.mark.parametrize("form", ["rotary", "blockw", "sparse", "dense"])
def test_gradient_of_the_approximate_forward_by_finite_differences(form):
    rng = np.random.default_rng(abs(hash(("fd", form))) % 2**32)
    nq, nk, d, dv = 11, 14, 2, 2
    L = nq + nk + 3
    q, k = bounded(rng, (nq, d), 0.8), bounded(rng, (nk, d), 0.8)
    v = rng.standard_normal((nk, dv))
    dout = rng.uniform(-1, 1, (nq, dv))
    w = make_w(form, rng, L, d)
    bias = rng.uniform(-0.5, 0.2, 2 * L - 1)
    kw = dict(bias=bias, window=(8, 5), q_offset=2)
    (dq, dk, dv_, dw3, db2, out, lse, info), call = _fixed_polynomial(q, k, v, w, dout, **kw)
    assert info["degree"] == 6 and info["poly_kind"] == "taylor"

    def loss(q_, k_, v_, w_, bias_):
        res, _ = _fixed_polynomial(q_, k_, v_, w_, dout, bias=bias_, window=(8, 5), q_offset=2)
        return float((res[5].reshape(nq, dv) * dout).sum())

    h = 1e-6

    def fd(x, idx, make):
        a, b = x.copy(), x.copy()
        a[idx] += h
        b[idx] -= h
        return (loss(*make(a)) - loss(*make(b))) / (2 * h)

    def close(x, y, what):
        assert abs(x - y) <= 1e-6 * (1 + abs(y)), (what, x, y)

    for idx in [(0, 0), (5, 1), (10, 0)]:
        close(fd(q, idx, lambda a: (a, k, v, w, bias)), dq.reshape(nq, d)[idx], "dq")
    for idx in [(0, 1), (7, 0), (13, 1)]:
        close(fd(k, idx, lambda a: (q, a, v, w, bias)), dk.reshape(nk, d)[idx], "dk")
    for idx in [(2, 0), (13, 1)]:
        close(fd(v, idx, lambda a: (q, k, a, w, bias)), dv_.reshape(nk, dv)[idx], "dv")
    half = L - 1
    for delta in (0, 3, -4):  # rows of the δ tables
        row = delta + half
        close(fd(bias, (row,), lambda a: (q, k, v, w, a)), db2.reshape(-1)[row], "dbias")
        if form == "blockw":
            blocks = w.blocks
            idx = (row, 0, 1, 0)
            got = dw3.reshape(blocks.shape)[idx]
            close(fd(blocks, idx, lambda a: (q, k, v, fastrope.BlockW(a), bias)), got, "dw")
        elif form == "sparse":
            vals = w.values
            idx = (row, 2)
            got = dw3.reshape(vals.shape)[idx]
            close(
                fd(vals, idx, lambda a: (q, k, v, fastrope.SparseW(w.support, a), bias)), got, "dw"
            )
        elif form == "dense":
            idx = (row, 1, 0)
            got = dw3.reshape(2 * L - 1, d, d)[idx] if dw3.shape[-1] == d * d else None
            assert got is not None
            close(fd(w, idx, lambda a: (q, k, v, a, bias)), got, "dw")


def test_fixed_polynomial_forward_is_the_fast_forward():
    # The approximate forward the gradients belong to (returned by the binding) agrees with
    # the fast forward when both use the same degree and kind.
    rng = np.random.default_rng(7)
    q, k = bounded(rng, (2, 40, 4)), bounded(rng, (2, 40, 4))
    v, dout = rng.standard_normal((2, 40, 3)), rng.uniform(-1, 1, (2, 40, 3))
    (dq, dk, dv, dw, db, out, lse, info), _ = _fixed_polynomial(q, k, v, fastrope.Rotary(), dout)
    exact = fastrope.attention(q, k, v, fastrope.Rotary())
    # Degree-6 Taylor on R ~ 1: the approximate output is close to the exact one.
    assert np.abs(out.reshape(exact.shape) - exact).max() < 1e-3
    ref = reference.attention_grad(q, k, v, fastrope.Rotary(), dout)
    assert np.abs(dq.reshape(ref.dq.shape) - ref.dq).max() < 1e-2


def test_planner_cost_model_and_refusals():
    rng = np.random.default_rng(11)
    q, k = bounded(rng, (64, 4)), bounded(rng, (64, 4))
    v, dout = rng.standard_normal((64, 4)), rng.uniform(-1, 1, (64, 4))
    w = fastrope.Rotary()
    # Short sequence: exact is predicted cheaper, and auto follows the prediction.
    p = fastrope.plan(q, k, v, w, 1e-3, backward=True)
    assert p.method == "exact" and p.fast_flops and "predicted" in p.why
    pf = fastrope.plan(q, k, v, w, 1e-3, backward=True, method="fast")
    assert (
        pf.method == "fast" and pf.degree >= fastrope.plan(q, k, v, w, 1e-3, method="fast").degree
    )
    assert pf.certified_error <= 1e-3 and pf.details["grad_error"] == "relative"
    assert pf.details["certified"]["dq"] <= 1e-3 * pf.details["grad_scale"]["dq"]
    g = fastrope.attention_grad(q, k, v, w, dout, 1e-3)  # auto: exact
    ref = fastrope.attention_grad(q, k, v, w, dout)
    assert np.array_equal(g.dq, ref.dq)
    # eps = 0 and a tiny memory limit are refused up front with method="fast".
    with pytest.raises(fastrope.ApproximationError):
        fastrope.attention_grad(q, k, v, w, dout, 0.0, method="fast")
    with pytest.raises(fastrope.ApproximationError, match="memory|max_working_bytes"):
        fastrope.attention_grad(q, k, v, w, dout, 1e-3, method="fast", memory_limit=1 << 16)
    # An eps no polynomial can certify: fast refuses, auto falls back to exact.
    with pytest.raises(fastrope.ApproximationError):
        fastrope.attention_grad(8 * q, 8 * k, v, w, dout, 1e-12, method="fast")
    g = fastrope.attention_grad(8 * q, 8 * k, v, w, dout, 1e-12, method="auto")
    assert np.allclose(g.dq, fastrope.attention_grad(8 * q, 8 * k, v, w, dout).dq)


def test_long_sequence_plan_prefers_the_fast_backward():
    # Shape-tuple plans (no data): a long small-head sequence where the fast backward wins.
    p = fastrope.plan((1, 1 << 18, 2), (1, 1 << 18, 2), (1, 1 << 18, 2), fastrope.Rotary(), 1e-3,
                      backward=True, bound_r=1.0, dtype=np.float64)  # fmt: skip
    assert p.method == "fast", p.why
    assert p.degree is not None and p.fast_seconds < p.exact_seconds
    short = fastrope.plan((1, 256, 2), (1, 256, 2), (1, 256, 2), fastrope.Rotary(), 1e-3,
                          backward=True, bound_r=1.0, dtype=np.float64)  # fmt: skip
    assert short.method == "exact"


def test_dv_zero_and_threads():
    rng = np.random.default_rng(3)
    q, k = bounded(rng, (30, 2)), bounded(rng, (30, 2))
    v, dout = np.zeros((30, 0)), np.zeros((30, 0))
    g = fastrope.attention_grad(q, k, v, fastrope.Rotary(), dout, 1e-3, method="fast")
    assert g.dv.shape == (30, 0) and not g.dq.any()
    v, dout = rng.standard_normal((30, 3)), rng.uniform(-1, 1, (30, 3))
    a = fastrope.attention_grad(
        q, k, v, fastrope.Rotary(), dout, 1e-4, method="fast", num_threads=1
    )
    b = fastrope.attention_grad(
        q, k, v, fastrope.Rotary(), dout, 1e-4, method="fast", num_threads=2
    )
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)  # deterministic for any thread count


# --- the low-rank backward (Rotary / w=None without window or bias) ------------------------------


LOWRANK_CASES = COMMON_LOWRANK_CASES + [
    (fastrope.Rotary(), (4,), 4, 90, 120, 4, 3, dict(causal=True, q_offset=-6)),  # empty rows
]


@pytest.mark.parametrize("grad_error", CONTRACTS)
@pytest.mark.parametrize("case", range(len(LOWRANK_CASES)))
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lowrank_backward_is_certified_against_the_reference(case, eps, dtype, grad_error):
    w, lead, group, nq, nk, d, dv, kw = LOWRANK_CASES[case]
    if dtype == np.float32:
        # float32 rounding of gradients of size ~10 is ~1e-6: below that nothing certifies
        eps = max(eps, 1e-4)
    rng = np.random.default_rng(100 + case)
    lead_k = lead[:-1] + (lead[-1] // group,)
    q = unit_rows(rng, lead + (nq,), d, 2.0).astype(dtype)
    k = unit_rows(rng, lead_k + (nk,), d, 2.0).astype(dtype)
    v = rng.uniform(-1, 1, lead_k + (nk, dv)).astype(dtype)
    dout = rng.uniform(-1, 1, lead + (nq, dv)).astype(dtype)
    ge = dict(grad_error=grad_error)
    p = fastrope.plan(q, k, v, w, eps, method="fast", backward=True, dout=dout, **ge, **kw)
    assert p.details["path"] == "lowrank", p
    assert p.details["fft_len"] == 0 and "low-rank features" in p.why
    got = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", **ge, **kw)
    assert got.dq.dtype == dtype and got.dk.dtype == dtype and got.dv.dtype == dtype
    ref = reference.attention_grad(q, k, v, w, dout, **kw)
    info = native_certificate(q, k, v, w, dout, eps, **ge, **kw)
    assert info["path"] == "lowrank"
    assert info["grad_scale"] == p.details["grad_scale"]  # plan(dout=...) reports the run's
    assert_within_contract(errors(got, ref), eps, info, grad_error)
    assert_magnitudes_bound_the_gradients(ref, info)
    if kw.get("q_offset", 0) < 0:
        assert not got.dq[..., : -kw["q_offset"], :].any()  # rows that see no key


def test_lowrank_backward_adversarial_aligned_inputs():
    """q and k aligned (every score at +R, angles ~ 0): the bound's worst case, within eps."""
    rng = np.random.default_rng(7)
    n, d = 200, 4
    base = rng.standard_normal(d)
    base *= 2.0 / np.linalg.norm(base)  # scale 1/2: R = 2
    q = np.tile(base, (n, 1))
    w = fastrope.Rotary(base=1e9)
    v = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    dout = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    for causal, eps, ge in itertools.product((False, True), (1e-2, 1e-4), CONTRACTS):
        p = fastrope.plan(q, q, v, w, eps, method="fast", backward=True, causal=causal)
        assert p.details["path"] == "lowrank" and p.bound_r >= 1.99
        got = fastrope.attention_grad(
            q, q, v, w, dout, eps, method="fast", causal=causal, grad_error=ge
        )
        ref = reference.attention_grad(q, q, v, w, dout, causal=causal)
        info = native_certificate(q, q, v, w, dout, eps, causal=causal, grad_error=ge)
        assert_within_contract(errors(got, ref), eps, info, ge)


@pytest.mark.parametrize("with_dlse", [False, True])
def test_lowrank_backward_is_the_gradient_of_its_forward(with_dlse):
    """Central differences of the approximate forward (a fixed Taylor polynomial) match the
    low-rank backward, with a causal mask, offsets and GQA, and a cotangent for lse."""
    rng = np.random.default_rng(21)
    nq, nk, d, dv = 13, 11, 4, 2
    q, k = bounded(rng, (2, nq, d), 0.6), bounded(rng, (1, nk, d), 0.6)
    v, dout = rng.standard_normal((1, nk, dv)), rng.uniform(-1, 1, (2, nq, dv))
    dlse = 2.0 * rng.standard_normal((2, nq)) if with_dlse else None
    w = fastrope.Rotary(base=50.0)
    kw = dict(causal=True, q_offset=3, k_offset=1)
    (dq, dk, dv_, _, _, out, lse, info), _ = _fixed_polynomial(q, k, v, w, dout, dlse=dlse, **kw)
    assert info["path"] == "lowrank" and info["degree"] == 6 and info["poly_kind"] == "taylor"

    _check_by_central_differences(q, k, v, w, dout, dlse, (dq, dk, dv_), kw)


def test_lowrank_and_toeplitz_backward_agree(monkeypatch):
    rng = np.random.default_rng(3)
    q, k = unit_rows(rng, (2, 150), 4), unit_rows(rng, (2, 150), 4)
    v, dout = rng.uniform(-1, 1, (2, 150, 3)), rng.uniform(-1, 1, (2, 150, 3))
    w = fastrope.Rotary()
    a = fastrope.attention_grad(q, k, v, w, dout, 1e-6, method="fast", causal=True)
    monkeypatch.setenv("FASTROPE_FAST_PATH", "toeplitz")
    p = fastrope.plan(q, k, v, w, 1e-6, method="fast", backward=True, causal=True)
    assert p.details["path"] == "toeplitz"
    b = fastrope.attention_grad(q, k, v, w, dout, 1e-6, method="fast", causal=True)
    for x, y in zip(a[:3], b[:3]):
        assert np.abs(x - y).max() <= 2e-6


def test_lowrank_backward_path_choice():
    """Rotary / w=None without window or bias: low-rank; a window, a bias or general W: Toeplitz."""
    rng = np.random.default_rng(5)
    q = unit_rows(rng, (1, 64), 4)
    v = rng.uniform(-1, 1, (1, 64, 2))
    rot = fastrope.Rotary()

    def path(w, **kw):
        return fastrope.plan(q, q, v, w, 1e-3, method="fast", backward=True, **kw).details["path"]

    assert path(rot) == path(rot, causal=True) == path(None) == "lowrank"
    assert path(rot, window=(None, None)) == path(rot, window=(8, 0)) == "lowrank"
    # an ALiBi bias: low-rank when no dbias is asked for (the route computes none)
    alibi = fastrope.alibi(1, 64)
    assert path(rot, bias=alibi) == "toeplitz"
    assert path(rot, bias=alibi, bias_grad=False) == path(None, bias=alibi, bias_grad=False)
    assert path(rot, bias=alibi, bias_grad=False, window=(9, 2)) == "lowrank"
    t5 = rng.uniform(-1, 0, (1, 127))
    assert path(rot, bias=t5, bias_grad=False) == "toeplitz"
    assert path(fastrope.BlockW(np.tile(np.eye(2), (127, 2, 1, 1)))) == "toeplitz"


def test_lowrank_backward_plans_long_small_heads_in_little_memory():
    """n = 2^20, d = 4, d_v = 64 (issue #4's sweep): the low-rank backward plan needs a few MiB
    besides the inputs and outputs, and is predicted far cheaper than the exact backward."""
    n, d, dv = 2**20, 4, 64
    p = fastrope.plan((1, n, d), (1, n, d), (1, n, dv), fastrope.Rotary(), 1e-3, backward=True,
                      bound_r=1.0, v_max=1.0, dtype=np.float64, causal=True)  # fmt: skip
    assert p.method == "fast" and p.details["path"] == "lowrank", p
    arrays = 8 * n * (2 * d + 2 * d + 4 * dv)  # q, k, dq, dk; v, dout, out, dv
    assert p.working_set_bytes - arrays < 256 * 2**20
    assert p.fast_seconds * 50 < p.exact_seconds


# --- the low-rank backward with a band: windows and ALiBi --------------------------------------


BAND_CASES = [
    # w, lead_q, group, n_q, n_k, d, d_v, slopes (None: no bias), kw
    (fastrope.Rotary(), (2,), 1, 300, 300, 2, 3, "std", dict(causal=True)),
    (fastrope.Rotary(), (2,), 1, 170, 230, 4, 3, "std", dict()),
    (None, (2,), 1, 150, 150, 3, 2, [0.3, 0.01], dict(causal=True, q_offset=4)),
    (fastrope.Rotary(), (1,), 1, 290, 290, 2, 4, None, dict(causal=True, window=(60, 0))),
    (fastrope.Rotary(), (1,), 1, 200, 260, 2, 3, None, dict(window=(40, 70), k_offset=5)),
    (fastrope.Rotary(), (2, 4), 2, 120, 140, 4, 2, "std", dict(window=(33, 9), causal=True)),
    # rows that see no key
    (fastrope.Rotary(), (4,), 4, 90, 120, 2, 3, [2.0], dict(causal=True, q_offset=-6)),
]  # fmt: skip


def _band_inputs(case, dtype, seed=300):
    w, lead, group, nq, nk, d, dv, slopes, kw = BAND_CASES[case]
    rng = np.random.default_rng(seed + case)
    lead_k = lead[:-1] + (lead[-1] // group,)
    q = unit_rows(rng, lead + (nq,), d, 2.0).astype(dtype)
    k = unit_rows(rng, lead_k + (nk,), d, 2.0).astype(dtype)
    v = rng.uniform(-1, 1, lead_k + (nk, dv)).astype(dtype)
    dout = rng.uniform(-1, 1, lead + (nq, dv)).astype(dtype)
    kw = dict(kw)
    if slopes is not None:
        heads = lead[-1]
        L = nq + nk + abs(kw.get("q_offset", 0) - kw.get("k_offset", 0))
        kw["bias"] = fastrope.alibi(heads if slopes == "std" else np.resize(slopes, heads), L)
    return w, q, k, v, dout, kw


@pytest.mark.parametrize("grad_error", CONTRACTS)
@pytest.mark.parametrize("case", range(len(BAND_CASES)))
@pytest.mark.parametrize("eps", (1e-2, 1e-4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_banded_lowrank_backward_is_certified_against_the_reference(case, eps, dtype, grad_error):
    w, q, k, v, dout, kw = _band_inputs(case, dtype)
    kw = dict(kw, bias_grad=False, grad_error=grad_error)
    p = fastrope.plan(q, k, v, w, eps, method="fast", backward=True, **kw)
    assert p.details["path"] == "lowrank", p
    got = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", **kw)
    assert got.dbias is None and got.dq.dtype == dtype
    kw.pop("bias_grad"), kw.pop("grad_error")
    ref = reference.attention_grad(q, k, v, w, dout, **kw)
    info = native_certificate(q, k, v, w, dout, eps, bias_grad=False, grad_error=grad_error, **kw)
    assert info["path"] == "lowrank"
    assert_within_contract(errors(got, ref._replace(dbias=None)), eps, info, grad_error)
    assert_magnitudes_bound_the_gradients(ref._replace(dbias=None), info)
    if kw.get("q_offset", 0) < 0:
        assert not got.dq[..., : -kw["q_offset"], :].any()  # rows that see no key


def test_banded_lowrank_backward_adversarial_aligned_inputs():
    """Every score at +R (q = k aligned, angles ~ 0), v and dout of one sign pattern, under
    ALiBi and a window: the bound's worst case, within eps."""
    rng = np.random.default_rng(8)
    n, d = 240, 4
    base = rng.standard_normal(d)
    base *= 2.0 / np.linalg.norm(base)
    q = np.tile(base, (n, 1))
    w = fastrope.Rotary(base=1e9)
    v = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    dout = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    for kw in (dict(bias=fastrope.alibi([0.05], n)[0]), dict(window=(50, 7)),
               dict(bias=fastrope.alibi([0.5], n)[0], window=(30, 30))):  # fmt: skip
        for causal, eps, ge in itertools.product((False, True), (1e-2, 1e-4), CONTRACTS):
            p = fastrope.plan(q, q, v, w, eps, method="fast", backward=True, causal=causal,
                              bias_grad=False, **kw)  # fmt: skip
            assert p.details["path"] == "lowrank" and p.bound_r >= 1.99
            got = fastrope.attention_grad(q, q, v, w, dout, eps, method="fast", causal=causal,
                                          bias_grad=False, grad_error=ge, **kw)  # fmt: skip
            ref = reference.attention_grad(q, q, v, w, dout, causal=causal, **kw)
            info = native_certificate(q, q, v, w, dout, eps, bias_grad=False, causal=causal,
                                      grad_error=ge, **kw)  # fmt: skip
            assert_within_contract(errors(got, ref._replace(dbias=None)), eps, info, ge)


@pytest.mark.parametrize("with_dlse", [False, True])
def test_banded_lowrank_backward_is_the_gradient_of_its_forward(with_dlse):
    """Central differences of the approximate forward (a fixed Taylor polynomial) under ALiBi and
    a window match the banded low-rank backward, with offsets, GQA and a cotangent for lse."""
    rng = np.random.default_rng(22)
    nq, nk, d, dv = 13, 11, 4, 2
    q, k = bounded(rng, (2, nq, d), 0.6), bounded(rng, (1, nk, d), 0.6)
    v, dout = rng.standard_normal((1, nk, dv)), rng.uniform(-1, 1, (2, nq, dv))
    dlse = 2.0 * rng.standard_normal((2, nq)) if with_dlse else None
    w = fastrope.Rotary(base=50.0)
    kw = dict(q_offset=3, k_offset=1, window=(6, 2), bias=fastrope.alibi([0.4, 0.1], 20))
    (dq, dk, dv_, _, _, out, lse, info), _ = _fixed_polynomial(
        q, k, v, w, dout, dlse=dlse, bias_grad=False, **kw
    )
    assert info["path"] == "lowrank" and info["degree"] == 6 and info["poly_kind"] == "taylor"

    _check_by_central_differences(q, k, v, w, dout, dlse, (dq, dk, dv_), dict(kw, bias_grad=False))


def test_banded_lowrank_and_toeplitz_backward_agree():
    rng = np.random.default_rng(4)
    q, k = unit_rows(rng, (2, 150), 4), unit_rows(rng, (2, 150), 4)
    v, dout = rng.uniform(-1, 1, (2, 150, 3)), rng.uniform(-1, 1, (2, 150, 3))
    w = fastrope.Rotary()
    kw = dict(causal=True, window=(40, 0), bias=fastrope.alibi(2, 150), bias_grad=False)
    a = fastrope.attention_grad(q, k, v, w, dout, 1e-6, method="fast", route="lowrank", **kw)
    b = fastrope.attention_grad(q, k, v, w, dout, 1e-6, method="fast", route="toeplitz", **kw)
    for x, y in zip(a[:3], b[:3]):
        assert np.abs(x - y).max() <= 2e-6


def _check_by_central_differences(q, k, v, w, dout, dlse, grads, kw):
    """The low-rank backward's (dq, dk, dv) against central differences of the approximate
    forward of the fixed polynomial (``sum(out * dout) + sum(lse * dlse)``) at a few entries."""
    dq, dk, dv_ = grads

    def loss(q_, k_, v_):
        res, _ = _fixed_polynomial(q_, k_, v_, w, dout, **kw)
        total = float((res[5].reshape(dout.shape) * dout).sum())
        if dlse is not None:
            total += float((res[6].reshape(dlse.shape) * dlse).sum())
        return total

    h = 1e-6

    def fd(x, idx, make):
        a, b = x.copy(), x.copy()
        a[idx] += h
        b[idx] -= h
        return (loss(*make(a)) - loss(*make(b))) / (2 * h)

    def close(x, y, what):
        assert abs(x - y) <= 1e-6 * (1 + abs(y)), (what, x, y)

    for idx in [(0, 0, 0), (1, 5, 3), (0, 12, 1)]:
        close(fd(q, idx, lambda a: (a, k, v)), dq.reshape(q.shape)[idx], "dq")
    for idx in [(0, 0, 1), (0, 7, 0), (0, 10, 3)]:
        close(fd(k, idx, lambda a: (q, a, v)), dk.reshape(k.shape)[idx], "dk")
    for idx in [(0, 2, 0), (0, 10, 1)]:
        close(fd(v, idx, lambda a: (q, k, a)), dv_.reshape(v.shape)[idx], "dv")


@pytest.mark.parametrize("bias", [False, True], ids=["blockw", "blockw-alibi"])
def test_streamed_backward_spectra_are_certified_and_match_the_held_ones(bias):
    # Under a memory_limit the held kernel spectra do not fit: the backward streams them (dw
    # and dbias included, their correlation spectra held whole) and its gradients are bitwise
    # those of the held spectra, within eps of the reference.
    rng = np.random.default_rng(51)
    heads, nq, nk, d, dv = 2, 150, 170, 4, 3
    L = nq + nk
    q, k = bounded(rng, (heads, nq, d), 0.5), bounded(rng, (heads, nk, d), 0.5)
    v = rng.standard_normal((heads, nk, dv))
    dout = rng.uniform(-1, 1, (heads, nq, dv))
    w = make_w("blockw", rng, L, d)
    kw = dict(causal=True)
    if bias:
        kw["bias"] = fastrope.alibi(np.array([0.05, 0.2]), L)
    eps = 1e-3

    def plan(limit):
        return fastrope.plan(
            q, k, v, w, eps, method="fast", memory_limit=limit, backward=True, **kw
        )

    held = plan(1 << 34)
    assert held.details["kernel_spectra"]["mode"] == "held"
    limit = held.fast_working_set_bytes
    while plan(limit).details["kernel_spectra"]["mode"] == "held":
        limit = limit * 7 // 8
    p = plan(limit)
    spectra = p.details["kernel_spectra"]
    assert 1 <= spectra["pair_chunk"] < spectra["n_pairs"] == held.n_pairs
    assert p.working_set_bytes <= limit and p.fast_flops > held.fast_flops
    assert "kernel spectra: streamed" in str(p)
    got = fastrope.attention_grad(q, k, v, w, dout, eps, method="fast", memory_limit=limit, **kw)
    full = fastrope.attention_grad(
        q, k, v, w, dout, eps, method="fast", memory_limit=1 << 34, **kw
    )
    for name, a, b in zip(GRADS, got, full):
        assert (a is None) == (b is None), name
        if a is not None:
            assert np.array_equal(a, b), name
    assert got.dw is not None and (got.dbias is not None) == bias
    ref = reference.attention_grad(q, k, v, w, dout, **kw)
    info = native_certificate(q, k, v, w, dout, eps, **kw)
    assert_within_contract(errors(got, ref), eps, info, "relative", check_cert=False)


# --- the gradient contract: relative (default) or absolute -------------------------------------


def test_relative_contract_does_not_change_when_dout_is_rescaled():
    """A loss scale (or a mean over a batch) rescales dout and every gradient by the same factor:
    the relative plan keeps its degree and certificate, and its gradients scale exactly; the
    absolute plan drops to degree 0 for a tiny dout, whose gradients are then all error."""
    rng = np.random.default_rng(61)
    q, k = bounded(rng, (2, 300, 4), 0.5), bounded(rng, (2, 300, 4), 0.5)
    v = rng.standard_normal((2, 300, 8))
    dout = rng.uniform(-1, 1, (2, 300, 8))
    w, kw = fastrope.Rotary(), dict(causal=True, method="fast")
    base = fastrope.plan(q, k, v, w, 1e-3, backward=True, dout=dout, **kw)
    g1 = fastrope.attention_grad(q, k, v, w, dout, 1e-3, **kw)
    ref1 = reference.attention_grad(q, k, v, w, dout, causal=True)
    for c in (2.0**-30, 2.0**20):  # powers of two: dout * c is exact
        p = fastrope.plan(q, k, v, w, 1e-3, backward=True, dout=dout * c, **kw)
        assert (p.degree, p.poly_kind) == (base.degree, base.poly_kind)
        assert p.certified_error == pytest.approx(base.certified_error, rel=1e-9)
        for g in ("dq", "dk", "dv"):
            assert p.details["grad_scale"][g] == pytest.approx(
                c * base.details["grad_scale"][g], rel=1e-9
            )
        gc = fastrope.attention_grad(q, k, v, w, dout * c, 1e-3, **kw)
        for a, b, r in zip(gc[:3], g1[:3], ref1[:3]):
            assert np.allclose(a, c * b, rtol=1e-12, atol=0)
            assert np.abs(a - c * r).max() <= 1e-3 * c * np.abs(r).max()
    tiny = fastrope.plan(
        q, k, v, w, 1e-3, backward=True, dout=dout * 2.0**-30, grad_error="absolute", **kw
    )
    assert tiny.degree < base.degree


@pytest.mark.parametrize("d", [2, 4, 8])
def test_relative_backward_is_within_one_degree_of_the_forward(d):
    # Shape-only plans at n = 2^16, R = 1, eps = 1e-3, causal, d_v = 64: the absolute contract
    # pays for d_v (its bound sums |dout_ic| range(v_c) over the 64 columns), the relative one
    # does not.
    n, w = 1 << 16, fastrope.Rotary()
    shapes = ((1, n, d), (1, n, d), (1, n, 64))
    kw = dict(causal=True, bound_r=1.0, dtype=np.float64, method="fast")
    fwd = fastrope.plan(*shapes, w, 1e-3, **kw)
    rel = fastrope.plan(*shapes, w, 1e-3, backward=True, **kw)
    ab = fastrope.plan(*shapes, w, 1e-3, backward=True, grad_error="absolute", **kw)
    assert rel.details["grad_error"] == "relative" and ab.details["grad_error"] == "absolute"
    assert rel.degree <= fwd.degree + 1 < ab.degree
    assert "relative" in str(rel) and "absolute" in str(ab)


def test_grad_error_is_validated():
    rng = np.random.default_rng(62)
    q, k, v = bounded(rng, (16, 2)), bounded(rng, (16, 2)), rng.standard_normal((16, 2))
    w = fastrope.Rotary()
    with pytest.raises(ValueError, match="grad_error: expected 'relative'"):
        fastrope.attention_grad(q, k, v, w, v, 1e-3, grad_error="rel")
    with pytest.raises(ValueError, match="grad_error"):
        fastrope.plan(q, k, v, w, 1e-3, backward=True, grad_error=None)
    with pytest.raises(ValueError, match="dout: only with backward=True"):
        fastrope.plan(q, k, v, w, 1e-3, dout=v)
