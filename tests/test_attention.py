"""Forward pass of fastrope.attention against the NumPy float64 oracle (fastrope.reference).

Tolerances follow the rule stated in conftest.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
from conftest import (
    DTYPES,
    EVEN_D_KINDS,
    ROTARY_KINDS,
    TABLE_KINDS,
    W_KINDS,
    assert_close,
    check_forward,
    make_bias,
    make_qkv,
    make_rng,
    make_w,
    max_abs,
    needed_L,
    tol,
)

import fastrope

# ------------------------------------------------------------------------------------------
# The main grid: every w form x both dtypes x a set of shape/mask/offset configurations
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    n_q: int
    n_k: int
    d: int
    d_v: int
    lead: tuple = ()
    group: int = 1
    causal: bool = False
    window: Optional[tuple] = None
    q_offset: Optional[int] = 0  # None: bottom-right, n_k - n_q
    k_offset: int = 0
    w_lead: str = "none"  # "none", "heads", "full", "bcast" (leading 1s)
    bias: str = "none"  # "none", "alibi" (per head), "full", "shared" (no lead dims)
    scale: Optional[float] = None
    extra_L: int = 0


CASES = [
    Case("1x257", 1, 257, 16, 16, lead=(2,)),
    Case("257x1", 257, 1, 16, 8, lead=(2,), causal=True),
    Case(
        "7x13_gqa2_br",
        7,
        13,
        8,
        8,
        lead=(2, 4),
        group=2,
        causal=True,
        q_offset=None,
        w_lead="heads",
        bias="alibi",
    ),
    Case(
        "13x7_neg_off",
        13,
        7,
        8,
        5,
        lead=(3,),
        q_offset=-20,
        k_offset=3,
        w_lead="full",
        bias="full",
        extra_L=4,
    ),
    Case(
        "64x130_window_bias",
        64,
        130,
        8,
        1,
        lead=(2,),
        window=(5, 3),
        q_offset=40,
        bias="shared",
        w_lead="bcast",
    ),
    Case(
        "130x64_batch2_gqa4",
        130,
        64,
        16,
        24,
        lead=(2, 3, 4),
        group=4,
        causal=True,
        q_offset=None,
        w_lead="bcast",
        bias="alibi",
        scale=0.2,
    ),
    Case("13x13_2d", 13, 13, 8, 3, window=(None, 2), k_offset=7),
    Case(
        "300x300_causal_window",
        300,
        300,
        8,
        3,
        lead=(2,),
        causal=True,
        window=(100, 0),
        bias="full",
        w_lead="heads",
    ),
    Case(
        "257x130_gqa2",
        257,
        130,
        4,
        6,
        lead=(1, 4),
        group=2,
        q_offset=-50,
        causal=True,
        window=(60, None),
        w_lead="heads",
    ),
    Case(
        "empty_rows", 20, 30, 8, 4, lead=(2,), causal=True, q_offset=-10, k_offset=0, bias="alibi"
    ),
]


def _lead_for(spec: str, lead: tuple) -> tuple:
    if spec == "none" or not lead:
        return ()
    if spec == "heads":
        return (lead[-1],)
    if spec == "full":
        return lead
    if spec == "bcast":
        return (1,) * (len(lead) - 1) + (lead[-1],) if len(lead) > 1 else (1,)
    raise ValueError(spec)


def build(case: Case, kind: str, dtype, seed: int = 0):
    rng = make_rng(seed)
    q, k, v = make_qkv(rng, case.lead, case.n_q, case.n_k, case.d, case.d_v, dtype, case.group)
    q_offset = case.n_k - case.n_q if case.q_offset is None else case.q_offset
    L = needed_L(case.n_q, case.n_k, q_offset, case.k_offset, case.extra_L)
    w = make_w(kind, rng, L, case.d, _lead_for(case.w_lead, case.lead), dtype)
    bias = None
    if case.bias == "alibi":
        bias = fastrope.alibi(case.lead[-1], L) if case.lead else fastrope.alibi(1, L)[0]
    elif case.bias == "full":
        bias = make_bias(rng, L, case.lead)
    elif case.bias == "shared":
        bias = make_bias(rng, L)
    kw = dict(
        causal=case.causal,
        window=case.window,
        bias=bias,
        q_offset=q_offset,
        k_offset=case.k_offset,
        scale=case.scale,
    )
    max_pos = max(abs(q_offset) + case.n_q, abs(case.k_offset) + case.n_k)
    return q, k, v, w, kw, max_pos


def _grid():
    for case in CASES:
        for kind in W_KINDS:
            if case.d % 2 and kind in EVEN_D_KINDS:
                continue
            for dtype in DTYPES:
                yield pytest.param(
                    case, kind, dtype, id=f"{case.name}-{kind}-{np.dtype(dtype).name}"
                )


@pytest.mark.parametrize(("case", "kind", "dtype"), list(_grid()))
def test_forward_grid(case: Case, kind: str, dtype) -> None:
    q, k, v, w, kw, max_pos = build(case, kind, dtype)
    out, lse = check_forward(
        q, k, v, w, kind=kind, max_pos=max_pos if kind in ROTARY_KINDS else 0, **kw
    )
    assert out.shape == q.shape[:-1] + (case.d_v,)
    assert lse.shape == q.shape[:-1]
    assert np.isfinite(out).all()
    # return_lse=False returns the same out alone
    out2 = fastrope.attention(q, k, v, w, **kw)
    assert isinstance(out2, np.ndarray)
    np.testing.assert_array_equal(out2, out)


def test_grid_exercises_empty_rows() -> None:
    """The 'empty_rows' case really has rows with no visible key (guards the grid itself)."""
    case = next(c for c in CASES if c.name == "empty_rows")
    q, k, v, w, kw, _ = build(case, "rotary", np.float64)
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    assert np.isneginf(lse).any() and np.isfinite(lse).any()
    assert (out[np.isneginf(lse)] == 0).all()


# ------------------------------------------------------------------------------------------
# Sizes: odd/prime, n_q != n_k, several tiles, partially masked tiles
# ------------------------------------------------------------------------------------------

SIZES = (1, 7, 13, 64, 130, 257)


@pytest.mark.parametrize("n_q", SIZES)
@pytest.mark.parametrize("n_k", SIZES)
def test_sizes_rotary_causal_bottom_right(n_q: int, n_k: int) -> None:
    rng = make_rng(n_q * 1000 + n_k)
    q, k, v = make_qkv(rng, (2,), n_q, n_k, 16, 16, np.float64)
    check_forward(q, k, v, fastrope.Rotary(), kind="rotary", causal=True, q_offset=n_k - n_q)


@pytest.mark.parametrize("n_q", (7, 130, 257))
@pytest.mark.parametrize("n_k", (1, 64, 257))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sizes_sparse_window(n_q: int, n_k: int, dtype) -> None:
    rng = make_rng(n_q * 7 + n_k)
    q, k, v = make_qkv(rng, (), n_q, n_k, 6, 5, dtype)
    L = needed_L(n_q, n_k, 3, 0)
    w = make_w("sparse", rng, L, 6, (), dtype)
    check_forward(q, k, v, w, kind="sparse", window=(31, 17), q_offset=3)


@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tile_causal_window(kind: str, dtype) -> None:
    """n = 300 > the 64 x 128 tile: several tiles, partially masked tiles, skipped tiles."""
    rng = make_rng(3)
    n, d = 300, 8
    q, k, v = make_qkv(rng, (2,), n, n, d, 7, dtype)
    L = needed_L(n, n)
    w = make_w(kind, rng, L, d, (), dtype)
    check_forward(q, k, v, w, kind=kind, causal=True, window=(77, 0), bias=make_bias(rng, L))
    check_forward(q, k, v, w, kind=kind, window=(5, 130))


# ------------------------------------------------------------------------------------------
# Rows with no visible key
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ("rotary", "block", "dense"))
def test_rows_without_visible_key(kind: str, dtype) -> None:
    rng = make_rng(5)
    n_q, n_k, d = 9, 11, 8
    q, k, v = make_qkv(rng, (2,), n_q, n_k, d, 3, dtype)
    L = needed_L(n_q, n_k, -5, 0)
    w = make_w(kind, rng, L, d, (), dtype)
    # causal with q_offset=-5: query i sees keys j <= i - 5, rows 0..4 see nothing
    out, lse = check_forward(q, k, v, w, kind=kind, causal=True, q_offset=-5)
    assert np.isneginf(lse[:, :5]).all() and np.isfinite(lse[:, 5:]).all()
    assert (out[:, :5] == 0).all()
    # a window that hides everything: all rows empty (no table rows needed at all)
    out, lse = fastrope.attention(q, k, v, w, window=(0, 0), q_offset=50, return_lse=True)
    assert np.isneginf(lse).all() and (out == 0).all() and out.dtype == np.dtype(dtype)
    # a bias of -inf on every δ masks everything too
    bias = np.full(2 * L - 1, -np.inf)
    out, lse = fastrope.attention(q, k, v, w, bias=bias, return_lse=True)
    assert np.isneginf(lse).all() and (out == 0).all()
    # -inf on some δ only: matches the oracle
    bias = make_bias(rng, L)
    bias[::3] = -np.inf
    check_forward(q, k, v, w, kind=kind, bias=bias)


# ------------------------------------------------------------------------------------------
# Broadcasting of per-head w and bias; batch dims of rank 2; 2-D inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize(
    "w_lead", [(), (4,), (1, 4), (3, 1), (3, 4), (2, 1, 1), (2, 3, 4), (1, 1, 1)]
)
def test_per_head_w_broadcasting(kind: str, w_lead: tuple) -> None:
    rng = make_rng(11)
    lead = (2, 3, 4)
    q, k, v = make_qkv(rng, lead, 10, 12, 4, 3, np.float64, group=2)
    L = needed_L(10, 12)
    w = make_w(kind, rng, L, 4, w_lead)
    check_forward(q, k, v, w, kind=kind, causal=True, q_offset=2)


@pytest.mark.parametrize("b_lead", [(), (4,), (1, 4), (3, 1), (2, 3, 4), (2, 1, 4)])
def test_bias_broadcasting(b_lead: tuple) -> None:
    rng = make_rng(12)
    lead = (2, 3, 4)
    q, k, v = make_qkv(rng, lead, 10, 12, 8, 3, np.float64, group=4)
    L = needed_L(10, 12, extra=3)
    bias = make_bias(rng, L, b_lead)
    check_forward(q, k, v, fastrope.Rotary(), kind="rotary", bias=bias)


def test_alibi_matches_hand_written() -> None:
    rng = make_rng(13)
    H, n, d = 4, 17, 8
    q, k, v = make_qkv(rng, (H,), n, n, d, d, np.float64)
    bias = fastrope.alibi(H, n)
    slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d) - slopes[:, None, None] * np.abs(i - j)
    s = np.where(i >= j, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v
    # a W of identities at every δ is plain dot-product attention
    w = np.broadcast_to(np.eye(d), (2 * n - 1, d, d))
    out = fastrope.attention(q, k, v, w, causal=True, bias=bias)
    assert_close(out, expected, 1e-12, "alibi")


def test_two_d_inputs_all_kinds() -> None:
    rng = make_rng(14)
    for kind in W_KINDS:
        q, k, v = make_qkv(rng, (), 19, 23, 8, 2, np.float64)
        w = make_w(kind, rng, needed_L(19, 23), 8)
        out, lse = check_forward(q, k, v, w, kind=kind, causal=True, q_offset=4)
        assert out.shape == (19, 2) and lse.shape == (19,)


# ------------------------------------------------------------------------------------------
# Head dims: d_v = 1, d_v != d, odd d for sparse/dense, custom scale
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "d_v", "kind"),
    [
        (2, 1, "rotary"),
        (64, 1, "rotary_half"),
        (16, 40, "block"),
        (5, 1, "sparse"),
        (3, 9, "dense"),
        (1, 2, "dense"),
        (128, 64, "rotary"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(d: int, d_v: int, kind: str, dtype) -> None:
    rng = make_rng(d * 31 + d_v)
    q, k, v = make_qkv(rng, (2,), 33, 47, d, d_v, dtype)
    w = make_w(kind, rng, needed_L(33, 47), d, (), dtype)
    check_forward(q, k, v, w, kind=kind, causal=True, q_offset=14)


@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, -0.7])
def test_custom_scale(scale: float) -> None:
    rng = make_rng(15)
    q, k, v = make_qkv(rng, (2,), 21, 21, 8, 4, np.float64)
    for kind in ("rotary", "sparse"):
        w = make_w(kind, rng, 21, 8)
        check_forward(q, k, v, w, kind=kind, scale=scale, causal=True)


def test_scale_zero_is_uniform_average() -> None:
    rng = make_rng(16)
    q, k, v = make_qkv(rng, (), 6, 9, 4, 3, np.float64)
    out = fastrope.attention(q, k, v, fastrope.Rotary(), scale=0.0)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(0), out.shape), atol=1e-14)


def test_all_zero_dense_w() -> None:
    rng = make_rng(17)
    q, k, v = make_qkv(rng, (2,), 12, 12, 4, 3, np.float64)
    w = np.zeros((23, 4, 4))
    out = check_forward(q, k, v, w, kind="dense", causal=True)[0]
    expected = np.cumsum(v, axis=-2) / np.arange(1, 13)[:, None]
    np.testing.assert_allclose(out, expected, atol=1e-14)


def test_sparse_w_empty_support() -> None:
    """|S| = 0 is W_δ = 0 for every δ: scores are 0 (plus bias), as in the oracle."""
    rng = make_rng(18)
    q, k, v = make_qkv(rng, (2,), 12, 12, 4, 3, np.float64)
    w = fastrope.SparseW(np.zeros((0, 2), dtype=np.int64), np.zeros((23, 0)))
    check_forward(q, k, v, w, kind="sparse", causal=True)


# ------------------------------------------------------------------------------------------
# Offsets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_offset", "k_offset"), [(0, 0), (5, 0), (0, 5), (-17, 0), (3, -40), (100, 97)]
)
@pytest.mark.parametrize("kind", ("rotary", "rotary_half", "block", "sparse", "dense"))
def test_offsets(q_offset: int, k_offset: int, kind: str) -> None:
    rng = make_rng(19)
    q, k, v = make_qkv(rng, (2,), 15, 22, 8, 4, np.float64)
    w = make_w(kind, rng, needed_L(15, 22, q_offset, k_offset), 8)
    check_forward(
        q, k, v, w, kind=kind, q_offset=q_offset, k_offset=k_offset, causal=True, max_pos=150
    )


def test_only_relative_offset_matters_for_tables() -> None:
    rng = make_rng(20)
    q, k, v = make_qkv(rng, (2,), 15, 22, 8, 4, np.float64)
    for kind in ("block", "sparse", "dense"):
        w = make_w(kind, rng, needed_L(15, 22, 7, 0), 8)
        a = fastrope.attention(q, k, v, w, q_offset=7, k_offset=0, causal=True)
        b = fastrope.attention(q, k, v, w, q_offset=1007, k_offset=1000, causal=True)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ("interleaved", "half"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", (10**6, -(10**6) + 3))
def test_large_offset_rotary(layout: str, dtype, offset: int) -> None:
    rng = make_rng(21)
    q, k, v = make_qkv(rng, (2,), 40, 50, 64, 16, dtype)
    w = fastrope.Rotary(layout=layout)
    check_forward(
        q,
        k,
        v,
        w,
        kind="rotary",
        q_offset=offset,
        k_offset=offset - 10,
        causal=True,
        max_pos=abs(offset) + 60,
    )


# ------------------------------------------------------------------------------------------
# Rotary == "rotate q and k, then plain softmax attention"
# ------------------------------------------------------------------------------------------


def _theta(d: int, base: float) -> np.ndarray:
    return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def rotate_interleaved(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """RoFormer / Meta Llama: pair (2m, 2m+1) rotated by pos * theta_m (as complex numbers)."""
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    xc = xc * np.exp(1j * np.outer(pos, theta))
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = xc.real, xc.imag
    return out


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotate_hf(x: np.ndarray, pos: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Hugging Face apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, emb = cat(f, f)."""
    freqs = np.outer(pos, theta)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def plain_attention(q, k, v, mask, scale):
    s = scale * q @ np.swapaxes(k, -1, -2)
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    tot = p.sum(-1, keepdims=True)
    return (p @ v) / np.where(tot == 0, 1, tot)


