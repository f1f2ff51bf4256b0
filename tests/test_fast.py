"""The fast method (polynomial + Toeplitz + FFT) through the public API, and the planner.

Every result of ``method="fast"`` must be within ``eps`` of the exact result (the NumPy reference)
on every entry — on random bounded inputs and on inputs built to reach the score bound — for every
position-matrix form, masks, biases, offsets and GQA.  The planner's choices are unit-tested on
shape tuples (RustFFT style: given sizes, which method and degree).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LOWRANK_CASES, bounded, make_fast_w, unit_rows

import fastrope
from fastrope import reference

EPS = (1e-2, 1e-4, 1e-6)


def fast_or_refusal(q, k, v, w, eps, **kw):
    """The fast result, or None when the planner proved it cannot certify ``eps`` (allowed)."""
    try:
        return fastrope.attention(q, k, v, w, eps, method="fast", **kw)
    except fastrope.ApproximationError as e:
        assert "method='fast'" in str(e)
        return None


@pytest.mark.parametrize("form", ["rotary", "rotary-half", "blockw", "sparse", "dense"])
@pytest.mark.parametrize("eps", EPS)
def test_certified_error_holds_on_random_bounded_inputs(form, eps):
    rng = np.random.default_rng(hash((form, eps)) % 2**32)
    nq, nk, d, dv = 37, 53, 4, 5
    L = nq + nk
    q, k = bounded(rng, (2, nq, d)), bounded(rng, (2, nk, d))
    v = rng.standard_normal((2, nk, dv))
    w = make_fast_w(form, rng, L, d)
    out = fast_or_refusal(q, k, v, w, eps)
    if eps >= 1e-4:
        assert out is not None, "R ~ 1 with eps >= 1e-4 must be certifiable"
    if out is not None:
        ref = reference.attention(q, k, v, w)
        assert np.abs(out - ref).max() <= eps


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=True, q_offset=20),
        dict(window=(5, 3), q_offset=7, k_offset=-2),
        dict(bias="alibi"),
        dict(bias="alibi", causal=True),
    ],
    ids=["causal", "causal-bottom-right", "window-offsets", "alibi", "alibi-causal"],
)
@pytest.mark.parametrize("form", ["rotary", "blockw"])
def test_masks_biases_and_offsets(form, kw):
    rng = np.random.default_rng(7)
    nq, nk, d, dv, heads = 29, 41, 2, 3, 2
    L = 80
    q, k = bounded(rng, (heads, nq, d), 0.7), bounded(rng, (heads, nk, d), 0.7)
    v = rng.standard_normal((heads, nk, dv))
    w = make_fast_w(form, rng, L, d)
    kw = dict(kw)
    if kw.get("bias") == "alibi":
        kw["bias"] = fastrope.alibi(np.array([0.05, 0.2]), L)
    for eps in (1e-3, 1e-5):
        out = fastrope.attention(q, k, v, w, eps, method="fast", **kw)
        ref = reference.attention(q, k, v, w, **kw)
        assert np.abs(out - ref).max() <= eps
        assert np.isfinite(out).all()


def test_fully_masked_rows_are_exactly_zero_and_minus_inf():
    rng = np.random.default_rng(3)
    q, k = bounded(rng, (6, 2)), bounded(rng, (4, 2))
    v = rng.standard_normal((4, 3))
    out, lse = fastrope.attention(
        q,
        k,
        v,
        fastrope.Rotary(),
        1e-3,
        method="fast",
        causal=True,
        q_offset=-2,
        return_lse=True,
    )
    assert np.all(out[:2] == 0) and np.all(lse[:2] == -np.inf)
    ref = reference.attention(q, k, v, fastrope.Rotary(), causal=True, q_offset=-2)
    assert np.abs(out - ref).max() <= 1e-3


def test_gqa_batch_and_float32():
    rng = np.random.default_rng(11)
    q = bounded(rng, (2, 4, 33, 4), dtype=np.float32)
    k = bounded(rng, (2, 2, 47, 4), dtype=np.float32)
    v = rng.standard_normal((2, 2, 47, 6)).astype(np.float32)
    w = fastrope.Rotary()
    out = fastrope.attention(q, k, v, w, 1e-3, method="fast", causal=True, q_offset=14)
    assert out.dtype == np.float32 and out.shape == (2, 4, 33, 6)
    ref = reference.attention(q, k, v, w, causal=True, q_offset=14)
    assert np.abs(out - ref).max() <= 1e-3


@pytest.mark.parametrize("form", ["rotary", "blockw"])
def test_adversarial_inputs_reach_the_bound(form):
    """q and k aligned with W's top singular directions so that |M_ij| reaches R."""
    rng = np.random.default_rng(5)
    n, d, dv = 40, 2, 4
    w = make_fast_w(form, rng, n, d)
    # For rotary every W_δ is a rotation: q = k = (a, 0) gives M = a² cos(δθ) up to |M| = a².
    # For BlockW align with W_0's top singular vectors (δ = 0 is on the diagonal).
    if form == "rotary":
        qv, kv = np.array([1.0, 0.0]), np.array([1.0, 0.0])
    else:
        u, s, vt = np.linalg.svd(np.asarray(w.blocks)[n - 1, 0])
        qv, kv = u[:, 0], vt[0]
    scale_in = 1.6
    q = np.tile(qv * scale_in, (n, 1)) * np.sign(rng.standard_normal((n, 1)))
    k = np.tile(kv * scale_in, (n, 1))
    v = rng.standard_normal((n, dv))
    p = fastrope.plan(q, k, v, w, 1e-4, method="fast")
    m_max = np.abs(
        np.log(np.maximum(reference.attention(q, k, np.eye(n), w), 1e-300))
    ).max()  # a proxy that the scores are large; the real check is below
    assert p.bound_r >= 1.0 and m_max > 0
    out = fastrope.attention(q, k, v, w, 1e-4, method="fast")
    ref = reference.attention(q, k, v, w)
    assert np.abs(out - ref).max() <= 1e-4


