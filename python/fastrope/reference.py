"""Plain NumPy float64 reference ("oracle") for docs/DESIGN.md §1-§3, forward and backward.

Written from the formulas, never from the fast code.  With positions ``p_i = q_offset + i``,
``p'_j = k_offset + j`` and ``δ = p_i - p'_j``::

    M_ij = scale * q_i^T W_δ k_j                       (scale defaults to 1/sqrt(d))
    A_ij = exp(M_ij + b(δ))        if (i, j) is visible, else 0
    l_i  = sum_j A_ij,   lse_i = log l_i,   O_i = sum_j A_ij v_j / l_i

Visible: every pair, minus ``δ < 0`` when ``causal``, minus ``δ`` outside ``[-right, left]``
when ``window=(left, right)``.  A row with no visible key gives ``O_i = 0`` and
``lse_i = -inf`` (and zero gradients).

Gradients of ``sum(O * dO)``, with ``P = A / l`` and ``dS = P ∘ (dO V^T - rowsum(dO ∘ O))``::

    dV   = P^T dO
    dq_i = scale * sum_j dS_ij W_δ k_j
    dk_j = scale * sum_i dS_ij W_δ^T q_i
    dW_δ = scale * sum_{i-j=δ} dS_ij q_i k_j^T        (restricted to the stored entries)
    db_δ = sum_{i-j=δ} dS_ij

The work loops over the ``n_q + n_k - 1`` diagonals of the score matrix (one ``δ`` each) with
vectorised work per diagonal; the ``n_q x n_k`` score matrix is materialised, ``(n, n, d, d)``
never is.  Every result is float64.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterator, Sequence

import numpy as np

from ._position import BlockW, Rotary, SparseW, rotary_pairs
from ._types import Gradients

__all__ = ["attention", "attention_grad", "position_matrices"]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_float(name: str, x: Any) -> np.ndarray:
    """``x`` as a float64 array; TypeError for anything that is not real numbers."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - np.asarray rarely fails
        raise TypeError(f"{name}: expected a real array, got {type(x).__name__}") from exc
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real float array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _as_int(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


def _broadcasts_to(name: str, lead: tuple[int, ...], target: tuple[int, ...]) -> None:
    """Require ``lead`` to broadcast to exactly ``target`` (right-aligned, like NumPy)."""
    ok = len(lead) <= len(target)
    if ok:
        for a, b in zip(lead[::-1], target[::-1]):
            ok = ok and a in (1, b)
    if not ok:
        raise ValueError(
            f"{name}: leading dims {lead} do not broadcast against q's leading dims {target}"
        )


def _sum_to(x: np.ndarray, lead: tuple[int, ...], core: int) -> np.ndarray:
    """Sum ``x`` of shape ``(*big_lead, *core_shape)`` (``core`` trailing axes) to ``lead``."""
    extra = x.ndim - core - len(lead)
    if extra:
        x = x.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(lead) if n == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x


def _check_table_rows(name: str, rows: int) -> int:
    """``L`` from a table with ``rows = 2L - 1`` entries along the δ axis."""
    if rows % 2 == 0:
        raise ValueError(
            f"{name}: the δ axis must have odd length 2L-1 (row δ+L-1 for δ in [-(L-1), L-1]), "
            f"got {rows}"
        )
    return (rows + 1) // 2


# --------------------------------------------------------------------------------------------
# Position matrices
# --------------------------------------------------------------------------------------------


class _Positions:
    """A validated ``w``: builds dense ``W_δ`` and restricts dense ``dW_δ`` to the stored form.

    ``kind`` is ``"rotary"``, ``"block"``, ``"sparse"`` or ``"dense"``; ``L`` is None for Rotary
    (any δ); ``lead`` is the table's leading dims (broadcast against q's leading dims).
    """

    def __init__(self, w: Any, d: int, max_position: int | None) -> None:
        self.d = d
        self.L: int | None = None
        self.lead: tuple[int, ...] = ()
        if w is None:
            # plain dot-product attention: W_δ = I for every δ (q, k already rotated, or a
            # bias-only model such as T5 or ALiBi)
            self.kind = "none"
        elif isinstance(w, Rotary):
            self.kind = "rotary"
            theta, f = w.frequencies(d, max_position)
            self.theta = np.asarray(theta, dtype=np.float64)
            self.f2 = float(f) ** 2
            self.pairs = rotary_pairs(d, w.layout)
        elif isinstance(w, BlockW):
            self.kind = "block"
            if d % 2:
                raise ValueError(f"w: BlockW needs an even head dim, got d={d}")
            blocks = _as_float("w.blocks", w.blocks)
            if blocks.ndim < 4 or blocks.shape[-3:] != (d // 2, 2, 2):
                raise ValueError(
                    f"w.blocks: expected shape (..., 2L-1, {d // 2}, 2, 2) for d={d}, "
                    f"got {blocks.shape}"
                )
            self.L = _check_table_rows("w.blocks", blocks.shape[-4])
            self.lead = blocks.shape[:-4]
            self.values = blocks
            self.pairs = rotary_pairs(d, w.layout)
        elif isinstance(w, SparseW):
            self.kind = "sparse"
            support = np.asarray(w.support)
            if support.dtype.kind not in "iu":
                raise TypeError(f"w.support: expected an int array, got dtype {support.dtype}")
            if support.ndim != 2 or support.shape[1] != 2:
                raise ValueError(f"w.support: expected shape (|S|, 2), got {support.shape}")
            if support.size and (support.min() < 0 or support.max() >= d):
                raise ValueError(f"w.support: entries must lie in [0, {d}) for d={d}")
            if len({(int(a), int(b)) for a, b in support}) != len(support):
                raise ValueError("w.support: entries (l1, l2) must be distinct")
            values = _as_float("w.values", w.values)
            if values.ndim < 2 or values.shape[-1] != len(support):
                raise ValueError(
                    f"w.values: expected shape (..., 2L-1, {len(support)}) for |S|="
                    f"{len(support)}, got {values.shape}"
                )
            self.L = _check_table_rows("w.values", values.shape[-2])
            self.lead = values.shape[:-2]
            self.values = values
            self.support = support.astype(np.int64)
        else:
            if isinstance(w, (str, bytes, dict)):
                raise TypeError(
                    "w: expected Rotary, BlockW, SparseW or an array (..., 2L-1, d, d), "
                    f"got {type(w).__name__}"
                )
            self.kind = "dense"
            table = _as_float("w", w)
            if table.ndim < 3 or table.shape[-2:] != (d, d):
                raise ValueError(f"w: expected shape (..., 2L-1, {d}, {d}), got {table.shape}")
            self.L = _check_table_rows("w", table.shape[-3])
            self.lead = table.shape[:-3]
            self.values = table

    def check_range(self, lo: int, hi: int) -> None:
        """Raise ValueError unless every δ in ``[lo, hi]`` is in the table."""
        if self.L is None or lo > hi:
            return
        if lo < -(self.L - 1) or hi > self.L - 1:
            raise ValueError(
                f"w: the call needs δ in [{lo}, {hi}] but the table covers "
                f"[{-(self.L - 1)}, {self.L - 1}] (L={self.L}); give 2L-1 rows with "
                f"L >= {max(-lo, hi) + 1}"
            )

    def matrices(self, deltas: np.ndarray) -> np.ndarray:
        """Dense ``W_δ`` for each δ: shape ``(*lead, len(deltas), d, d)``."""
        d = self.d
        deltas = np.asarray(deltas, dtype=np.int64)
        self.check_range(int(deltas.min(initial=0)), int(deltas.max(initial=0)))
        if self.kind == "none":
            return np.broadcast_to(np.eye(d), (len(deltas), d, d)).copy()
        if self.kind == "rotary":
            out = np.zeros((len(deltas), d, d))
            phi = deltas[:, None].astype(np.float64) * self.theta[None, :]  # (nδ, d/2)
            c = self.f2 * np.cos(phi)
            s = self.f2 * np.sin(phi)
            p, r = self.pairs[:, 0], self.pairs[:, 1]
            out[:, p, p] = c
            out[:, r, r] = c
            out[:, p, r] = s
            out[:, r, p] = -s
            return out
        assert self.L is not None
        rows = deltas + self.L - 1
        if self.kind == "dense":
            return self.values[..., rows, :, :]
        out = np.zeros((*self.lead, len(deltas), d, d))
        if self.kind == "block":
            blocks = self.values[..., rows, :, :, :]  # (*lead, nδ, d/2, 2, 2)
            for a in range(2):
                for b in range(2):
                    out[..., self.pairs[:, a], self.pairs[:, b]] = blocks[..., :, a, b]
            return out
        vals = self.values[..., rows, :]  # (*lead, nδ, |S|)
        out[..., self.support[:, 0], self.support[:, 1]] = vals
        return out

    def restrict(self, dense: np.ndarray) -> np.ndarray | None:
        """Stored-form gradient from dense ``dW`` of shape ``(*lead, 2L-1, d, d)``."""
        if self.kind in ("rotary", "none"):
            return None
        if self.kind == "dense":
            return dense
        if self.kind == "block":
            out = np.empty((*dense.shape[:-2], self.d // 2, 2, 2))
            for a in range(2):
                for b in range(2):
                    out[..., a, b] = dense[..., self.pairs[:, a], self.pairs[:, b]]
            return out
        return dense[..., self.support[:, 0], self.support[:, 1]]


def position_matrices(
    w: Any, d: int, deltas: Sequence[int] | np.ndarray, max_position: int | None = None
) -> np.ndarray:
    """``W_δ`` as dense float64 matrices, shape ``(..., len(deltas), d, d)``, for any form of ``w``.

    ``...`` is the table's leading dims (none for Rotary).  For Rotary, with pairs ``(p, r)``:
    ``W[p,p] = W[r,r] = f² cos(δθ_m)``, ``W[p,r] = f² sin(δθ_m)``, ``W[r,p] = -f² sin(δθ_m)``,
    with ``θ, f = w.frequencies(d, max_position)``.  A δ outside a table's ``[-(L-1), L-1]``
    raises ValueError.
    """
    d = _as_int("d", d)
    if d <= 0:
        raise ValueError(f"d: expected a positive head dim, got {d}")
    deltas_arr = np.asarray(deltas)
    if deltas_arr.ndim != 1 or (deltas_arr.size and deltas_arr.dtype.kind not in "iu"):
        raise ValueError(f"deltas: expected a 1-D sequence of ints, got {deltas!r}")
    return _Positions(w, d, max_position).matrices(deltas_arr.astype(np.int64))


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


class _Problem:
    """Validated, float64, GQA-expanded inputs and the visible-δ set."""

    def __init__(
        self,
        q: Any,
        k: Any,
        v: Any,
        w: Any,
        *,
        scale: float | None,
        causal: bool,
        window: Any,
        bias: Any,
        q_offset: int,
        k_offset: int,
    ) -> None:
        q = _as_float("q", q)
        k = _as_float("k", k)
        v = _as_float("v", v)
        if q.ndim < 2:
            raise ValueError(f"q: expected shape (..., n_q, d), got {q.shape}")
        if k.ndim != q.ndim:
            raise ValueError(f"k: expected {q.ndim} dims like q {q.shape}, got shape {k.shape}")
        if v.ndim != q.ndim:
            raise ValueError(f"v: expected {q.ndim} dims like q {q.shape}, got shape {v.shape}")
        self.n_q, self.d = q.shape[-2:]
        self.n_k = k.shape[-2]
        self.d_v = v.shape[-1]
        if self.d == 0:
            raise ValueError(f"q: head dim d must be positive, got shape {q.shape}")
        if k.shape[-1] != self.d:
            raise ValueError(f"k: expected head dim d={self.d} like q, got shape {k.shape}")
        if v.shape[:-1] != k.shape[:-1]:
            raise ValueError(
                f"v: expected shape {(*k.shape[:-1], 'd_v')} (k's leading dims and n_k), "
                f"got {v.shape}"
            )
        lead = q.shape[:-2]
        self.k_shape, self.v_shape = k.shape, v.shape
        self.group = 1
        if k.shape[:-3] != q.shape[:-3] or (
            q.ndim >= 3 and (k.shape[-3] == 0 or q.shape[-3] % k.shape[-3] != 0)
        ):
            raise ValueError(
                f"k: leading dims {k.shape[:-2]} must equal q's {lead}, except that k's heads "
                "(axis -3) may divide q's (grouped-query attention)"
            )
        if q.ndim >= 3:
            self.group = q.shape[-3] // k.shape[-3]
            if self.group > 1:
                # q head h uses kv head h // group (repeat_interleave, PyTorch enable_gqa).
                k = np.repeat(k, self.group, axis=-3)
                v = np.repeat(v, self.group, axis=-3)
        self.q, self.k, self.v = q, k, v
        self.lead = lead

        if scale is None:
            self.scale = 1.0 / math.sqrt(self.d)
        else:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
            self.scale = float(scale)
            if not math.isfinite(self.scale):
                raise ValueError(f"scale: expected a finite float, got {scale!r}")

        self.q_offset = _as_int("q_offset", q_offset)
        self.k_offset = _as_int("k_offset", k_offset)
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")

        # Visible δ range: all δ of the rectangle, then causal, then the window.
        shift = self.q_offset - self.k_offset
        lo, hi = shift - (self.n_k - 1), shift + self.n_q - 1
        if causal:
            lo = max(lo, 0)
        if window is not None:
            if not isinstance(window, (tuple, list)) or len(window) != 2:
                raise TypeError(f"window: expected (left, right) or None, got {window!r}")
            left, right = window
            if left is not None:
                hi = min(hi, _as_int("window[0]", left))
            if right is not None:
                lo = max(lo, -_as_int("window[1]", right))
        if self.n_q == 0 or self.n_k == 0:
            lo, hi = 1, 0
        self.lo, self.hi, self.shift = lo, hi, shift

        max_position = max(self.q_offset + self.n_q - 1, self.k_offset + self.n_k - 1)
        self.w = _Positions(w, self.d, max_position)
        _broadcasts_to("w", self.w.lead, lead)
        self.w.check_range(lo, hi)

        self.bias: np.ndarray | None = None
        self.bias_L = 0
        if bias is not None:
            b = _as_float("bias", bias)
            if b.ndim < 1:
                raise ValueError(f"bias: expected shape (..., 2L-1), got {b.shape}")
            self.bias_L = _check_table_rows("bias", b.shape[-1])
            _broadcasts_to("bias", b.shape[:-1], lead)
            if lo <= hi and (lo < -(self.bias_L - 1) or hi > self.bias_L - 1):
                raise ValueError(
                    f"bias: the call needs δ in [{lo}, {hi}] but bias covers "
                    f"[{-(self.bias_L - 1)}, {self.bias_L - 1}] (L={self.bias_L})"
                )
            self.bias = b

    def diagonals(self) -> Iterator[tuple[int, slice, slice]]:
        """Yield ``(δ, rows, cols)`` for each visible δ: the slices with ``i - j = δ - shift``."""
        for delta in range(self.lo, self.hi + 1):
            t = delta - self.shift  # i - j
            i0, i1 = max(0, t), min(self.n_q, self.n_k + t)
            if i0 < i1:
                yield delta, slice(i0, i1), slice(i0 - t, i1 - t)

    def bias_at(self, delta: int) -> np.ndarray | float:
        """``b(δ)`` shaped ``(*bias_lead, 1)`` to broadcast against ``(*lead, x)``."""
        if self.bias is None:
            return 0.0
        return self.bias[..., delta + self.bias_L - 1, None]

    def forward(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(O, lse, P, W_by_delta)``: output, log-sum-exp, normalised weights and the W used."""
        q, k, v = self.q, self.k, self.v
        s = np.full((*self.lead, self.n_q, self.n_k), -np.inf)
        w_used: dict[int, np.ndarray] = {}
        for delta, rows, cols in self.diagonals():
            wd = self.w.matrices(np.array([delta]))[..., 0, :, :]  # (*w_lead, d, d)
            w_used[delta] = wd
            qw = q[..., rows, :] @ wd  # row i: q_i^T W_δ
            score = self.scale * np.sum(qw * k[..., cols, :], axis=-1) + self.bias_at(delta)
            idx = np.arange(rows.stop - rows.start)
            s[..., rows.start + idx, cols.start + idx] = score
        m = s.max(axis=-1, keepdims=True) if self.n_k else np.full((*s.shape[:-1], 1), -np.inf)
        m_safe = np.where(np.isfinite(m), m, 0.0)
        a = np.exp(s - m_safe)  # exp(-inf) = 0 for masked pairs and empty rows
        l_shift = a.sum(axis=-1, keepdims=True)
        empty = l_shift == 0.0
        p = a / np.where(empty, 1.0, l_shift)
        out = p @ v
        with np.errstate(divide="ignore"):
            lse = np.where(empty, -np.inf, m_safe + np.log(np.where(empty, 1.0, l_shift)))
        return out, lse[..., 0], p, w_used


def _check_out_grad(dout: Any, shape: tuple[int, ...]) -> np.ndarray:
    dout = _as_float("dout", dout)
    if dout.shape != shape:
        raise ValueError(f"dout: expected the output's shape {shape}, got {dout.shape}")
    return dout


def attention(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    eps: float = 0.0,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    bias: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    return_lse: bool = False,
    **ignored: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact attention with relative position matrices, in float64 (docs/DESIGN.md §1-§3).

    ``M_ij = scale q_i^T W_δ k_j``, ``A_ij = exp(M_ij + b(δ))`` (0 where masked),
    ``O_i = sum_j A_ij v_j / l_i`` with ``l_i = sum_j A_ij``; ``lse_i = log l_i``.

    Shapes: ``q (..., n_q, d)``, ``k (..., n_k, d)``, ``v (..., n_k, d_v)``; k/v's heads axis
    (-3) may divide q's (grouped-query attention).  ``eps`` is accepted and ignored (the oracle
    is exact), as are the keywords ``method``, ``memory_limit``, ``check_finite`` and
    ``num_threads`` (swallowed by ``**ignored``).  Returns ``out`` (``(..., n_q, d_v)``) or
    ``(out, lse)`` with ``lse`` of shape ``(..., n_q)``.
    """
    del eps, ignored
    prob = _Problem(
        q,
        k,
        v,
        w,
        scale=scale,
        causal=causal,
        window=window,
        bias=bias,
        q_offset=q_offset,
        k_offset=k_offset,
    )
    out, lse, _, _ = prob.forward()
    return (out, lse) if return_lse else out


def attention_grad(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    dout: Any,
    eps: float = 0.0,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    bias: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    out: Any = None,
    lse: Any = None,
    dlse: Any = None,
    **ignored: Any,
) -> Gradients:
    """Exact gradients of ``sum(attention(...) * dout)``, in float64.

    With ``P = A / l`` and ``dS = P ∘ (dO V^T - rowsum(dO ∘ O))``: ``dV = P^T dO``,
    ``dq_i = scale Σ_j dS_ij W_δ k_j``, ``dk_j = scale Σ_i dS_ij W_δ^T q_i``,
    ``dW_δ = scale Σ_{i-j=δ} dS_ij q_i k_j^T`` (restricted to the stored entries of ``w``;
    ``None`` for Rotary), ``db(δ) = Σ_{i-j=δ} dS_ij``.  ``dw`` and ``dbias`` are summed over
    broadcast dims, so they have the shapes of the given tables; dk and dv are summed over the
    q heads of each GQA group.  ``out`` and ``lse`` are accepted and ignored: the oracle
    recomputes the forward.  ``dlse`` (shape ``(..., n_q)``) adds ``sum(lse * dlse)`` to the
    differentiated function: ``dS = P ∘ (dO V^T - rowsum(dO ∘ O) + dlse)``.
    """
    del eps, ignored, out, lse
    prob = _Problem(
        q,
        k,
        v,
        w,
        scale=scale,
        causal=causal,
        window=window,
        bias=bias,
        q_offset=q_offset,
        k_offset=k_offset,
    )
    o, _, p, w_used = prob.forward()
    do = _check_out_grad(dout, o.shape)
    qq, kk, vv = prob.q, prob.k, prob.v

    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(vv, -1, -2)
    ds = p * (dp - np.sum(do * o, axis=-1, keepdims=True))
    if dlse is not None:
        g_lse = _as_float("dlse", dlse)
        if g_lse.shape != o.shape[:-1]:
            raise ValueError(f"dlse: expected shape {o.shape[:-1]} (lse's), got {g_lse.shape}")
        ds = ds + p * g_lse[..., None]

    dq = np.zeros_like(qq)
    dk = np.zeros_like(kk)
    d = prob.d
    dw_dense = None
    if prob.w.kind not in ("rotary", "none"):
        assert prob.w.L is not None
        dw_dense = np.zeros((*prob.w.lead, 2 * prob.w.L - 1, d, d))
    db = None
    if prob.bias is not None:
        db = np.zeros(prob.bias.shape)

    for delta, rows, cols in prob.diagonals():
        wd = w_used[delta]
        idx = np.arange(rows.stop - rows.start)
        ds_diag = ds[..., rows.start + idx, cols.start + idx][..., None]  # (*lead, x, 1)
        q_r, k_c = qq[..., rows, :], kk[..., cols, :]
        dq[..., rows, :] += prob.scale * ds_diag * (k_c @ np.swapaxes(wd, -1, -2))  # W_δ k_j
        dk[..., cols, :] += prob.scale * ds_diag * (q_r @ wd)  # W_δ^T q_i
        if dw_dense is not None:
            assert prob.w.L is not None
            g = prob.scale * (np.swapaxes(q_r * ds_diag, -1, -2) @ k_c)  # (*lead, d, d)
            dw_dense[..., delta + prob.w.L - 1, :, :] += _sum_to(g, prob.w.lead, 2)
        if db is not None:
            g = ds_diag[..., 0].sum(axis=-1)  # (*lead,)
            db[..., delta + prob.bias_L - 1] += _sum_to(g, prob.bias.shape[:-1], 0)

    if prob.group > 1:
        g = prob.group
        dk = dk.reshape(*prob.k_shape[:-2], g, *prob.k_shape[-2:]).sum(axis=-3)
        dv = dv.reshape(*prob.v_shape[:-2], g, *prob.v_shape[-2:]).sum(axis=-3)
    dw = None if dw_dense is None else prob.w.restrict(dw_dense)
    return Gradients(dq, dk, dv, dw, db)