@pytest.mark.parametrize("layout", ("interleaved", "half"))
@pytest.mark.parametrize(
    ("n_q", "n_k", "q_offset", "k_offset"),
    [(13, 13, 0, 0), (7, 64, 57, 0), (70, 130, 3, 11), (130, 7, -4, 9)],
)
@pytest.mark.parametrize("base", (10000.0, 500000.0))
def test_rotary_equals_rotate_then_softmax(layout, n_q, n_k, q_offset, k_offset, base) -> None:
    rng = make_rng(n_q + n_k + q_offset)
    d = 32
    q, k, v = make_qkv(rng, (3,), n_q, n_k, d, 8, np.float64)
    theta = _theta(d, base)
    pq, pk = q_offset + np.arange(n_q), k_offset + np.arange(n_k)
    rot = rotate_interleaved if layout == "interleaved" else rotate_hf
    qr, kr = rot(q, pq, theta), rot(k, pk, theta)
    for causal in (False, True):
        mask = (pq[:, None] - pk[None, :] >= 0) if causal else np.ones((n_q, n_k), bool)
        expected = plain_attention(qr, kr, v, mask, 1 / math.sqrt(d))
        out = fastrope.attention(
            q,
            k,
            v,
            fastrope.Rotary(base=base, layout=layout),
            causal=causal,
            q_offset=q_offset,
            k_offset=k_offset,
        )
        assert_close(out, expected, 1e-12, f"{layout} causal={causal}")