def test_error_falls_with_eps_and_stays_within_it():
    rng = np.random.default_rng(2)
    q, k = bounded(rng, (64, 4), 0.8), bounded(rng, (64, 4), 0.8)
    v = rng.standard_normal((64, 8))
    w = fastrope.Rotary()
    ref = reference.attention(q, k, v, w)
    errs, degrees = [], []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        p = fastrope.plan(q, k, v, w, eps, method="fast")
        out = fastrope.attention(q, k, v, w, eps, method="fast")
        errs.append(np.abs(out - ref).max())
        degrees.append(p.degree)
        assert errs[-1] <= eps
    assert degrees == sorted(degrees) and degrees[-1] > degrees[0]
    assert errs[-1] < errs[0]


def test_method_auto_never_returns_an_uncertified_result():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((50, 4)) * 6, rng.standard_normal((50, 4)) * 6  # R far beyond 12
    v = rng.standard_normal((50, 3))
    w = fastrope.Rotary()
    p = fastrope.plan(q, k, v, w, 1e-3)
    assert p.method == "exact" and "cannot" in p.why
    out = fastrope.attention(q, k, v, w, 1e-3)
    np.testing.assert_allclose(out, reference.attention(q, k, v, w), atol=1e-12)
    with pytest.raises(fastrope.ApproximationError):
        fastrope.attention(q, k, v, w, 1e-3, method="fast")


# --- the planner, on shape tuples -------------------------------------------------------------


def shape_plan(n, d, dv=64, eps=1e-3, r=1.0, w=None, **kw):
    w = fastrope.Rotary() if w is None else w
    return fastrope.plan(
        (1, n, d), (1, n, d), (1, n, dv), w, eps, bound_r=r, v_max=1.0, dtype=np.float64, **kw
    )


