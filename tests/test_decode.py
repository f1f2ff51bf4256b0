"""The decode path: forward calls with at most 4 query rows per head (a generation step against a
KV cache) run a kernel of their own (``src/exact/decode.rs``): keys rotated chunk by chunk with a
table, dot-product scores, ``v`` read in place, spans of keys merged by their maxima and sums.
Checked against the float64 oracle, against the GEMM path, and for its fused NaN/Inf check."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    DTYPES,
    ROTARY_KINDS,
    TABLE_KINDS,
    check_forward,
    make_bias,
    make_qkv,
    make_w,
    needed_L,
)

import fastrope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ROTARY_KINDS + ("none",))
@pytest.mark.parametrize("n_q", [1, 2, 4])
def test_kv_cache_step_matches_oracle(rng, dtype, kind, n_q):
    """A step of n_q new tokens against a cache of 1500 keys (bottom-right causal), 8 query
    heads sharing 2 kv heads, batch 2: several spans of keys per kv head, merged."""
    n_k = 1500
    q, k, v = make_qkv(rng, (2, 8), n_q, n_k, 64, 48, dtype, group=4)
    w = None if kind == "none" else make_w(kind, rng, 1, 64)
    check_forward(q, k, v, w, kind="rotary", max_pos=n_k, causal=True, q_offset=n_k - n_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [
        dict(window=(256, 0), q_offset=999),
        dict(causal=True, q_offset=600, k_offset=3),
        dict(q_offset=-40),
        dict(bias="alibi"),
        dict(scale=0.3, q_offset=10**6, k_offset=10**6 - 400),
    ],
    ids=["window", "causal-mid-cache", "no-mask", "bias", "far-positions"],
)
def test_masks_bias_offsets(rng, dtype, kw):
    kw = dict(kw)
    n_q, n_k = 2, 1000
    q, k, v = make_qkv(rng, (3,), n_q, n_k, 32, 32, dtype)
    if kw.get("bias") == "alibi":
        kw["bias"] = make_bias(rng, n_k + 1).astype(dtype)
    max_pos = max(abs(kw.get("q_offset", 0)), abs(kw.get("k_offset", 0))) + n_k
    check_forward(q, k, v, fastrope.Rotary(), kind="rotary", max_pos=max_pos, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, d_v", [(6, 5), (18, 3), (128, 128), (2, 1)])
def test_odd_sizes_and_strided_inputs(rng, dtype, d, d_v):
    """Head dims that are not whole SIMD vectors, and k/v whose rows are not contiguous."""
    n_k = 700
    q, k, v = make_qkv(rng, (2, 2), 1, n_k, d, d_v, dtype)
    ks = np.asfortranarray(k)  # the last axis is the slowest: rows are strided
    vs = np.ascontiguousarray(v[..., ::-1])[..., ::-1]  # negative column stride
    assert not ks.flags.c_contiguous and (d_v == 1 or vs.strides[-1] < 0)
    for w in (fastrope.Rotary(), fastrope.Rotary(layout="half"), None):
        out = check_forward(q, ks, vs, w, kind="rotary", max_pos=n_k, q_offset=n_k - 1)[0]
        np.testing.assert_array_equal(out, fastrope.attention(q, k, v, w, q_offset=n_k - 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_rows_as_the_gemm_path(rng, dtype):
    """A query answered in a call of 1 row (decode path) and inside a call of 9 rows (GEMM
    path) agrees to rounding."""
    n_k = 2000
    q, k, v = make_qkv(rng, (1, 4), 9, n_k, 64, 64, dtype)
    w = fastrope.Rotary(base=500000.0)
    many = fastrope.attention(q, k, v, w, causal=True, q_offset=n_k - 9)
    one = fastrope.attention(q[..., 4:5, :], k, v, w, causal=True, q_offset=n_k - 5)
    atol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(one[..., 0, :], many[..., 4, :], rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("w", [fastrope.Rotary(), None], ids=["rotary", "none"])
def test_non_finite_cache_entries(rng, name, bad, w):
    """The decode kernel checks k and v as it reads them: a NaN/Inf the step can see raises
    naming the array; one in a row no query can see (past the causal edge) does not matter."""
    n_k = 900
    q, k, v = make_qkv(rng, (2, 4), 1, n_k, 32, 32, np.float32, group=2)
    arrays = {"k": k, "v": v}
    arrays[name][1, 0, 123, 7] = bad
    what = "NaN" if np.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"^{name}: expected finite values, got {what}"):
        fastrope.attention(q, k, v, w, causal=True, q_offset=n_k - 1)
    # check_finite=False: no exception (the result is then undefined).
    fastrope.attention(q, k, v, w, causal=True, q_offset=n_k - 1, check_finite=False)
    # Only keys 0..122 are visible to a query at position 122: row 123 is never read.
    arrays[name][1, 0, 123, 7] = 0.0
    arrays[name][0, 1, 500:, :] = bad
    out = fastrope.attention(q, k, v, w, causal=True, q_offset=122)
    ref = fastrope.reference.attention(
        q, k[..., :123, :], v[..., :123, :], w, causal=True, q_offset=122
    )
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


def _column_major(x):
    """``x`` with the same values whose rows are not contiguous (the last axis strided)."""
    return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)


BLOCKW_ROPE = "blockw"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("w", ["rotary", None, BLOCKW_ROPE])
@pytest.mark.parametrize("layout", ["rows", "strided"])
@pytest.mark.parametrize("zero_q", [False, True], ids=["q", "zero_q"])
def test_non_finite_cache_entries_every_kernel_path(rng, dtype, name, bad, w, layout, zero_q):
    """Every way the decode kernel reads keys and values (in place, rotated, transformed by 2x2
    blocks, gathered from strided rows) reports a NaN/Inf it can see, in any lane and with any
    query (a zero query row too, whose scores see the key only through ``0 * Inf``)."""
    n_k, d = 200, 16
    q, k, v = make_qkv(rng, (2, 4), 1, n_k, d, 24, dtype, group=2)
    if zero_q:
        q[:] = 0.0
    if w == BLOCKW_ROPE:
        w = fastrope.BlockW(0.5 * rng.standard_normal((2 * n_k - 1, d // 2, 2, 2)).astype(dtype))
    elif w == "rotary":
        w = fastrope.Rotary()
    for lane in (0, 5, d - 1):
        kk, vv = k.copy(), v.copy()
        target = kk if name == "k" else vv
        target[1, 1, 70 + lane, min(lane, target.shape[-1] - 1)] = bad
        if layout == "strided":
            kk, vv = _column_major(kk), _column_major(vv)
        what = "NaN" if np.isnan(bad) else "Inf"
        with pytest.raises(ValueError, match=rf"^{name}: expected finite values, got {what}"):
            fastrope.attention(q, kk, vv, w, causal=True, q_offset=n_k - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["k", "v"])
def test_overflowing_scores_are_not_taken_for_non_finite_inputs(rng, dtype, name):
    """The check reads the scores and outputs, which overflow for huge finite inputs: that is
    not reported as a NaN/Inf in ``k`` or ``v``, and the output is the reference's."""
    n_k, d = 300, 16
    q, k, v = make_qkv(rng, (1, 2), 1, n_k, d, 16, dtype)
    big = 0.5 * float(np.finfo(dtype).max)
    if name == "k":
        k[0, 0, 10, :] = big  # its score overflows: it takes all the weight
        out = fastrope.attention(q, k, v, None, causal=True, q_offset=n_k - 1)
        assert np.isfinite(out[0, 1]).all()
    else:
        v[0, 0, 10:14, :] = big  # P V overflows where those keys carry weight
        out = fastrope.attention(q, k, v, None, causal=True, q_offset=n_k - 1)
        ref = fastrope.attention(q, k, v, None, causal=True, q_offset=n_k - 1, check_finite=False)
        np.testing.assert_array_equal(out, ref)


