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

from . import reference
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