def test_planner_picks_exact_for_short_sequences_and_fast_for_long_ones(toeplitz_path):
    short = shape_plan(4096, 2)
    assert short.method == "exact" and "exact is predicted" in short.why
    long = shape_plan(2**18, 2)
    assert long.method == "fast" and "fast is predicted" in long.why
    assert long.fast_seconds < long.exact_seconds


def test_planner_degree_grows_with_r_and_shrinks_with_eps():
    degrees_r = [shape_plan(2**16, 2, r=r).degree for r in (0.25, 1.0, 2.0, 4.0)]
    assert degrees_r == sorted(degrees_r) and degrees_r[0] < degrees_r[-1]
    degrees_eps = [shape_plan(2**16, 2, eps=e).degree for e in (1e-1, 1e-3, 1e-5)]
    assert degrees_eps == sorted(degrees_eps) and degrees_eps[0] < degrees_eps[-1]


def test_planner_counts_terms_as_the_multinomial_expansion(toeplitz_path):
    from math import comb

    p = shape_plan(2**14, 2, method="fast")
    support = 4  # d = 2 rotary: one pair, entries (0,0), (0,1), (1,0), (1,1)
    assert p.terms == comb(support + p.degree, p.degree)
    assert p.n_pairs <= p.n_alpha * p.n_beta


def test_planner_refuses_with_reasons(toeplitz_path):
    with pytest.raises(fastrope.ApproximationError, match="eps = 0"):
        shape_plan(2**14, 2, eps=0.0, method="fast")
    with pytest.raises(fastrope.ApproximationError, match="GB|MiB|memory"):
        shape_plan(2**20, 8, method="fast")
    with pytest.raises(fastrope.ApproximationError, match="memory limit"):
        shape_plan(2**16, 2, method="fast", memory_limit=64 << 20)
    p = shape_plan(2**16, 2, memory_limit=64 << 20)
    assert p.method == "exact" and "memory limit" in p.why
    with pytest.raises(ValueError, match="bound_r"):
        fastrope.plan((1, 8, 2), (1, 8, 2), (1, 8, 2), fastrope.Rotary(), 1e-3)


def test_plan_is_plain_data_and_prints(toeplitz_path):
    p = shape_plan(2**18, 2)
    text = str(p)
    assert "method: fast" in text and "polynomial" in text and "why" in text
    assert p.certified_error <= p.eps
    assert p.details["fft_len"] >= 2 * 2**18 - 1


# --- the low-rank path (Rotary / w=None without window or bias) --------------------------------


