"""Position matrices ``W_δ``: the four forms of docs/DESIGN.md §2.

Every form describes one ``d x d`` matrix ``W_δ`` per relative position ``δ = p_i - p'_j``.
The score is ``M_ij = scale * q_i^T W_{δ_ij} k_j``.

* :class:`Rotary` — analytic RoPE, ``W_δ = f^2 * blockdiag_m R(-δ θ_m)``; nothing is stored.
* :class:`BlockW` — the same 2x2 block support with arbitrary values per δ.
* :class:`SparseW` — any support ``S`` (a list of ``(l1, l2)`` entries) with values per δ.
* a plain array ``(..., 2L-1, d, d)`` — every entry.

Tables are indexed by row ``δ + L - 1`` for ``δ`` in ``[-(L-1), L-1]``.  Leading dims (before
the table axis) broadcast against the leading dims of ``q`` (per-head position matrices).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import _fastrope
from ._rotary import rotary_frequencies

__all__ = ["Rotary", "BlockW", "SparseW", "rotary_pairs", "LAYOUTS"]

LAYOUTS = ("interleaved", "half")


def _check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def rotary_pairs(d: int, layout: str = "interleaved") -> np.ndarray:
    """The 2-D pairs ``(p_m, r_m)`` rotated together, as an int64 array of shape ``(d/2, 2)``.

    ``"interleaved"`` (RoFormer, Meta Llama): ``(2m, 2m+1)``.
    ``"half"`` (Hugging Face ``rotate_half``, GPT-NeoX): ``(m, m + d/2)``.
    """
    _check_layout(layout)
    if d % 2:
        raise ValueError(f"d: rotary position matrices need an even head dim, got d={d}")
    return _pairs(int(d), layout).copy()


@functools.lru_cache(maxsize=64)
def _pairs(d: int, layout: str) -> np.ndarray:
    """:func:`rotary_pairs`, built once per (d, layout) and read-only (every call needs it)."""
    m = np.arange(d // 2, dtype=np.int64)
    if layout == "interleaved":
        p = np.stack([2 * m, 2 * m + 1], axis=1)
    else:
        p = np.stack([m, m + d // 2], axis=1)
    p.flags.writeable = False
    return p


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding (RoPE) as relative position matrices.

    ``W_δ = f^2 * blockdiag_m R(-δ θ_m)`` with ``R(φ) = [[cos φ, -sin φ], [sin φ, cos φ]]``: for the
    pair ``(p, r)`` of frequency ``θ_m``, ``W[p,p] = W[r,r] = f^2 cos(δθ_m)``,
    ``W[p,r] = f^2 sin(δθ_m)`` and ``W[r,p] = -f^2 sin(δθ_m)``.  This equals rotating ``q_i`` by
    ``p_i θ`` and ``k_j`` by ``p'_j θ`` and taking plain dot products.

    ``θ_m = base^(-2m/d)`` unless ``scaling`` changes it; ``f`` (the attention factor) is 1 except
    for YaRN.  ``scaling`` takes the Hugging Face ``rope_scaling`` dict form, e.g.
    ``{"rope_type": "linear", "factor": 4.0}``; types: ``linear``, ``ntk`` (static NTK-aware),
    ``dynamic`` (dynamic NTK), ``yarn``, ``llama3``, and ``explicit``
    (``{"rope_type": "explicit", "inv_freq": θ, "attention_factor": f}``: the frequencies given
    as they are, e.g. a model's own rotary embedding).
    """

    base: float = 10000.0
    layout: str = "interleaved"
    scaling: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        base = self.base
        if isinstance(base, bool) or not isinstance(base, (int, float, np.floating, np.integer)):
            raise TypeError(f"base: expected a positive float, got {type(base).__name__}")
        if not math.isfinite(float(base)) or base <= 1.0:
            raise ValueError(f"base: expected a finite float > 1, got {base!r}")
        _check_layout(self.layout)
        if self.scaling is not None and not isinstance(self.scaling, Mapping):
            raise TypeError(
                f"scaling: expected a dict such as {{'rope_type': 'linear', 'factor': 2.0}}"
                f" or None,"
                f" got {type(self.scaling).__name__}"
            )

    def frequencies(self, d: int, max_position: int | None = None) -> tuple[np.ndarray, float]:
        """``(theta, attention_factor)``: float64 ``θ_m`` of shape ``(d/2,)`` and ``f``."""
        return rotary_frequencies(d, float(self.base), self.scaling, max_position)

    def pairs(self, d: int) -> np.ndarray:
        """:func:`rotary_pairs` of this layout, read-only (shared by every call)."""
        if d % 2:
            return rotary_pairs(d, self.layout)  # raises the odd-d error
        return _pairs(int(d), _check_layout(self.layout))

    def rotate(self, x: Any, position: int = 0, *, max_position: int | None = None) -> np.ndarray:
        """``x`` ``(..., n, d)`` with row ``i`` rotated to position ``position + i``, times the
        attention factor ``f``: ``x_p' = f (x_p cos φ - x_r sin φ)``,
        ``x_r' = f (x_p sin φ + x_r cos φ)``, ``φ = (position + i) θ_m`` for each pair ``(p, r)``.

        ``attention(w.rotate(q, q_offset), w.rotate(k, k_offset), v, None, ...)`` equals
        ``attention(q, k, v, w, q_offset=q_offset, k_offset=k_offset, ...)`` up to rounding (the
        offsets still place masks and biases).  A generation loop can so keep its KV cache
        rotated, as Hugging Face's is, and rotate only each step's new keys: with ``w`` itself,
        every call rotates every cached key again.  Angles in float64, the result in ``x``'s
        float dtype.  ``max_position`` (the largest position of the call) matters for
        ``"dynamic"`` scaling only, whose frequencies change with it (a cache of rotated keys
        would then go stale).
        """
        x = np.asarray(x)
        if x.ndim < 2 or x.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"x: expected a float32 or float64 array of shape (..., n, d), got "
                f"{x.dtype} {x.shape}"
            )
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise TypeError(f"position: expected an int, got {type(position).__name__}")
        n, d = x.shape[-2:]
        theta, factor = self.frequencies(d, max_position)
        ang = np.arange(position, position + n, dtype=np.float64)[:, None] * theta[None, :]
        c = (np.cos(ang) * factor).astype(x.dtype)
        s = (np.sin(ang) * factor).astype(x.dtype)
        return _rotate_rows(x, c, s, self.layout)


