"""Backward pass: fastrope.attention_grad against the oracle and against finite differences.

Tolerances follow the rule stated in conftest.py (gradients: relative to max|reference|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
from conftest import (
    DTYPES,
    EVEN_D_KINDS,
    TABLE_KINDS,
    W_KINDS,
    check_grad,
    make_bias,
    make_qkv,
    make_rng,
    make_w,
    needed_L,
)

import fastrope


@dataclass(frozen=True)
class GCase:
    name: str
    n_q: int
    n_k: int
    d: int
    d_v: int
    lead: tuple = ()
    group: int = 1
    causal: bool = False
    window: Optional[tuple] = None
    q_offset: Optional[int] = 0  # None: bottom-right
    k_offset: int = 0
    w_lead: tuple = ()
    bias_lead: Optional[tuple] = None  # None: no bias


GCASES = [
    GCase("2d_plain", 9, 13, 8, 8),
    GCase(
        "gqa2_causal_br_bias",
        7,
        12,
        8,
        5,
        lead=(2, 4),
        group=2,
        causal=True,
        q_offset=None,
        w_lead=(4,),
        bias_lead=(4,),
    ),
    GCase(
        "gqa4_window_offsets",
        21,
        17,
        4,
        3,
        lead=(4,),
        group=4,
        window=(6, 2),
        q_offset=5,
        k_offset=-3,
        w_lead=(1,),
        bias_lead=(),
    ),
    GCase(
        "batch2_bcast",
        13,
        13,
        6,
        1,
        lead=(2, 3, 2),
        group=2,
        causal=True,
        w_lead=(3, 1),
        bias_lead=(2, 1, 2),
    ),
    GCase(
        "empty_rows", 10, 12, 8, 4, lead=(2,), causal=True, q_offset=-4, w_lead=(2,), bias_lead=(2,)
    ),
]


def gbuild(case: GCase, kind: str, dtype, seed: int = 1):
    rng = make_rng(seed)
    q, k, v = make_qkv(rng, case.lead, case.n_q, case.n_k, case.d, case.d_v, dtype, case.group)
    q_offset = case.n_k - case.n_q if case.q_offset is None else case.q_offset
    L = needed_L(case.n_q, case.n_k, q_offset, case.k_offset, extra=2)
    w = make_w(kind, rng, L, case.d, case.w_lead, dtype)
    bias = None if case.bias_lead is None else make_bias(rng, L, case.bias_lead).astype(dtype)
    dout = rng.standard_normal(q.shape[:-1] + (case.d_v,)).astype(dtype)
    kw = dict(
        causal=case.causal, window=case.window, bias=bias, q_offset=q_offset, k_offset=case.k_offset
    )
    return q, k, v, w, dout, kw


def _ggrid():
    for case in GCASES:
        for kind in W_KINDS:
            if case.d % 2 and kind in EVEN_D_KINDS:
                continue
            for dtype in DTYPES:
                yield pytest.param(
                    case, kind, dtype, id=f"{case.name}-{kind}-{np.dtype(dtype).name}"
                )


@pytest.mark.parametrize(("case", "kind", "dtype"), list(_ggrid()))
def test_grad_grid(case: GCase, kind: str, dtype) -> None:
    q, k, v, w, dout, kw = gbuild(case, kind, dtype)
    g, rg = check_grad(q, k, v, w, dout, kind=kind, **kw)
    if kind in TABLE_KINDS:
        stored = {
            "block": lambda: w.blocks,
            "block_half": lambda: w.blocks,
            "sparse": lambda: w.values,
            "dense": lambda: w,
        }[kind]()
        assert g.dw.shape == np.shape(stored)
    else:
        assert g.dw is None
    if kw["bias"] is None:
        assert g.dbias is None
    else:
        assert g.dbias.shape == kw["bias"].shape


@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_multi_tile(kind: str, dtype) -> None:
    """n ~ 200-300: several key/query tiles, partially masked and skipped tiles."""
    rng = make_rng(2)
    n_q, n_k, d = 230, 290, 8
    q, k, v = make_qkv(rng, (2,), n_q, n_k, d, 5, dtype, group=2)
    L = needed_L(n_q, n_k, n_k - n_q)
    w = make_w(kind, rng, L, d, (1,), dtype)
    bias = make_bias(rng, L, (2,)).astype(dtype)
    dout = rng.standard_normal((2, n_q, 5)).astype(dtype)
    check_grad(
        q, k, v, w, dout, kind=kind, causal=True, window=(90, None), q_offset=n_k - n_q, bias=bias
    )


@pytest.mark.parametrize("kind", ("rotary_half", "block_half", "sparse"))
def test_grad_multi_tile_no_mask(kind: str) -> None:
    rng = make_rng(3)
    n_q, n_k, d = 257, 130, 4
    q, k, v = make_qkv(rng, (), n_q, n_k, d, 3, np.float64)
    w = make_w(kind, rng, needed_L(n_q, n_k, -20), d)
    dout = rng.standard_normal((n_q, 3))
    check_grad(q, k, v, w, dout, kind=kind, q_offset=-20)


def test_gqa_dk_dv_summed_over_group() -> None:
    """dk/dv with GQA equal the sums over each group of the repeated-heads gradients."""
    rng = make_rng(4)
    q, k, v = make_qkv(rng, (2, 4), 11, 14, 8, 3, np.float64, group=4)
    w = make_w("block", rng, needed_L(11, 14), 8)
    dout = rng.standard_normal((2, 4, 11, 3))
    g = fastrope.attention_grad(q, k, v, w, dout, causal=True)
    kr, vr = np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1)
    gr = fastrope.attention_grad(q, kr, vr, w, dout, causal=True)
    assert g.dk.shape == k.shape and g.dv.shape == v.shape
    np.testing.assert_allclose(g.dk, gr.dk.reshape(2, 1, 4, 14, 8).sum(2), atol=1e-13)
    np.testing.assert_allclose(g.dv, gr.dv.reshape(2, 1, 4, 14, 3).sum(2), atol=1e-13)
    np.testing.assert_allclose(g.dq, gr.dq, atol=1e-13)
    np.testing.assert_allclose(g.dw, gr.dw, atol=1e-12)


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_dw_summed_over_broadcast_dims(kind: str) -> None:
    """A shared table's dw is the sum of the per-head dws of the same table repeated per head."""
    rng = make_rng(5)
    lead = (2, 3)
    q, k, v = make_qkv(rng, lead, 9, 10, 4, 2, np.float64)
    L = needed_L(9, 10)
    w = make_w(kind, rng, L, 4, (1, 3))
    bias = make_bias(rng, L, (3,))
    dout = rng.standard_normal(lead + (9, 2))
    g = fastrope.attention_grad(q, k, v, w, dout, bias=bias, causal=True)
    if kind == "dense":
        w_full = np.broadcast_to(w, lead + w.shape[-3:]).copy()
    elif kind.startswith("block"):
        w_full = fastrope.BlockW(
            np.broadcast_to(w.blocks, lead + w.blocks.shape[-4:]).copy(), w.layout
        )
    else:
        w_full = fastrope.SparseW(
            w.support, np.broadcast_to(w.values, lead + w.values.shape[-2:]).copy()
        )
    b_full = np.broadcast_to(bias, lead + bias.shape[-1:]).copy()
    gf = fastrope.attention_grad(q, k, v, w_full, dout, bias=b_full, causal=True)
    np.testing.assert_allclose(g.dw, gf.dw.sum(axis=0, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(g.dbias, gf.dbias.sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(g.dq, gf.dq, atol=1e-13)


@pytest.mark.parametrize("kind", ("rotary", "block", "sparse", "dense"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_passing_out_lse_gives_same_result(kind: str, dtype) -> None:
    rng = make_rng(6)
    q, k, v = make_qkv(rng, (2, 2), 70, 150, 8, 4, dtype)
    L = needed_L(70, 150, 80)
    w = make_w(kind, rng, L, 8, (), dtype)
    bias = make_bias(rng, L, (2,)).astype(dtype)
    kw = dict(causal=True, q_offset=80, bias=bias, window=(40, 0))
    out, lse = fastrope.attention(q, k, v, w, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    g1 = fastrope.attention_grad(q, k, v, w, dout, **kw)
    g2 = fastrope.attention_grad(q, k, v, w, dout, out=out, lse=lse, **kw)
    for name, a, b in zip(g1._fields, g1, g2):
        if a is None:
            assert b is None, name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("kind", ("rotary", "block", "dense"))
def test_backward_deterministic_for_a_thread_count(kind: str) -> None:
    """docs/DESIGN.md §6: deterministic for a given thread count (across counts: rounding only)."""
    rng = make_rng(7)
    q, k, v = make_qkv(rng, (2, 2), 150, 200, 8, 4, np.float64)
    L = needed_L(150, 200)
    w = make_w(kind, rng, L, 8)
    bias = make_bias(rng, L, (2,))
    dout = rng.standard_normal(q.shape[:-1] + (4,))
    by_threads = {}
    for nt in (1, 2):
        a = fastrope.attention_grad(q, k, v, w, dout, bias=bias, causal=True, num_threads=nt)
        b = fastrope.attention_grad(q, k, v, w, dout, bias=bias, causal=True, num_threads=nt)
        for name, x, y in zip(a._fields, a, b):
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=f"{name} threads={nt}")
        by_threads[nt] = a
    for name, x, y in zip(by_threads[1]._fields, by_threads[1], by_threads[2]):
        if x is not None:
            np.testing.assert_allclose(
                x, y, rtol=0, atol=1e-12 * max(1.0, np.abs(x).max()), err_msg=name
            )


def test_empty_rows_have_zero_gradients() -> None:
    rng = make_rng(8)
    q, k, v = make_qkv(rng, (2,), 8, 10, 8, 3, np.float64)
    L = needed_L(8, 10, -3)
    w = make_w("block", rng, L, 8)
    bias = make_bias(rng, L)
    dout = rng.standard_normal((2, 8, 3))
    g = fastrope.attention_grad(q, k, v, w, dout, causal=True, q_offset=-3, bias=bias)
    for x in g:
        assert np.isfinite(x).all()
    assert (g.dq[:, :3] == 0).all()
    # everything masked by a -inf bias: all gradients zero, no NaN
    g = fastrope.attention_grad(q, k, v, w, dout, bias=np.full(2 * L - 1, -np.inf))
    for name, x in zip(g._fields, g):
        assert np.isfinite(x).all() and (x == 0).all(), name
    # and by a window that hides every pair
    g = fastrope.attention_grad(q, k, v, w, dout, window=(0, 0), q_offset=100)
    for name, x in zip(g._fields, g):
        if x is not None:
            assert (x == 0).all(), name


def test_grad_d_v_zero_and_empty_sequences() -> None:
    rng = make_rng(9)
    q, k, v = make_qkv(rng, (2,), 5, 6, 4, 3, np.float64)
    w = make_w("dense", rng, 6, 4)
    g = fastrope.attention_grad(q, k, v[..., :0], w, np.zeros((2, 5, 0)))
    assert g.dv.shape == (2, 6, 0)
    for name, x in zip(g._fields, g):
        if x is not None:
            assert (x == 0).all(), name
    g = fastrope.attention_grad(q[:, :0], k, v, w, np.zeros((2, 0, 3)))
    assert g.dq.shape == (2, 0, 4) and (g.dk == 0).all() and (g.dv == 0).all() and (g.dw == 0).all()
    g = fastrope.attention_grad(q, k[:, :0], v[:, :0], w, rng.standard_normal((2, 5, 3)))
    assert g.dk.shape == (2, 0, 4) and (g.dq == 0).all() and (g.dw == 0).all()


# ------------------------------------------------------------------------------------------
# Finite differences, float64, directly on fastrope.attention
# ------------------------------------------------------------------------------------------


def _fd(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + h
        fp = f()
        x[idx] = old - h
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("kind", ("block", "block_half", "dense", "sparse", "rotary"))
def test_finite_differences(kind: str) -> None:
    rng = make_rng(10)
    lead = (2,)
    n_q, n_k, d, d_v = 4, 5, 4, 3
    q, k, v = make_qkv(rng, lead, n_q, n_k, d, d_v, np.float64, group=2)
    L = needed_L(n_q, n_k, 1)
    w = make_w(kind, rng, L, d, (2,))
    bias = make_bias(rng, L, (2,))
    dout = rng.standard_normal(lead + (n_q, d_v))
    kw = dict(causal=True, q_offset=1, bias=bias, window=(3, None))

    def f() -> float:
        return float(np.sum(fastrope.attention(q, k, v, w, **kw) * dout))

    g = fastrope.attention_grad(q, k, v, w, dout, **kw)
    atol = 1e-8
    np.testing.assert_allclose(g.dq, _fd(f, q), atol=atol, err_msg="dq")
    np.testing.assert_allclose(g.dk, _fd(f, k), atol=atol, err_msg="dk")
    np.testing.assert_allclose(g.dv, _fd(f, v), atol=atol, err_msg="dv")
    np.testing.assert_allclose(g.dbias, _fd(f, bias), atol=atol, err_msg="dbias")
    if kind in ("block", "block_half"):
        np.testing.assert_allclose(g.dw, _fd(f, w.blocks), atol=atol, err_msg="dw")
    elif kind == "sparse":
        np.testing.assert_allclose(g.dw, _fd(f, w.values), atol=atol, err_msg="dw")
    elif kind == "dense":
        np.testing.assert_allclose(g.dw, _fd(f, w), atol=atol, err_msg="dw")
    else:
        assert g.dw is None
    # rows of dw/dbias for δ that no visible pair uses are exactly 0
    assert np.any(g.dbias != 0)


def test_finite_differences_scale_and_gqa_broadcast_w() -> None:
    rng = make_rng(11)
    q, k, v = make_qkv(rng, (2, 2), 3, 4, 2, 2, np.float64, group=2)
    L = needed_L(3, 4)
    w = make_w("dense", rng, L, 2, (1, 1))
    dout = rng.standard_normal((2, 2, 3, 2))
    kw = dict(scale=0.7)

    def f() -> float:
        return float(np.sum(fastrope.attention(q, k, v, w, **kw) * dout))

    g = fastrope.attention_grad(q, k, v, w, dout, **kw)
    for name, got, x in (("dq", g.dq, q), ("dk", g.dk, k), ("dv", g.dv, v), ("dw", g.dw, w)):
        np.testing.assert_allclose(got, _fd(f, x), atol=1e-8, err_msg=name)
