"""Argument validation and normalisation: user arrays in, the native module's canonical form out.

Canonical form: q ``(B, Hq, n_q, d)``, k ``(B, Hk, n_k, d)``, v ``(B, Hk, n_k, d_v)`` where ``B``
is the product of the batch dims; position tables ``(tables, 2L-1, |S|)`` with one table index
per ``(batch, head)``; bias tables ``(tables, 2L_b-1)`` likewise.  Nothing here computes
attention: it only checks, reshapes (views where NumPy can) and maps results back.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ._position import BlockW, Rotary, SparseW

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
METHODS = ("auto", "exact", "fast")


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


def as_float_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a float32/float64 ndarray (no copy when it already is one)."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if type(x).__module__.split(".")[0] == "torch":
            raise TypeError(
                f"{name}: got a torch.Tensor; fastrope.attention takes NumPy arrays. Use"
                " fastrope.torch.attention (tensors in and out, autograd, float16/bfloat16), or"
                " pass .detach().numpy() to compute in NumPy"
            )
        if x is None or isinstance(x, (str, bytes, numbers.Number)):
            raise TypeError(f"{name}: expected a float32 or float64 array, got {_describe(x)}")
        try:
            arr = np.asarray(x)
        except Exception as e:  # torch tensors that require grad, ragged lists, ...
            raise TypeError(
                f"{name}: expected a float32 or float64 array, got {_describe(x)} ({e})"
            ) from None
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}"
            + (" (cast it with .astype(np.float32))" if arr.dtype.kind in "fiub" else "")
        )
    return arr


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {_describe(x)}")
    return int(x)


def _check_finite(arr: np.ndarray, name: str, allow_neg_inf: bool = False) -> None:
    if arr.size == 0:
        return
    ok = np.isfinite(arr).all()
    if ok:
        return
    if allow_neg_inf and not (np.isnan(arr).any() or np.isposinf(arr).any()):
        return
    what = "NaN" if np.isnan(arr).any() else "Inf"
    raise ValueError(
        f"{name}: expected finite values, got {what} (pass check_finite=False to skip this scan;"
        " the result is then undefined)"
    )


def _broadcast_index(lead_t: tuple, lead_q: tuple, name: str, table_axis: str) -> np.ndarray:
    """Table index per flattened (batch..., head) of q, broadcasting ``lead_t`` against q's."""
    try:
        shape = np.broadcast_shapes(lead_t, lead_q)
    except ValueError:
        shape = None
    if shape != tuple(lead_q) or len(lead_t) > len(lead_q):
        raise ValueError(
            f"{name}: expected leading dims (before {table_axis}) that broadcast to q's leading "
            f"dims {tuple(lead_q)}, got {tuple(lead_t)}"
        )
    n_tables = int(np.prod(lead_t, dtype=np.int64))
    idx = np.arange(n_tables, dtype=np.int64).reshape(lead_t)
    return np.ascontiguousarray(np.broadcast_to(idx, lead_q).reshape(-1))


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


def visible_delta_range(nq: int, nk: int, c: int, causal: bool, window) -> Optional[tuple]:
    """Smallest and largest visible ``δ = c + i - j``, or None when every pair is masked."""
    if nq == 0 or nk == 0:
        return None
    lo, hi = c - (nk - 1), c + nq - 1
    if causal:
        lo = max(lo, 0)
    if window is not None:
        lo, hi = max(lo, -window[1]), min(hi, window[0])
    return (lo, hi) if lo <= hi else None


def _window(window: Any) -> Optional[tuple]:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window: expected None or a pair (left, right), got {window!r}")
    out = []
    for side, x in zip(("left", "right"), window):
        if x is None:
            out.append(2**62)
            continue
        x = _as_int(x, f"window[{side}]")
        if x > 2**62:  # wider than any sequence: the same as unbounded
            x = 2**62
        if x < 0:
            raise ValueError(
                f"window: expected non-negative (left, right) sizes (None for unbounded),"
                f" got {window!r}"
            )
        out.append(x)
    return tuple(out)


def _table(values: np.ndarray, name: str, axis_name: str, tail: tuple, tail_desc: str):
    """Check a δ-table ``(..., 2L-1, *tail)`` and return its number of rows."""
    nt = len(tail)
    if values.ndim < 1 + nt or tuple(values.shape[values.ndim - nt :]) != tuple(tail):
        raise ValueError(f"{name}: expected shape (..., 2L-1, {tail_desc}), got {values.shape}")
    rows = values.shape[values.ndim - nt - 1]
    if rows % 2 == 0:
        raise ValueError(
            f"{name}: expected an odd number 2L-1 of rows along the δ axis ({axis_name}),"
            f" got {rows}"
        )
    return rows