def test_rotary_scaling_linear_equals_rotate_at_scaled_positions() -> None:
    rng = make_rng(22)
    d, n = 16, 40
    q, k, v = make_qkv(rng, (2,), n, n, d, 4, np.float64)
    theta = _theta(d, 10000.0) / 4.0
    pos = np.arange(n)
    expected = plain_attention(
        rotate_hf(q, pos, theta),
        rotate_hf(k, pos, theta),
        v,
        np.ones((n, n), bool),
        1 / math.sqrt(d),
    )
    w = fastrope.Rotary(layout="half", scaling={"rope_type": "linear", "factor": 4.0})
    assert_close(fastrope.attention(q, k, v, w), expected, 1e-12, "linear scaling")


def test_rotary_yarn_attention_factor_scales_scores() -> None:
    rng = make_rng(23)
    d, n = 16, 30
    q, k, v = make_qkv(rng, (2,), n, n, d, 4, np.float64)
    w = fastrope.Rotary(layout="half", scaling=dict(YARN_LOCAL))
    theta, f = w.frequencies(d, n - 1)
    assert f != 1.0
    pos = np.arange(n)
    expected = plain_attention(
        f * rotate_hf(q, pos, theta),
        f * rotate_hf(k, pos, theta),
        v,
        np.ones((n, n), bool),
        1 / math.sqrt(d),
    )
    assert_close(fastrope.attention(q, k, v, w), expected, 1e-12, "yarn")


