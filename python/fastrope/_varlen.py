"""Packed sequences ("varlen", flash-attn's ``cu_seqlens``): several documents along the
sequence axis of one row, attending only within themselves.

Document ``r`` holds query rows ``cu_seqlens_q[r] : cu_seqlens_q[r+1]`` and key rows
``cu_seqlens_k[r] : cu_seqlens_k[r+1]``; positions restart in every document (query ``i`` of a
document is at ``q_offset + i``, key ``j`` at ``k_offset + j``, the offsets an int or one int per
document), so RoPE, masks, windows and biases apply per document.  Each document is one call of
the core on views of ``q``, ``k``, ``v`` (no copies, no work or memory for pairs across
documents); ``dw`` and ``dbias`` are summed over the documents.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

__all__ = ["Document", "documents"]


class Document(NamedTuple):
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_offset: int
    k_offset: int


def _cu(cu: Any, name: str, total: int, axis_name: str) -> np.ndarray:
    if hasattr(cu, "detach"):  # a torch tensor
        cu = cu.detach().cpu().numpy()
    try:
        a = np.asarray(cu)
    except Exception as e:  # jax tracers and other non-arrays
        raise TypeError(
            f"{name}: expected a 1-D int array [0, len_0, len_0 + len_1, ...] with concrete"
            f" values, got {type(cu).__name__}"
        ) from e
    if a.dtype.kind not in "iu" or a.ndim != 1 or a.size == 0:
        raise TypeError(
            f"{name}: expected a 1-D int array [0, len_0, len_0 + len_1, ...], got"
            f" {a.dtype} array of shape {a.shape}"
        )
    a = a.astype(np.int64)
    if a[0] != 0 or np.any(np.diff(a) < 0) or a[-1] != total:
        raise ValueError(
            f"{name}: expected non-decreasing offsets from 0 to {total} (the length of the"
            f" {axis_name} axis), got {a.tolist() if a.size <= 12 else a}"
        )
    return a


def _offsets(x: Any, name: str, n_docs: int) -> np.ndarray:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return np.full(n_docs, int(x), np.int64)
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype.kind not in "iu" or a.shape != (n_docs,):
        raise TypeError(
            f"{name}: with cu_seqlens, expected an int or {n_docs} ints (one per document),"
            f" got {a.dtype} array of shape {a.shape}"
        )
    return a.astype(np.int64)


def documents(
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    total_q: int,
    total_k: int,
    q_offset: Any = 0,
    k_offset: Any = 0,
) -> list:
    """The documents of a packed call, checked (``cu_seqlens_k=None``: the same as ``q``'s)."""
    if cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q: needed with cu_seqlens_k")
    cq = _cu(cu_seqlens_q, "cu_seqlens_q", total_q, "q's n_q")
    ck = cq if cu_seqlens_k is None else _cu(cu_seqlens_k, "cu_seqlens_k", total_k, "k's n_k")
    if cu_seqlens_k is None and total_k != total_q:
        raise ValueError(
            f"cu_seqlens_k: needed when k's n_k ({total_k}) differs from q's n_q ({total_q})"
        )
    if ck.size != cq.size:
        raise ValueError(
            f"cu_seqlens_q, cu_seqlens_k: expected the same number of documents, got"
            f" {cq.size - 1} and {ck.size - 1}"
        )
    n = cq.size - 1
    qo = _offsets(q_offset, "q_offset", n)
    ko = _offsets(k_offset, "k_offset", n)
    return [
        Document(int(cq[r]), int(cq[r + 1]), int(ck[r]), int(ck[r + 1]), int(qo[r]), int(ko[r]))
        for r in range(n)
    ]


def arrays(*xs: Any) -> tuple:
    """The arguments as arrays that can be sliced along the sequence axis (None stays)."""
    out = []
    for name, x in xs:
        if x is None:
            out.append(None)
            continue
        a = np.asarray(x)
        if a.ndim < 2:
            raise ValueError(f"{name}: expected shape (..., n, d) with cu_seqlens, got {a.shape}")
        out.append(a)
    return tuple(out)


def _call(fn: Callable, q, k, v, w, eps, doc: Document, **kw):
    """``fn(..., return_lse=True)`` on one document's views of q, k, v."""
    return fn(
        q[..., doc.q_lo : doc.q_hi, :],
        k[..., doc.k_lo : doc.k_hi, :],
        v[..., doc.k_lo : doc.k_hi, :],
        w,
        eps,
        q_offset=doc.q_offset,
        k_offset=doc.k_offset,
        return_lse=True,
        **kw,
    )


def attention(fn: Callable, q, k, v, w, eps, docs: list, return_lse: bool, **kw):
    """``fn`` (:func:`fastrope.attention`) over each document; outputs written in place."""
    out = lse = None
    for doc in docs:
        if doc.q_hi == doc.q_lo:
            continue
        o, s = _call(fn, q, k, v, w, eps, doc, **kw)
        if out is None:
            out = np.zeros(o.shape[:-2] + (q.shape[-2], o.shape[-1]), o.dtype)
            lse = np.full(s.shape[:-1] + (q.shape[-2],), -np.inf, s.dtype)
        out[..., doc.q_lo : doc.q_hi, :] = o
        lse[..., doc.q_lo : doc.q_hi] = s
    if out is None:  # no query rows at all (so no pairs): the shapes and dtypes of one call
        out, lse = fn(q, k, v, w, eps, return_lse=True, **kw)
    return (out, lse) if return_lse else out


def _add(total: Optional[np.ndarray], part: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if part is None:
        return total
    return part.copy() if total is None else total + part


def attention_grad(fn: Callable, q, k, v, w, dout, eps, docs: list, out, lse, dlse, **kw):
    """``fn`` (:func:`fastrope.attention_grad`) over each document: dq, dk, dv in place, dw and
    dbias summed."""
    dq = dk = dv = None
    dw = dbias = None
    for doc in docs:
        if doc.q_hi == doc.q_lo:
            continue  # no query: no pair, nothing to differentiate
        qs, ks = np.s_[..., doc.q_lo : doc.q_hi, :], np.s_[..., doc.k_lo : doc.k_hi, :]
        rows = np.s_[..., doc.q_lo : doc.q_hi]
        g = fn(
            q[qs],
            k[ks],
            v[ks],
            w,
            dout[qs],
            eps,
            q_offset=doc.q_offset,
            k_offset=doc.k_offset,
            out=None if out is None else out[qs],
            lse=None if lse is None else lse[rows],
            dlse=None if dlse is None else dlse[rows],
            **kw,
        )
        if dq is None:
            dq = np.zeros(g.dq.shape[:-2] + q.shape[-2:], g.dq.dtype)
            dk = np.zeros(g.dk.shape[:-2] + k.shape[-2:], g.dk.dtype)
            dv = np.zeros(g.dv.shape[:-2] + v.shape[-2:], g.dv.dtype)
        dq[qs], dk[ks], dv[ks] = g.dq, g.dk, g.dv
        dw, dbias = _add(dw, g.dw), _add(dbias, g.dbias)
    if dq is None:  # no query rows at all (so no pairs): one call gives the zero gradients
        return fn(q, k, v, w, dout, eps, out=out, lse=lse, dlse=dlse, **kw)
    return dq, dk, dv, dw, dbias


def concatenated(fn: Callable, cat: Callable, q, k, v, w, eps, docs: list, return_lse, **kw):
    """``fn`` (a framework adapter's ``attention``) over each document, the results joined by
    ``cat(parts, axis)``: differentiable wherever ``fn`` and ``cat`` are."""
    outs, lses = [], []
    for doc in docs:
        if doc.q_hi == doc.q_lo:
            continue  # the query ranges are contiguous and in order: no gap is left
        o, s = _call(fn, q, k, v, w, eps, doc, **kw)
        outs.append(o)
        lses.append(s)
    if not outs:  # no query rows at all (so no pairs): the shapes and dtypes of one call
        return fn(q, k, v, w, eps, return_lse=return_lse, **kw)
    out = outs[0] if len(outs) == 1 else cat(outs, -2)
    lse = lses[0] if len(lses) == 1 else cat(lses, -1)
    return (out, lse) if return_lse else out
