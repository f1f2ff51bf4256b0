"""Argument checks shared by the NumPy entry points and the framework adapters.

Every check raises the TypeError/ValueError whose message the tests match; nothing here computes
attention or reshapes into the native layout (that is :mod:`fastrope._api`).  The framework
adapters (:mod:`fastrope.torch`, :mod:`fastrope.jax`) use :func:`split_w`, :func:`window_pair`
and :func:`check_one_dtype` so that ``w``, ``window`` and dtypes are read in one place.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from ._position import BlockW, Rotary, SparseW

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
METHODS = ("auto", "exact", "fast")
UNBOUNDED = 2**62  # a window side this wide is unbounded (wider than any sequence)


def describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


# ------------------------------------------------------------------------------------------
# Scalars
# ------------------------------------------------------------------------------------------


def as_int(x: Any, name: str) -> int:
    if type(x) is int:  # the common case, without the ABC checks below
        return x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an int, got {describe(x)}")
    return int(x)


def _is_real(x: Any) -> bool:
    if type(x) is float or type(x) is int:  # the common cases, without the ABC checks below
        return True
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (numbers.Real, np.floating))


def check_scale(scale: Any, d: int) -> float:
    """``scale`` as a float; None is ``1/sqrt(d)``."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not _is_real(scale):
        raise TypeError(f"scale: expected a float or None, got {describe(scale)}")
    scale_f = float(scale)
    if not math.isfinite(scale_f):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    return scale_f


def check_causal(causal: Any) -> bool:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {describe(causal)}")
    return bool(causal)


def check_offsets(q_offset: Any, k_offset: Any) -> tuple:
    """``(q_offset, k_offset)`` as ints with ``|offset| <= 2**52``."""
    q_off, k_off = as_int(q_offset, "q_offset"), as_int(k_offset, "k_offset")
    for name, off in (("q_offset", q_off), ("k_offset", k_off)):
        # positions are exact in float64 (rotary angles) and their differences fit in int64
        if abs(off) > 2**52:
            raise ValueError(f"{name}: expected an int with |{name}| <= 2**52, got {off}")
    return q_off, k_off


def check_eps(eps: Any) -> float:
    if not _is_real(eps):
        raise TypeError(f"eps: expected a float >= 0, got {describe(eps)}")
    e = float(eps)
    if not (e >= 0.0) or math.isinf(e):
        raise ValueError(f"eps: expected a finite float >= 0 (0 means exact), got {eps!r}")
    return e


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method


GRAD_ERRORS = ("relative", "absolute")


def check_grad_error(grad_error: Any) -> str:
    """``grad_error=``: what the fast backward's ``eps`` bounds (see :func:`attention_grad`)."""
    if not isinstance(grad_error, str) or grad_error not in GRAD_ERRORS:
        raise ValueError(
            f"grad_error: expected 'relative' (each gradient's error at most eps times its"
            f" certified magnitude) or 'absolute' (every entry within eps), got {grad_error!r}"
        )
    return grad_error


@functools.lru_cache(maxsize=1)
def _cores() -> int:
    """``os.cpu_count()``, read once (15 us a call, a tenth of a small call's overhead)."""
    return os.cpu_count() or 1


def check_threads(num_threads: Any) -> Optional[int]:
    if num_threads is None:
        return None
    n = as_int(num_threads, "num_threads")
    limit = max(64, 4 * _cores())
    if not 1 <= n <= limit:
        raise ValueError(
            f"num_threads: expected an int in [1, {limit}] (4x the cores, at least 64) or None,"
            f" got {n}"
        )
    return n


# ------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------


def window_pair(window: Any) -> tuple:
    """``window`` (not None) as a 2-tuple, or the TypeError every entry point raises."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window: expected None or a pair (left, right), got {window!r}")
    return tuple(window)


def parse_window(window: Any) -> Optional[tuple]:
    """``(left, right)`` as non-negative ints (None and anything wider -> ``UNBOUNDED``)."""
    if window is None:
        return None
    out = []
    for side, x in zip(("left", "right"), window_pair(window)):
        if x is None:
            out.append(UNBOUNDED)
            continue
        x = as_int(x, f"window[{side}]")
        if x > UNBOUNDED:  # wider than any sequence: the same as unbounded
            x = UNBOUNDED
        if x < 0:
            raise ValueError(
                f"window: expected non-negative (left, right) sizes (None for unbounded),"
                f" got {window!r}"
            )
        out.append(x)
    return tuple(out)


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


# ------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------


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
            raise TypeError(f"{name}: expected a float32 or float64 array, got {describe(x)}")
        try:
            arr = np.asarray(x)
        except Exception as e:  # torch tensors that require grad, ragged lists, ...
            raise TypeError(
                f"{name}: expected a float32 or float64 array, got {describe(x)} ({e})"
            ) from None
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}"
            + (" (cast it with .astype(np.float32))" if arr.dtype.kind in "fiub" else "")
        )
    return arr


def check_one_dtype(q: Any, k: Any, v: Any, hint: str = "") -> None:
    """q, k and v share one dtype (``hint`` follows "expected one dtype" in the message)."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype{hint}, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_finite(arr: np.ndarray, name: str, allow_neg_inf: bool = False) -> None:
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