YARN_LOCAL = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}


# ------------------------------------------------------------------------------------------
# Determinism: threads and repeated calls
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_bitwise_identical(kind: str, dtype) -> None:
    rng = make_rng(24)
    q, k, v = make_qkv(rng, (2, 4), 200, 260, 16, 8, dtype, group=2)
    L = needed_L(200, 260, 60)
    w = make_w(kind, rng, L, 16, (4,), dtype)
    kw = dict(causal=True, q_offset=60, bias=fastrope.alibi(4, L), return_lse=True)
    o1, lse1 = fastrope.attention(q, k, v, w, num_threads=1, **kw)
    o2, lse2 = fastrope.attention(q, k, v, w, num_threads=2, **kw)
    o3, lse3 = fastrope.attention(q, k, v, w, **kw)
    o4, lse4 = fastrope.attention(q, k, v, w, num_threads=1, **kw)
    for o, lse in ((o2, lse2), (o3, lse3), (o4, lse4)):
        np.testing.assert_array_equal(o, o1)
        np.testing.assert_array_equal(lse, lse1)


# ------------------------------------------------------------------------------------------
# Memory layouts: non-contiguous, negative strides, Fortran order, read-only
# ------------------------------------------------------------------------------------------


def _layouts(x: np.ndarray, rng: np.random.Generator) -> dict:
    """The same values as ``x`` in several memory layouts."""
    out = {}
    # transposed storage: (..., d, n) swapped to (..., n, d)
    out["transposed"] = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    # negative strides on the two last axes
    out["negative"] = np.ascontiguousarray(x[..., ::-1, ::-1])[..., ::-1, ::-1]
    out["fortran"] = np.asfortranarray(x)
    # a strided slice of a larger buffer
    big = rng.standard_normal(x.shape[:-1] + (3 * x.shape[-1] + 1,)).astype(x.dtype)
    big[..., 1::3] = x
    out["sliced"] = big[..., 1::3]
    ro = x.copy()
    ro.setflags(write=False)
    out["readonly"] = ro
    # heads/batch axes permuted in storage
    if x.ndim >= 3:
        out["lead_permuted"] = np.ascontiguousarray(np.moveaxis(x, 0, -1)).transpose(
            (x.ndim - 1,) + tuple(range(x.ndim - 1))
        )
    return out


