"""Attention over a sharded key sequence: merge partial results by their log-sum-exp.

Split the keys into shards ``K_1, ..., K_S`` (with their values).  For one query row, attention
over shard ``s`` gives ``o_s = Σ_{j∈s} A_ij v_j / l_s`` and ``lse_s = log l_s`` with
``l_s = Σ_{j∈s} A_ij``.  Over all keys ``l = Σ_s l_s``, so::

    lse = log Σ_s exp(lse_s)                       (a logsumexp over shards)
    out = Σ_s exp(lse_s - lse) o_s                 (a convex combination of the partial outputs)

This is exact, not an approximation: with ``k_offset`` set to each shard's first position (and
the same ``q_offset``) every mask, bias and position matrix sees the same ``δ`` as in the
unsharded call.  A row that sees no key in a shard has ``o_s = 0, lse_s = -inf`` and weight 0; a
row that sees no key at all stays ``out = 0, lse = -inf`` (never NaN).

Gradients
---------
Two exact routes, both tested:

1. **Global statistics** (what a ring/sequence-parallel backward does).  The backward of
   attention needs, per query row, only ``P_ij = exp(M_ij + b_ij - lse_i)`` and
   ``D_i = dout_i · out_i``.  Both are *global* quantities: ``P`` restricted to the columns of
   shard ``s`` is ``exp(M - lse)`` with the merged ``lse``, and ``D`` uses the merged ``out``.
   So ``attention_grad(q, K_s, V_s, w, dout, out=OUT, lse=LSE, k_offset=...)`` with the merged
   ``OUT, LSE`` returns, for shard ``s``: its exact ``dk_s``, ``dv_s``, and its additive share of
   ``dq``, ``dw`` and ``dbias`` (sum those over shards).  No ``lse`` cotangent is involved.
2. **Through the merge** (what autograd does when ``merge_partials`` runs on tensors with
   ``fastrope.torch``): the merge's chain rule sends ``dout_s = exp(lse_s - lse) dout`` and
   ``dlse_s = exp(lse_s - lse) (dout · (o_s - out) + dlse)`` to each shard, and each shard's
   backward folds its ``dlse_s`` in (:func:`grad_with_lse_cotangent`).  The two routes agree.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from ._attention import attention_grad

__all__ = ["merge_partials", "grad_with_lse_cotangent", "check_shards"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def merge_partials(outs: Union[Sequence[Any], Any], lses: Union[Sequence[Any], Any]):
    """Merge partial attention results over key shards: ``(out, lse)`` of the whole key set.

    Args:
        outs: a sequence of ``(..., n_q, d_v)`` partial outputs (or one array with the shards on
            axis 0), each from ``attention(..., return_lse=True)`` over one key shard.
        lses: the matching ``(..., n_q)`` log-sum-exps.

    Returns:
        ``(out, lse)``: ``lse = logsumexp_s lse_s`` and ``out = Σ_s exp(lse_s - lse) out_s``.
        Rows with ``lse_s = -inf`` in every shard give ``out = 0, lse = -inf``.

    NumPy arrays in, NumPy arrays out.  torch tensors work too (the merge is then written in
    torch ops and is differentiable, including through each shard's ``lse``).

    >>> import numpy as np, fastrope
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 6, 8)) for _ in range(3))
    >>> w = fastrope.Rotary()
    >>> parts = [fastrope.attention(q, k[:, j:j + 3], v[:, j:j + 3], w, causal=True,
    ...                             k_offset=j, return_lse=True) for j in (0, 3)]
    >>> out, lse = fastrope.merge_partials(*zip(*parts))
    >>> bool(np.allclose(out, fastrope.attention(q, k, v, w, causal=True)))
    True
    """
    check_shards(outs, lses)
    first = outs[0] if isinstance(outs, (list, tuple)) else outs
    if _is_torch(first):
        # Deferred: torch is imported only when tensors are given (fastrope.torch imports this
        # module at load time, so this import is never a cycle).
        from .torch import merge_partials as merge_tensors

        return merge_tensors(outs, lses)
    o = _stack_np(outs, "outs")
    s = _stack_np(lses, "lses")
    if o.ndim < 3 or s.shape != o.shape[:-1]:
        raise ValueError(
            f"outs, lses: expected shards of shape (..., n_q, d_v) and (..., n_q), got stacked"
            f" {o.shape} and {s.shape}"
        )
    if np.isnan(s).any() or np.isposinf(s).any():
        raise ValueError("lses: expected finite values or -inf, got NaN or +inf")
    dtype = np.result_type(o.dtype, s.dtype)
    m = s.max(axis=0)
    m = np.where(np.isneginf(m), 0.0, m)
    wts = np.exp(s - m)  # -inf -> 0
    tot = wts.sum(axis=0)
    seen = tot > 0
    with np.errstate(divide="ignore"):
        lse = np.where(seen, m + np.log(np.where(seen, tot, 1.0)), -np.inf)
    out = np.einsum("s...,s...c->...c", wts, o) / np.where(seen, tot, 1.0)[..., None]
    return out.astype(dtype, copy=False), lse.astype(dtype, copy=False)


def check_shards(outs: Any, lses: Any) -> None:
    """The checks of :func:`merge_partials` shared by the NumPy and the torch merge."""
    for name, xs in (("outs", outs), ("lses", lses)):
        if isinstance(xs, (list, tuple)) and not xs:
            raise ValueError(f"{name}: expected at least one shard, got none")
    seqs = isinstance(outs, (list, tuple)) and isinstance(lses, (list, tuple))
    if seqs and len(outs) != len(lses):
        raise ValueError("outs, lses: expected one lse per partial output")


def _stack_np(xs: Any, name: str) -> np.ndarray:
    if isinstance(xs, (list, tuple)):
        if not xs:
            raise ValueError(f"{name}: expected at least one shard, got none")
        shapes = {np.shape(x) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"{name}: expected shards of one shape, got {sorted(shapes)}")
        a = np.stack([np.asarray(x) for x in xs])
    else:
        a = np.asarray(xs)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected float arrays, got dtype {a.dtype}")
    return a


def grad_with_lse_cotangent(q, k, v, w, dout, dlse, eps: float = 0.0, *, out, lse, **kw):
    """:func:`fastrope.attention_grad` of ``sum(out * dout) + sum(lse * dlse)``.

    ``d lse_i / d M_ij = P_ij``, so the score cotangent becomes
    ``dS_ij = P_ij (dout_i · v_j - dout_i · out_i + dlse_i)``: ``attention_grad(..., dlse=)``.
    ``out``/``lse`` are the forward's.  With ``dlse`` all zero (or None) this is plain
    ``attention_grad`` (and the fast backward may serve it).
    """
    if dlse is not None and not np.any(np.asarray(dlse) != 0):
        dlse = None
    return attention_grad(q, k, v, w, dout, eps, out=out, lse=lse, dlse=dlse, **kw)