def _check_cover(rows: int, rng: Optional[tuple], name: str) -> None:
    half = (rows - 1) // 2
    if rng is not None and (rng[0] < -half or rng[1] > half):
        raise ValueError(
            f"{name}: the call needs δ in [{rng[0]}, {rng[1]}] (positions and masks), but the table"
            f" has {rows} rows covering δ in [{-half}, {half}] (L = {half + 1}); pass a table with"
            f" L >= {max(-rng[0], rng[1]) + 1}"
        )


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
    q = as_float_array(q, "q")
    k = as_float_array(k, "k")
    v = as_float_array(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v: expected one dtype (float32 or float64), got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    dtype = q.dtype
    if q.ndim < 2:
        raise ValueError(f"q: expected shape (..., n_q, d), got {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != q.ndim:
            raise ValueError(
                f"{name}: expected {q.ndim} dims like q {q.shape}, got shape {x.shape}"
            )
    nq, d = q.shape[-2:]
    nk, dk = k.shape[-2:]
    if dk != d:
        raise ValueError(f"k: expected shape (..., n_k, {d}) (d of q), got {k.shape}")
    if v.shape[-2] != nk:
        raise ValueError(f"v: expected shape (..., {nk}, d_v) (n_k of k), got {v.shape}")
    dv = v.shape[-1]
    if q.ndim >= 3:
        if k.shape[:-3] != q.shape[:-3] or v.shape[:-2] != k.shape[:-2]:
            raise ValueError(
                f"k, v: expected batch dims {q.shape[:-3]} and heads like q {q.shape} (or dividing"
                f" them), got k {k.shape} and v {v.shape}"
            )
        hq, hk = q.shape[-3], k.shape[-3]
        if hk == 0 or hq % hk:
            raise ValueError(
                f"k: expected a number of heads (axis -3) that divides q's {hq} (grouped-query"
                f" attention), got {hk}"
            )
        batch = math.prod(q.shape[:-3])
    else:
        hq = hk = batch = 1
    if d == 0:
        raise ValueError(f"q: expected a head dim d >= 1, got shape {q.shape}")
    lead_q, lead_k = tuple(q.shape[:-2]), tuple(k.shape[:-2])

    if scale is None:
        scale_f = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(
            scale, (numbers.Real, np.floating)
        ):
            raise TypeError(f"scale: expected a float or None, got {_describe(scale)}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {_describe(causal)}")
    win = _window(window)
    q_off, k_off = _as_int(q_offset, "q_offset"), _as_int(k_offset, "k_offset")
    for name, off in (("q_offset", q_off), ("k_offset", k_off)):
        # positions are exact in float64 (rotary angles) and their differences fit in int64
        if abs(off) > 2**52:
            raise ValueError(f"{name}: expected an int with |{name}| <= 2**52, got {off}")
    rng = visible_delta_range(nq, nk, q_off - k_off, bool(causal), win)

    if check_finite:
        # With `defer_kv_check` the exact forward scans k and v in Rust (the rows some query
        # can see; the decode path as it reads them): no boolean temporary, no second pass.
        for name, x in (("q", q),) if defer_kv_check else (("q", q), ("k", k), ("v", v)):
            _check_finite(x, name)

    rotary = support = values = w_index = w_restore = None
    d_padded = False
    if w is None:
        # Plain dot-product attention (W_δ = I: q and k already rotated, or a bias-only model
        # such as T5 or ALiBi): a Rotary with every frequency 0, so the GEMM path runs. An odd d
        # gets a zero column on q and k (it adds nothing to any score), dropped from dq and dk.
        if d % 2:
            d_padded = True
            q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), dtype)], axis=-1)
            k = np.concatenate([k, np.zeros(k.shape[:-1] + (1,), dtype)], axis=-1)
            d += 1
        rotary = (np.zeros(d // 2), 1.0, Rotary().pairs(d))
    elif isinstance(w, Rotary):
        if d % 2:
            raise ValueError(f"w: Rotary needs an even head dim d, got d={d} (q shape {q.shape})")
        max_pos = max(q_off + nq - 1, k_off + nk - 1, 0)
        theta, factor = w.frequencies(d, max_pos)
        rotary = (np.ascontiguousarray(theta, dtype=np.float64), float(factor), w.pairs(d))
    else:
        if isinstance(w, BlockW):
            blocks = as_float_array(w.blocks, "w.blocks")
            if d % 2:
                raise ValueError(f"w: BlockW needs an even head dim d, got d={d}")
            rows = _table(blocks, "w.blocks", "axis -4", (d // 2, 2, 2), "d/2, 2, 2")
            lead_w = blocks.shape[:-4]
            values = blocks.reshape(lead_w + (rows, 2 * d))
            support = w.support(d)
            w_restore = ("reshape", blocks.shape)
        elif isinstance(w, SparseW):
            sup = np.asarray(w.support)
            if sup.dtype.kind not in "iu":
                raise TypeError(
                    f"w.support: expected an int array of shape (|S|, 2), got {_describe(sup)}"
                )
            if sup.ndim != 2 or sup.shape[1] != 2:
                raise ValueError(
                    f"w.support: expected an int array of shape (|S|, 2), got {_describe(sup)}"
                )
            if sup.size and (sup.min() < 0 or sup.max() >= d):
                raise ValueError(
                    f"w.support: expected entries in [0, {d}) (d of q),"
                    f" got {sup.min()}..{sup.max()}"
                )
            if len({(int(a), int(b)) for a, b in sup}) != len(sup):
                raise ValueError("w.support: expected distinct (l1, l2) entries, got duplicates")
            vals = as_float_array(w.values, "w.values")
            rows = _table(vals, "w.values", "axis -2", (len(sup),), f"|S|={len(sup)}")
            lead_w = vals.shape[:-2]
            values, support = vals, sup.astype(np.int64)
            w_restore = ("reshape", vals.shape)
        elif isinstance(w, np.ndarray) or hasattr(w, "__array__"):
            dense = as_float_array(w, "w")
            rows = _table(dense, "w", "axis -3", (d, d), f"d, d with d={d}")
            lead_w = dense.shape[:-3]
            if full_dense_support:
                values = dense.reshape(lead_w + (rows, d * d))
                support = np.stack(np.divmod(np.arange(d * d), d), axis=1).astype(np.int64)
            else:
                flat = dense.reshape(lead_w + (rows, d * d))
                nz = np.flatnonzero(np.any(flat != 0, axis=tuple(range(flat.ndim - 1))))
                if nz.size == 0:  # all-zero W: keep one entry so the kernels see a valid support
                    nz = np.array([0])
                values = flat[..., nz]
                support = np.stack(np.divmod(nz, d), axis=1).astype(np.int64)
            w_restore = ("dense", dense.shape)
        else:
            raise TypeError(
                "w: expected fastrope.Rotary, fastrope.BlockW, fastrope.SparseW, an array of"
                f" shape (..., 2L-1, d, d) or None (W_δ = I), got {_describe(w)}"
            )
        _check_cover(rows, rng, "w")
        w_index = _broadcast_index(tuple(lead_w), lead_q, "w", "the δ axis")
        n_tables = int(np.prod(lead_w, dtype=np.int64))
        values = np.asarray(values, dtype=dtype).reshape((n_tables, rows, len(support)))
        if check_finite:
            _check_finite(values, "w")

    bias_arr = bias_index = bias_shape = None
    if bias is not None:
        b = as_float_array(bias, "bias")
        if b.ndim < 1:
            raise ValueError(f"bias: expected shape (..., 2L-1), got {b.shape}")
        rows_b = b.shape[-1]
        if rows_b % 2 == 0:
            raise ValueError(
                f"bias: expected an odd number 2L-1 of entries along the last axis, got {rows_b}"
            )
        _check_cover(rows_b, rng, "bias")
        bias_index = _broadcast_index(tuple(b.shape[:-1]), lead_q, "bias", "the last axis")
        bias_shape = b.shape
        bias_arr = np.asarray(b, dtype=dtype).reshape(-1, rows_b)
        if check_finite:
            _check_finite(bias_arr, "bias", allow_neg_inf=True)

    dv_padded = dv == 0
    v4 = v.reshape(batch, hk, nk, dv)
    if dv_padded:
        v4 = np.zeros((batch, hk, nk, 1), dtype=dtype)
    return Call(
        dtype=dtype,
        lead_q=lead_q,
        lead_k=lead_k,
        shape=(batch, hq, hk, nq, nk, d, max(dv, 1)),
        q4=q.reshape(batch, hq, nq, d),
        k4=k.reshape(batch, hk, nk, d),
        v4=v4,
        scale=scale_f,
        causal=bool(causal),
        window=win,
        q_offset=q_off,
        k_offset=k_off,
        w=w,
        rotary=rotary,
        support=support,
        values=values,
        w_index=w_index,
        w_restore=w_restore,
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


def check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (numbers.Real, np.floating)):
        raise TypeError(f"eps: expected a float >= 0, got {_describe(eps)}")
    e = float(eps)
    if not (e >= 0.0) or math.isinf(e):
        raise ValueError(f"eps: expected a finite float >= 0 (0 means exact), got {eps!r}")
    return e


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method


@functools.lru_cache(maxsize=1)
def _cores() -> int:
    """``os.cpu_count()``, read once (15 us a call, a tenth of a small call's overhead)."""
    return os.cpu_count() or 1


def check_threads(num_threads: Any) -> Optional[int]:
    if num_threads is None:
        return None
    n = _as_int(num_threads, "num_threads")
    limit = max(64, 4 * _cores())
    if not 1 <= n <= limit:
        raise ValueError(
            f"num_threads: expected an int in [1, {limit}] (4x the cores, at least 64) or None,"
            f" got {n}"
        )
    return n