@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(kind: str, dtype) -> None:
    rng = make_rng(25)
    q, k, v = make_qkv(rng, (2, 2), 70, 90, 8, 6, dtype, group=2)
    L = needed_L(70, 90, 20)
    w = make_w(kind, rng, L, 8, (2,), dtype)
    bias = make_bias(rng, L, (2,))
    kw = dict(causal=True, q_offset=20, bias=bias, return_lse=True)
    o_ref, lse_ref = fastrope.attention(q, k, v, w, **kw)
    check_forward(q, k, v, w, kind=kind, causal=True, q_offset=20, bias=bias)
    for name in ("q", "k", "v"):
        base = {"q": q, "k": k, "v": v}[name]
        for lay, arr in _layouts(base, rng).items():
            np.testing.assert_array_equal(arr, base)
            args = {"q": q, "k": k, "v": v, name: arr}
            o, lse = fastrope.attention(args["q"], args["k"], args["v"], w, **kw)
            np.testing.assert_array_equal(o, o_ref, err_msg=f"{name} {lay}")
            np.testing.assert_array_equal(lse, lse_ref, err_msg=f"{name} {lay}")
    # tables and bias in other layouts
    for lay, barr in _layouts(bias, rng).items():
        o, lse = fastrope.attention(
            q, k, v, w, causal=True, q_offset=20, bias=barr, return_lse=True
        )
        np.testing.assert_array_equal(o, o_ref, err_msg=f"bias {lay}")
        np.testing.assert_array_equal(lse, lse_ref, err_msg=f"bias {lay}")
    table = {"block": lambda w: w.blocks, "sparse": lambda w: w.values, "dense": lambda w: w}
    if kind in table:
        t = table[kind](w)
        for lay, tarr in _layouts(t, rng).items():
            if kind == "block":
                w2 = fastrope.BlockW(tarr, layout=w.layout)
            elif kind == "sparse":
                w2 = fastrope.SparseW(w.support, tarr)
            else:
                w2 = tarr
            o, lse = fastrope.attention(q, k, v, w2, **kw)
            np.testing.assert_array_equal(o, o_ref, err_msg=f"w {lay}")
            np.testing.assert_array_equal(lse, lse_ref, err_msg=f"w {lay}")


