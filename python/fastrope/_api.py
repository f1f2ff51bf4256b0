"""Normalisation: validated user arrays in, the native module's canonical form out.

Canonical form: q ``(B, Hq, n_q, d)``, k ``(B, Hk, n_k, d)``, v ``(B, Hk, n_k, d_v)`` where ``B``
is the product of the batch dims; position tables ``(tables, 2L-1, |S|)`` with one table index
per ``(batch, head)``; bias tables ``(tables, 2L_b-1)`` likewise.  Nothing here computes
attention: it only checks (with :mod:`fastrope._validate`), reshapes (views where NumPy can) and
maps results back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from ._position import Rotary
from ._validate import (  # noqa: F401  (re-exported: _attention imports these from here)
    METHODS,
    as_float_array,
    broadcast_index,
    check_bias_table,
    check_causal,
    check_cover,
    check_eps,
    check_grad_error,
    check_method,
    check_offsets,
    check_one_dtype,
    check_qkv_shapes,
    check_scale,
    check_sparse_support,
    check_threads,
    parse_window,
    split_w,
    table_rows,
    visible_delta_range,
)
from ._validate import check_finite as _check_finite


@dataclass
class Call:
    """A validated call in canonical form (see the module docstring)."""

    dtype: np.dtype
    lead_q: tuple
    lead_k: tuple
    shape: tuple  # (B, Hq, Hk, nq, nk, d, dv)
    q4: np.ndarray
    k4: np.ndarray
    v4: np.ndarray
    scale: float
    causal: bool
    window: Optional[tuple]
    q_offset: int
    k_offset: int
    # position matrices: rotary = (theta, factor, pairs) or sparse support/values/index
    w: Any
    rotary: Optional[tuple]
    support: Optional[np.ndarray]
    values: Optional[np.ndarray]
    w_index: Optional[np.ndarray]
    w_restore: Any  # how to turn dw (tables, rows, |S|) back into w's stored layout
    bias: Optional[np.ndarray]
    bias_index: Optional[np.ndarray]
    bias_shape: Optional[tuple]
    dv_padded: bool
    # w=None with an odd d: q4/k4 carry one zero column more than the caller's q/k
    d_padded: bool = False
    v_max_given: Optional[float] = None  # plan() on shape tuples: the caller's bound on |v|
    bias_grad: bool = True  # attention_grad(bias_grad=False): no dbias asked for
    grad_error: str = "relative"  # what the fast backward's eps bounds (check_grad_error)

    @property
    def want_dbias(self) -> bool:
        return self.bias is not None and self.bias_grad

    @property
    def visible_delta_range(self) -> Optional[tuple]:
        return visible_delta_range(
            self.shape[3], self.shape[4], self.q_offset - self.k_offset, self.causal, self.window
        )

    def native_args(self) -> dict:
        return dict(
            shape=self.shape,
            scale=self.scale,
            causal=self.causal,
            window=self.window,
            q_offset=self.q_offset,
            k_offset=self.k_offset,
            rotary=self.rotary,
            support=self.support,
            values=self.values,
            w_index=self.w_index,
            bias=self.bias,
            bias_index=self.bias_index,
        )


class _NativeW(NamedTuple):
    """``w`` in the native encoding (see :class:`Call`)."""

    rotary: Optional[tuple] = None
    support: Optional[np.ndarray] = None
    values: Optional[np.ndarray] = None
    w_index: Optional[np.ndarray] = None
    w_restore: Any = None


def _encode_w(
    w: Any,
    dtype: np.dtype,
    d: int,
    q_shape: tuple,
    lead_q: tuple,
    max_pos: int,
    rng: Optional[tuple],
    check_values: bool,
    full_dense_support: bool,
) -> _NativeW:
    """``w`` (not None: see :func:`_pad_odd_d`) as rotary frequencies or a δ-table."""
    parts = split_w(w)
    if parts.kind == "rotary":
        if d % 2:
            raise ValueError(f"w: Rotary needs an even head dim d, got d={d} (q shape {q_shape})")
        theta, factor = w.frequencies(d, max_pos)
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        return _NativeW(rotary=(theta, float(factor), w.pairs(d)))
    if parts.kind == "block":
        blocks = as_float_array(parts.values, "w.blocks")
        if d % 2:
            raise ValueError(f"w: BlockW needs an even head dim d, got d={d}")
        rows = table_rows(blocks, "w.blocks", "axis -4", (d // 2, 2, 2), "d/2, 2, 2")
        lead_w = blocks.shape[:-4]
        values = blocks.reshape(lead_w + (rows, 2 * d))
        support = w.support(d)
        w_restore = ("reshape", blocks.shape)
    elif parts.kind == "sparse":
        support = check_sparse_support(np.asarray(parts.support), d)
        vals = as_float_array(parts.values, "w.values")
        n = len(support)
        rows = table_rows(vals, "w.values", "axis -2", (n,), f"|S|={n}")
        lead_w = vals.shape[:-2]
        values = vals
        w_restore = ("reshape", vals.shape)
    else:  # dense
        dense = as_float_array(parts.values, "w")
        rows = table_rows(dense, "w", "axis -3", (d, d), f"d, d with d={d}")
        lead_w = dense.shape[:-3]
        flat = dense.reshape(lead_w + (rows, d * d))
        values, support = _dense_support(flat, d, full_dense_support)
        w_restore = ("dense", dense.shape)
    check_cover(rows, rng, "w")
    w_index = broadcast_index(tuple(lead_w), lead_q, "w", "the δ axis")
    n_tables = int(np.prod(lead_w, dtype=np.int64))
    values = np.asarray(values, dtype=dtype).reshape((n_tables, rows, len(support)))
    if check_values:
        _check_finite(values, "w")
    return _NativeW(None, support, values, w_index, w_restore)


def _dense_support(flat: np.ndarray, d: int, full: bool) -> tuple:
    """A dense ``(..., 2L-1, d*d)`` table as (values, support): its nonzero columns, or all."""
    if full:
        nz = np.arange(d * d)
    else:
        nz = np.flatnonzero(np.any(flat != 0, axis=tuple(range(flat.ndim - 1))))
        if nz.size == 0:  # all-zero W: keep one entry so the kernels see a valid support
            nz = np.array([0])
        flat = flat[..., nz]
    return flat, np.stack(np.divmod(nz, d), axis=1).astype(np.int64)


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)
def _identity_rotary(d: int) -> tuple:
    """``w=None`` in the rotary encoding: every frequency 0 (read-only: the tuple is shared)."""
    theta = np.zeros(d // 2)
    theta.flags.writeable = False
    return (theta, 1.0, Rotary().pairs(d))


def _pad_odd_d(q: np.ndarray, k: np.ndarray) -> tuple:
    """w=None with an odd d: one zero column on q and k (it adds nothing to any score)."""
    dtype = q.dtype
    q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), dtype)], axis=-1)
    k = np.concatenate([k, np.zeros(k.shape[:-1] + (1,), dtype)], axis=-1)
    return q, k


def prepare(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    *,
    scale: Any = None,
    causal: Any = False,
    window: Any = None,
    bias: Any = None,
    q_offset: Any = 0,
    k_offset: Any = 0,
    check_finite: bool = True,
    full_dense_support: bool = False,
    defer_kv_check: bool = False,
) -> Call:
    q, k, v = as_float_array(q, "q"), as_float_array(k, "k"), as_float_array(v, "v")
    check_one_dtype(q, k, v, " (float32 or float64)")
    dtype = q.dtype
    batch, hq, hk, nq, nk, d, dv = check_qkv_shapes(q, k, v)
    lead_q, lead_k = tuple(q.shape[:-2]), tuple(k.shape[:-2])
    scale_f = check_scale(scale, d)
    causal = check_causal(causal)
    win = parse_window(window)
    q_off, k_off = check_offsets(q_offset, k_offset)
    rng = visible_delta_range(nq, nk, q_off - k_off, causal, win)

    if check_finite:
        # With `defer_kv_check` the exact forward scans k and v in Rust (the rows some query
        # can see; the decode path as it reads them): no boolean temporary, no second pass.
        for name, x in (("q", q),) if defer_kv_check else (("q", q), ("k", k), ("v", v)):
            _check_finite(x, name)

    d_padded = w is None and d % 2 == 1
    if w is None:
        # Plain dot-product attention (W_δ = I: q and k already rotated, or a bias-only model
        # such as T5 or ALiBi): a Rotary with every frequency 0, so the GEMM path runs. An odd d
        # gets a zero column on q and k, dropped from dq and dk.
        if d_padded:
            q, k = _pad_odd_d(q, k)
            d += 1
        nw = _NativeW(rotary=_identity_rotary(d))
    else:
        max_pos = max(q_off + nq - 1, k_off + nk - 1, 0)
        nw = _encode_w(w, dtype, d, q.shape, lead_q, max_pos, rng, check_finite, full_dense_support)

    bias_arr = bias_index = bias_shape = None
    if bias is not None:
        b = as_float_array(bias, "bias")
        rows_b = check_bias_table(b, rng)
        bias_index = broadcast_index(tuple(b.shape[:-1]), lead_q, "bias", "the last axis")
        bias_shape = b.shape
        bias_arr = np.asarray(b, dtype=dtype).reshape(-1, rows_b)
        if check_finite:
            _check_finite(bias_arr, "bias", allow_neg_inf=True)

    dv_padded = dv == 0
    v4 = np.zeros((batch, hk, nk, 1), dtype=dtype) if dv_padded else v.reshape(batch, hk, nk, dv)
    return Call(
        dtype=dtype,
        lead_q=lead_q,
        lead_k=lead_k,
        shape=(batch, hq, hk, nq, nk, d, max(dv, 1)),
        q4=q.reshape(batch, hq, nq, d),
        k4=k.reshape(batch, hk, nk, d),
        v4=v4,
        scale=scale_f,
        causal=causal,
        window=win,
        q_offset=q_off,
        k_offset=k_off,
        w=w,
        rotary=nw.rotary,
        support=nw.support,
        values=nw.values,
        w_index=nw.w_index,
        w_restore=nw.w_restore,
        bias=bias_arr,
        bias_index=bias_index,
        bias_shape=bias_shape,
        dv_padded=dv_padded,
        d_padded=d_padded,
    )


def restore_dw(call: Call, dw3: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """dw of shape ``(tables, 2L-1, |S|)`` back into the stored layout of ``w``."""
    if dw3 is None or call.w_restore is None:
        return None
    kind, shape = call.w_restore
    if kind == "reshape":
        return dw3.reshape(shape)
    # dense: scatter the support's columns into (..., 2L-1, d*d)
    d = call.shape[5]
    full = np.zeros(dw3.shape[:-1] + (d * d,), dtype=dw3.dtype)
    full[..., call.support[:, 0] * d + call.support[:, 1]] = dw3
    return full.reshape(shape)