class QKVShape(NamedTuple):
    """The dims of a checked ``q (..., n_q, d)``, ``k (..., n_k, d)``, ``v (..., n_k, d_v)``."""

    batch: int
    hq: int
    hk: int
    nq: int
    nk: int
    d: int
    dv: int


def check_qkv_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> QKVShape:
    """Check q, k, v against each other (batch dims, grouped heads, lengths, head dims)."""
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
    return QKVShape(batch, hq, hk, nq, nk, d, dv)


def broadcast_index(lead_t: tuple, lead_q: tuple, name: str, table_axis: str) -> np.ndarray:
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


def table_rows(values: np.ndarray, name: str, axis_name: str, tail: tuple, tail_desc: str) -> int:
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


def check_cover(rows: int, rng: Optional[tuple], name: str) -> None:
    """A table of ``rows = 2L-1`` rows covers the call's visible δ range ``rng``."""
    half = (rows - 1) // 2
    if rng is not None and (rng[0] < -half or rng[1] > half):
        raise ValueError(
            f"{name}: the call needs δ in [{rng[0]}, {rng[1]}] (positions and masks), but the table"
            f" has {rows} rows covering δ in [{-half}, {half}] (L = {half + 1}); pass a table with"
            f" L >= {max(-rng[0], rng[1]) + 1}"
        )


def check_bias_table(b: np.ndarray, rng: Optional[tuple]) -> int:
    """Check a bias table ``(..., 2L-1)`` (odd length, covers ``rng``); its number of rows."""
    if b.ndim < 1:
        raise ValueError(f"bias: expected shape (..., 2L-1), got {b.shape}")
    rows_b = b.shape[-1]
    if rows_b % 2 == 0:
        raise ValueError(
            f"bias: expected an odd number 2L-1 of entries along the last axis, got {rows_b}"
        )
    check_cover(rows_b, rng, "bias")
    return rows_b


def check_sparse_support(sup: np.ndarray, d: int) -> np.ndarray:
    """``SparseW.support`` as int64 ``(|S|, 2)`` with distinct entries in ``[0, d)``."""
    if sup.dtype.kind not in "iu":
        raise TypeError(f"w.support: expected an int array of shape (|S|, 2), got {describe(sup)}")
    if sup.ndim != 2 or sup.shape[1] != 2:
        raise ValueError(f"w.support: expected an int array of shape (|S|, 2), got {describe(sup)}")
    if sup.size and (sup.min() < 0 or sup.max() >= d):
        raise ValueError(
            f"w.support: expected entries in [0, {d}) (d of q), got {sup.min()}..{sup.max()}"
        )
    if len({(int(a), int(b)) for a, b in sup}) != len(sup):
        raise ValueError("w.support: expected distinct (l1, l2) entries, got duplicates")
    return sup.astype(np.int64)


# ------------------------------------------------------------------------------------------
# The w ladder: one reading of every accepted form of w
# ------------------------------------------------------------------------------------------

W_KINDS = ("none", "rotary", "block", "sparse", "dense")


class WParts(NamedTuple):
    """An accepted ``w`` taken apart: its kind and its (unconverted) pieces.

    ``kind`` is one of :data:`W_KINDS`; ``rotary`` is set for ``"rotary"``; ``layout`` is the
    block layout for ``"block"``; ``values`` are ``BlockW.blocks``, ``SparseW.values`` or the
    dense table, as given; ``support`` is ``SparseW.support`` as given.
    """

    kind: str
    rotary: Optional[Rotary] = None
    layout: str = "interleaved"
    values: Any = None
    support: Any = None


def _array_like(w: Any) -> bool:
    return isinstance(w, np.ndarray) or hasattr(w, "__array__")


def split_w(
    w: Any,
    is_dense: Callable[[Any], bool] = _array_like,
    noun: str = "an array",
    describe_w: Callable[[Any], str] = describe,
) -> WParts:
    """Take any accepted ``w`` apart (see :class:`WParts`); a TypeError for anything else.

    ``is_dense`` says what counts as a dense table for the caller (NumPy: anything with
    ``__array__``; torch: tensors and ndarrays; jax: anything with a shape and a dtype); ``noun``
    and ``describe_w`` word the error.
    """
    if w is None:
        return WParts("none")
    if isinstance(w, Rotary):
        return WParts("rotary", rotary=w)
    if isinstance(w, BlockW):
        return WParts("block", layout=w.layout, values=w.blocks)
    if isinstance(w, SparseW):
        return WParts("sparse", values=w.values, support=w.support)
    if is_dense(w):
        return WParts("dense", values=w)
    raise TypeError(
        f"w: expected fastrope.Rotary, fastrope.BlockW, fastrope.SparseW, {noun} of shape"
        f" (..., 2L-1, d, d) or None (W_δ = I), got {describe_w(w)}"
    )


def join_w(parts: WParts) -> Any:
    """The ``w`` that :func:`split_w` took apart (with the pieces as they are now)."""
    kind = parts.kind
    if kind == "none":
        return None
    if kind == "rotary":
        return parts.rotary
    if kind == "block":
        return BlockW(parts.values, layout=parts.layout)
    if kind == "sparse":
        return SparseW(parts.support, parts.values)
    if kind == "dense":
        return parts.values
    raise ValueError(f"w_kind: expected none, rotary, block, sparse or dense, got {kind!r}")
