"""fastrope: attention with rotary and general relative-position matrices, exact and fast.

The score between query ``i`` and key ``j`` is ``scale * q_i^T W_{i-j} k_j``: the matrix depends on
the relative position ``δ = (q_offset + i) - (k_offset + j)`` only.  :class:`Rotary` is RoPE
(Llama); :class:`BlockW`, :class:`SparseW` and dense arrays are learned or structured variants.

>>> import numpy as np, fastrope
>>> q = k = v = np.random.default_rng(0).standard_normal((8, 16, 64), dtype=np.float32)
>>> out = fastrope.attention(q, k, v, fastrope.Rotary(), causal=True)
>>> out.shape
(8, 16, 64)
"""

from __future__ import annotations

import numpy as np

from . import _fastrope, reference
from ._attention import attention, attention_grad, plan
from ._fastrope import __version__
from ._merge import merge_partials
from ._plan import Plan
from ._position import BlockW, Rotary, SparseW, rotary_pairs
from ._types import ApproximationError, Gradients

__all__ = [
    "attention",
    "attention_grad",
    "merge_partials",
    "plan",
    "alibi",
    "Rotary",
    "BlockW",
    "SparseW",
    "Plan",
    "Gradients",
    "ApproximationError",
    "rotary_pairs",
    "reference",
    "clear_cache",
    "cache_info",
    "set_cache_limit",
    "__version__",
]


def alibi(slopes, L: int) -> np.ndarray:
    """ALiBi as a Toeplitz bias: ``bias[h, δ + L - 1] = -slopes[h] * |δ|``, shape ``(H, 2L-1)``.

    ``slopes`` may be an int ``H`` (the standard geometric slopes ``2^(-8 (h+1) / H)``) or an
    array of per-head slopes.  Pass the result as ``bias=`` (it broadcasts over batch dims).
    """
    if isinstance(slopes, (int, np.integer)) and not isinstance(slopes, bool):
        h = int(slopes)
        if h < 1:
            raise ValueError(f"slopes: expected a positive number of heads, got {h}")
        s = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    else:
        s = np.asarray(slopes, dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"slopes: expected an int or a 1-d array, got shape {s.shape}")
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L: expected a positive int, got {L!r}")
    delta = np.arange(-(L - 1), L, dtype=np.float64)
    return -s[:, None] * np.abs(delta)[None, :]


def clear_cache() -> None:
    """Empty the fast method's kernel-spectra cache and reset its counters.

    The kernel spectra of ``method="fast"`` (forward and backward) depend only on the position
    matrices of the call's δ range, the mask/bias, ``scale``, the polynomial and the lengths;
    they are kept across calls in a bounded, thread-safe LRU cache so that repeated calls
    (training steps, several layers with equal shapes) skip rebuilding them.  Results never
    depend on the cache: a hit gives bitwise the same output as a fresh build, and every call is
    certified from its own data.
    """
    _fastrope.clear_cache()


def cache_info() -> dict:
    """The kernel-spectra cache's state as a dict.

    Keys: ``hits`` and ``misses`` (lookups since the last :func:`clear_cache`), ``evictions``,
    ``entries``, ``bytes`` (held now) and ``limit`` (bytes; 0 when disabled).
    """
    return dict(_fastrope.cache_info())


def set_cache_limit(limit: int) -> None:
    """Set the kernel-spectra cache's limit in bytes; ``0`` disables the cache and empties it.

    The default is ``min(1 GiB, available memory / 8)``.  Entries beyond the new limit are
    evicted, least recently used first.  During a call the cache also stays within that call's
    ``memory_limit`` (other entries are evicted so that they and the call's working set fit).
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit: expected an int >= 0 (bytes), got {limit!r}")
    _fastrope.set_cache_limit(int(limit))