@pytest.mark.parametrize("case", range(len(LOWRANK_CASES)))
@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lowrank_path_is_certified_against_the_reference(case, eps, dtype):
    w, lead, group, nq, nk, d, dv, kw = LOWRANK_CASES[case]
    if dtype == np.float32 and eps < 1e-5:
        eps = 1e-5  # below float32's output rounding the planner refuses any fast method
    rng = np.random.default_rng(case)
    lead_k = lead[:-1] + (lead[-1] // group,)
    q = unit_rows(rng, lead + (nq,), d, 2.0).astype(dtype)
    k = unit_rows(rng, lead_k + (nk,), d, 2.0).astype(dtype)
    v = rng.uniform(-1, 1, lead_k + (nk, dv)).astype(dtype)
    p = fastrope.plan(q, k, v, w, eps, method="fast", **kw)
    assert p.details["path"] == "lowrank"
    d_eff = d + d % 2 if w is None else d  # w=None pads an odd d with a zero column
    assert p.terms == comb_(d_eff + p.degree, p.degree)
    out, lse = fastrope.attention(q, k, v, w, eps, method="fast", return_lse=True, **kw)
    ref, ref_lse = reference.attention(q, k, v, w, return_lse=True, **kw)
    assert out.dtype == dtype
    err = np.abs(out - ref).max()
    assert err <= p.certified_error <= eps, (err, p.certified_error)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max() <= p.details["certified_lse_error"] + 1e-6


def comb_(a, b):
    from math import comb

    return comb(a, b)


def test_lowrank_adversarial_aligned_inputs():
    """q and k aligned (every score at +R): the bound's worst case, still within eps."""
    rng = np.random.default_rng(7)
    n, d = 200, 4
    base = rng.standard_normal(d)
    base *= 2.0 / np.linalg.norm(base)  # scale 1/2: R = 2
    q = np.tile(base, (n, 1))
    w = fastrope.Rotary(base=1e9)  # angles ~ 0: scores stay aligned along the sequence
    v = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    for eps in (1e-2, 1e-4):
        p = fastrope.plan(q, q, v, w, eps, method="fast", causal=True)
        assert p.details["path"] == "lowrank" and p.bound_r >= 1.99
        out = fastrope.attention(q, q, v, w, eps, method="fast", causal=True)
        ref = reference.attention(q, q, v, w, causal=True)
        assert np.abs(out - ref).max() <= eps


def test_lowrank_and_toeplitz_paths_agree(monkeypatch):
    rng = np.random.default_rng(3)
    q = unit_rows(rng, (2, 150), 4)
    k = unit_rows(rng, (2, 150), 4)
    v = rng.uniform(-1, 1, (2, 150, 3))
    w = fastrope.Rotary()
    a = fastrope.attention(q, k, v, w, 1e-6, method="fast", causal=True)
    monkeypatch.setenv("FASTROPE_FAST_PATH", "toeplitz")
    assert fastrope.plan(q, k, v, w, 1e-6, method="fast", causal=True).details["path"] == (
        "toeplitz"
    )
    b = fastrope.attention(q, k, v, w, 1e-6, method="fast", causal=True)
    assert np.abs(a - b).max() <= 2e-6


def test_lowrank_path_choice():
    """Rotary / w=None, with any window and with or without an ALiBi bias: low-rank; another
    bias table or a general W: Toeplitz, with the reason among the refusals."""
    rng = np.random.default_rng(5)
    q = unit_rows(rng, (1, 64), 4)
    v = rng.uniform(-1, 1, (1, 64, 2))
    rot = fastrope.Rotary()

    def plan(w, **kw):
        return fastrope.plan(q, q, v, w, 1e-3, method="fast", **kw)

    def path(w, **kw):
        return plan(w, **kw).details["path"]

    assert path(rot) == path(rot, causal=True) == path(None) == "lowrank"
    assert path(rot, window=(8, 0)) == path(rot, window=(5, 9), causal=True) == "lowrank"
    assert path(rot, window=(None, None)) == path(rot, window=(63, 63)) == "lowrank"  # no-ops
    assert path(rot, bias=fastrope.alibi(1, 64)) == path(None, bias=fastrope.alibi(1, 64))
    assert path(rot, bias=fastrope.alibi(1, 64), window=(7, 3)) == "lowrank"
    t5 = rng.uniform(-1, 0, (1, 127))
    p = plan(rot, bias=t5)
    assert p.details["path"] == "toeplitz"
    assert any(r == "lowrank" and "ALiBi form" in why for r, why in p.refused), p.refused
    blocks = np.tile(np.eye(2), (127, 2, 1, 1))
    assert path(fastrope.BlockW(blocks)) == "toeplitz"


def test_lowrank_planner_fits_long_small_heads_in_little_memory():
    """n = 2^20, d = 4, d_v = 64 (issue #3's memory target): the low-rank plan needs a few MiB
    besides the inputs, where the Toeplitz plan needs tens of GB; it is predicted far cheaper
    than exact, and the why says how."""
    p = shape_plan(2**20, 4, causal=True)
    assert p.method == "fast" and p.details["path"] == "lowrank"
    inputs = 8 * 2**20 * (4 + 4 + 64 + 64)  # q, k, v, out in float64
    assert p.working_set_bytes - inputs < 256 * 2**20
    assert p.fast_seconds * 50 < p.exact_seconds
    assert "low-rank features" in p.why and "low-rank features" in str(p)


# ------------------------------------------------------------------------------------------
# Kernel spectra streamed within memory_limit
# ------------------------------------------------------------------------------------------


def streaming_limit(q, k, v, w, eps, **kw):
    """``(held plan, memory_limit)``: the plan without a tight limit, and a limit under which
    the fast plan streams its kernel spectra (lowered from the held working set until it does)."""
    held = fastrope.plan(q, k, v, w, eps, method="fast", memory_limit=1 << 34, **kw)
    assert held.details["kernel_spectra"]["mode"] == "held"
    limit = held.fast_working_set_bytes
    while True:
        p = fastrope.plan(q, k, v, w, eps, method="fast", memory_limit=limit, **kw)
        if p.details["kernel_spectra"]["mode"] == "streamed":
            return held, limit
        limit = limit * 7 // 8


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(causal=True), dict(bias="alibi", causal=True, q_offset=5)],
    ids=["plain", "causal", "alibi-causal-offset"],
)
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
@pytest.mark.filterwarnings("ignore:method='fast'")  # a small problem, streamed on purpose
def test_streamed_spectra_are_certified_and_match_the_held_ones(kw, eps):
    rng = np.random.default_rng(31)
    heads, nq, nk, d, dv = 2, 301, 347, 4, 5
    L = nq + nk + 8
    q, k = bounded(rng, (heads, nq, d), 0.6), bounded(rng, (heads, nk, d), 0.6)
    v = rng.standard_normal((heads, nk, dv))
    w = make_fast_w("blockw", rng, L, d)
    kw = dict(kw)
    if kw.get("bias") == "alibi":
        kw["bias"] = fastrope.alibi(np.array([0.05, 0.2]), L)
    held, limit = streaming_limit(q, k, v, w, eps, **kw)
    p = fastrope.plan(q, k, v, w, eps, method="fast", memory_limit=limit, **kw)
    spectra = p.details["kernel_spectra"]
    assert spectra["mode"] == "streamed" and 1 <= spectra["pair_chunk"] < spectra["n_pairs"]
    assert spectra["n_pairs"] == held.n_pairs and p.degree == held.degree
    assert p.working_set_bytes <= limit <= held.fast_working_set_bytes
    assert "kernel spectra: streamed" in str(p) and "streamed" not in str(held)
    # Rebuilding the spectra per column tile is predicted, and costs more than holding them.
    assert p.fast_flops > held.fast_flops
    out = fastrope.attention(q, k, v, w, eps, method="fast", memory_limit=limit, **kw)
    ref = reference.attention(q, k, v, w, **kw)
    assert np.abs(out - ref).max() <= p.certified_error <= eps
    # The chunks continue each other's sums: bitwise the held spectra's result.
    full = fastrope.attention(q, k, v, w, eps, method="fast", memory_limit=1 << 34, **kw)
    assert np.array_equal(out, full)


def test_streaming_is_refused_only_below_one_column_and_one_pair():
    rng = np.random.default_rng(32)
    heads, n, d, dv = 2, 600, 4, 3
    q, k = bounded(rng, (heads, n, d), 0.6), bounded(rng, (heads, n, d), 0.6)
    v = rng.standard_normal((heads, n, dv))
    w = make_fast_w("blockw", rng, n + 1, d)
    # One column of key spectra and accumulators alone exceeds 1 MiB per thread here.
    with pytest.raises(fastrope.ApproximationError, match="memory_limit"):
        fastrope.attention(q, k, v, w, 1e-3, method="fast", memory_limit=1 << 20, num_threads=1)
    p = fastrope.plan(q, k, v, w, 1e-3, memory_limit=1 << 20, num_threads=1)
    assert p.method == "exact"
    assert any("streamed one at a time" in reason for _, reason in p.refused)