def test_all_inputs_readonly_and_not_modified() -> None:
    rng = make_rng(26)
    q, k, v = make_qkv(rng, (2,), 30, 30, 8, 4, np.float64)
    w = make_w("block", rng, 30, 8)
    bias = make_bias(rng, 30)
    copies = [x.copy() for x in (q, k, v, w.blocks, bias)]
    for x in (q, k, v, w.blocks, bias):
        x.setflags(write=False)
    check_forward(q, k, v, w, kind="block", bias=bias, causal=True)
    for x, c in zip((q, k, v, w.blocks, bias), copies):
        np.testing.assert_array_equal(x, c)


def test_list_inputs_accepted() -> None:
    rng = make_rng(27)
    q, k, v = make_qkv(rng, (), 5, 6, 4, 2, np.float64)
    a = fastrope.attention(q.tolist(), k.tolist(), v.tolist(), fastrope.Rotary())
    np.testing.assert_array_equal(a, fastrope.attention(q, k, v, fastrope.Rotary()))


def test_mixed_table_dtype_is_cast() -> None:
    """float64 tables/bias with float32 q, k, v: output float32, close to the oracle."""
    rng = make_rng(28)
    q, k, v = make_qkv(rng, (2,), 40, 40, 8, 4, np.float32)
    for kind in TABLE_KINDS:
        w = make_w(kind, rng, 40, 8, (), np.float64)
        out, lse = check_forward(q, k, v, w, kind=kind, bias=make_bias(rng, 40), causal=True)
        assert out.dtype == np.float32 and lse.dtype == np.float32


def test_method_exact_and_auto_agree() -> None:
    rng = make_rng(29)
    q, k, v = make_qkv(rng, (2,), 30, 30, 8, 4, np.float64)
    for kind in ("rotary", "sparse"):
        w = make_w(kind, rng, 30, 8)
        a = fastrope.attention(q, k, v, w, method="exact")
        b = fastrope.attention(q, k, v, w, method="auto")
        c = fastrope.attention(q, k, v, w, 1e-3, method="auto")
        np.testing.assert_array_equal(a, b)
        assert max_abs(c - a) <= 1e-3
        assert max_abs(c - fastrope.reference.attention(q, k, v, w)) <= 1e-3 + tol(
            np.float64, n_terms=16, n_k=30, vmax=max_abs(v)
        )