def test_method_fast_still_scans_every_row(rng):
    """Calls that may take the fast path keep the Python-side scan of all of k and v."""
    q, k, v = make_qkv(rng, (2,), 1, 300, 16, 16)
    k[0, 299, 0] = np.nan
    with pytest.raises(ValueError, match="^k: "):
        fastrope.attention(q, k, v, fastrope.Rotary(), 1e-3, causal=True, q_offset=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ROTARY_KINDS)
def test_rotated_cache_equals_rotary(rng, dtype, kind):
    """``Rotary.rotate`` is the rotation the core applies: a generation loop that keeps its cache
    rotated and attends with ``w=None`` gets Rotary attention (YaRN's attention factor too)."""
    w = make_w(kind, rng, 1, 32)
    n_k = 600
    q, k, v = make_qkv(rng, (2, 4), 2, n_k, 32, 16, dtype, group=2)
    kw = dict(causal=True, q_offset=n_k + 5 - 2, k_offset=5)
    want = fastrope.attention(q, k, v, w, **kw)
    cache = np.concatenate([w.rotate(k[..., :400, :], 5), w.rotate(k[..., 400:, :], 405)], -2)
    got = fastrope.attention(w.rotate(q, kw["q_offset"]), cache, v, None, **kw)
    atol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert w.rotate(q, 3).dtype == dtype


def test_rotate_rejects_bad_input():
    w = fastrope.Rotary()
    with pytest.raises(TypeError, match="^x: expected a float32 or float64 array"):
        w.rotate(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="^x: expected"):
        w.rotate(np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match="^position: expected an int"):
        w.rotate(np.zeros((2, 4)), 1.5)
    with pytest.raises(ValueError, match="even"):
        w.rotate(np.zeros((2, 5)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("lead", [(4,), ()], ids=["per-head", "shared"])
def test_table_w_steps_match_oracle(rng, dtype, kind, n_q, lead):
    """BlockW takes the decode path (keys transformed per query row by its δ's blocks, from the
    table itself; the heads of a GQA group sharing a table share the transform); SparseW and
    dense W a step through the GEMM path. Per-head or shared tables, GQA, a window and a bias."""
    n_k, d = 700, 16
    q, k, v = make_qkv(rng, (2, 4), n_q, n_k, d, 8, dtype, group=2)
    kw = dict(window=(500, 0), q_offset=n_k - n_q + 3, k_offset=3)
    L = needed_L(n_q, n_k, kw["q_offset"], kw["k_offset"])
    w = make_w(kind, rng, L, d, lead=lead, dtype=dtype)
    kw["bias"] = make_bias(rng, L).astype(dtype)
    check_forward(q, k, v, w, kind=kind, **kw)