def _rotate_rows(x: np.ndarray, c: np.ndarray, s: np.ndarray, layout: str) -> np.ndarray:
    """``x`` ``(..., n, d)`` rotated with ``c``, ``s`` ``(n, d/2)`` on ``layout``'s pairs (the
    arithmetic of :meth:`Rotary.rotate`, shared with ``fastrope.torch.rotate``).

    Natively when ``x`` is C-contiguous with ``d > 0`` (the same operations in the same order,
    so the same bits: :func:`_rotate_rows_numpy`), which a decode step's single row needs: the
    NumPy version's eight operations cost it about 10 µs."""
    n, d = x.shape[-2:]
    if (
        layout in ("interleaved", "half")
        and x.flags.c_contiguous
        and x.size > 0
        and c.dtype == x.dtype
        and s.dtype == x.dtype
    ):
        out = _fastrope.rotate_rows(
            x.reshape(-1, n, d), np.ascontiguousarray(c), np.ascontiguousarray(s), layout == "half"
        )
        return out.reshape(x.shape)
    return _rotate_rows_numpy(x, c, s, layout)


def _rotate_rows_numpy(x: np.ndarray, c: np.ndarray, s: np.ndarray, layout: str) -> np.ndarray:
    """:func:`_rotate_rows` in NumPy operations (any strides)."""
    out = np.empty_like(x)
    h = x.shape[-1] // 2
    # The pairs' lanes as strided views: (2m, 2m+1) or (m, m+h).
    p, r = (
        (np.s_[..., 0::2], np.s_[..., 1::2])
        if layout == "interleaved"
        else (
            np.s_[..., :h],
            np.s_[..., h:],
        )
    )
    xp, xr = x[p], x[r]
    out[p] = xp * c - xr * s
    out[r] = xp * s + xr * c
    return out


@dataclass(frozen=True, eq=False)
class BlockW:
    """2x2-block relative position matrices with arbitrary values.

    ``blocks``: ``(..., 2L-1, d/2, 2, 2)``;
    ``blocks[..., δ+L-1, m, a, b] = W_δ[pair_m[a], pair_m[b]]``
    where ``pair_m`` is ``(2m, 2m+1)`` for ``layout="interleaved"`` and ``(m, m+d/2)`` for
    ``"half"``.  ``Rotary`` is the case ``[[cos, sin], [-sin, cos]](δθ_m)``.
    """

    blocks: Any
    layout: str = "interleaved"

    def __post_init__(self) -> None:
        _check_layout(self.layout)

    def support(self, d: int) -> np.ndarray:
        """The support ``S`` in the order of ``blocks.reshape(..., 2L-1, 2d)``'s last axis."""
        p = rotary_pairs(d, self.layout)
        a = np.array([0, 0, 1, 1])
        b = np.array([0, 1, 0, 1])
        return np.stack([p[:, a], p[:, b]], axis=-1).reshape(-1, 2)


@dataclass(frozen=True, eq=False)
class SparseW:
    """Relative position matrices with an arbitrary support ``S``.

    ``support``: int ``(|S|, 2)`` of distinct ``(l1, l2)`` entries; ``values``: ``(..., 2L-1, |S|)``
    with ``values[..., δ+L-1, s] = W_δ[l1_s, l2_s]``; every other entry of ``W_δ`` is 0.
    """

    support: Any
    values: Any
