"""The public entry points: :func:`attention`, :func:`attention_grad` and :func:`plan`."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Union

import numpy as np

from . import _fastrope as _native
from . import _varlen
from ._api import (
    Call,
    _identity_rotary,
    check_eps,
    check_grad_error,
    check_method,
    check_threads,
    prepare,
    restore_dw,
)
from ._plan import Plan, _backward_probe, check_route, make_plan, resolve_memory_limit
from ._plan import kernel_eps as _kernel_eps
from ._position import Rotary
from ._types import ApproximationError, Gradients

__all__ = ["attention", "attention_grad", "plan"]


def _fast(
    call: Call,
    eps: float,
    limit: int,
    run: bool,
    threads: Optional[int],
    route: str,
    handle: Any = None,
    check_kv: bool = False,
):
    """The native fast forward: with ``run=False`` its plan (a dict holding the ``handle``),
    with ``run=True`` and that ``handle``, the plan executed as it is (no second planning).
    ``check_kv``: scan k and v for NaN/Inf natively before planning."""
    return _native.fast_forward(
        call.q4,
        call.k4,
        call.v4,
        **call.native_args(),
        eps=eps,
        memory_limit=limit,
        run=run,
        num_threads=threads,
        route=route,
        plan=handle,
        check_kv=check_kv,
    )


def _resolve(
    call: Call,
    eps: float,
    method: str,
    memory_limit: Any,
    backward: bool,
    threads: Optional[int],
    route: str,
    check_kv: bool = False,
) -> Plan:
    def probe(kernel_eps: float, limit: int) -> dict:
        return _fast(call, kernel_eps, limit, False, threads, route, check_kv=check_kv)[2]

    return make_plan(call, eps, method, memory_limit, backward=backward, fast_probe=probe)


def _finish_forward(call: Call, out4: np.ndarray, lse3: np.ndarray):
    batch, hq, hk, nq, nk, d, dv = call.shape
    if call.dv_padded:
        out4 = out4[..., :0]
        dv = 0
    out = out4.reshape(call.lead_q + (nq, dv))
    lse = lse3.reshape(call.lead_q + (nq,))
    return out, lse


def _forward(
    call: Call, threads: Optional[int], check_kv: bool = False, memory_limit: Optional[int] = None
):
    """The native exact forward; with ``memory_limit`` it raises ``MemoryError`` (before any
    allocation) when the working set exceeds it."""
    out4, lse3 = _native.exact_forward(
        call.q4,
        call.k4,
        call.v4,
        **call.native_args(),
        num_threads=threads,
        check_kv=check_kv,
        memory_limit=memory_limit,
    )
    return out4, lse3


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_MAX_OFFSET = 2**52


@functools.lru_cache(maxsize=64)
def _plain_rotary(base: float, layout: str, d: int) -> tuple:
    """The native encoding of ``Rotary(base, layout)`` without scaling (shared, read-only)."""
    w = Rotary(base, layout)
    theta, factor = w.frequencies(d)
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    theta.flags.writeable = False
    return (theta, float(factor), w.pairs(d))


def _plain_forward(q, k, v, w, scale, causal, q_offset, k_offset, check_finite, threads, limit):
    """The exact forward of a plain call, or None when the call is not one.

    A plain call (a decode step, a short prefill) has NumPy float32/float64 ``q``, ``k``, ``v``
    of 3 or 4 dims with matching batch and grouped heads, ``w`` None (even ``d``) or an unscaled
    :class:`Rotary`, int offsets, no bias, window or packing, and the exact method. It skips
    :func:`prepare` (whose general checks cost about as much as a small call's kernel) and goes
    to the native forward with the checks that native forward does not make itself (``q``'s
    values are scanned there too). Anything else returns None, and so does any error: the
    general path then runs and raises with its own message, so that both paths accept the
    same calls, give the same results and raise the same errors.
    """
    if type(q) is not np.ndarray or type(k) is not np.ndarray or type(v) is not np.ndarray:
        return None
    dtype = q.dtype
    nd = q.ndim
    if (
        (dtype != _F32 and dtype != _F64)
        or k.dtype != dtype
        or v.dtype != dtype
        or not 3 <= nd <= 4
        or k.ndim != nd
        or v.ndim != nd
        or type(q_offset) is not int
        or type(k_offset) is not int
        or not (causal is True or causal is False)
    ):
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    hq, nq, d = qs[-3:]
    hk, nk, dk = ks[-3:]
    if (
        dk != d
        or vs[:-1] != ks[:-1]
        or (nd == 4 and ks[0] != qs[0])
        or hk == 0
        or hq % hk
        or 0 in qs
        or 0 in vs
        or d % 2
        or abs(q_offset) > _MAX_OFFSET
        or abs(k_offset) > _MAX_OFFSET
    ):
        return None
    if w is None:
        rotary = _identity_rotary(d)
    elif type(w) is Rotary and w.scaling is None:
        rotary = _plain_rotary(w.base, w.layout, d)
    else:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    batch = qs[0] if nd == 4 else 1
    dv = vs[-1]
    q4, k4, v4 = (q, k, v) if nd == 4 else (q[None], k[None], v[None])
    try:
        out4, lse3 = _native.exact_forward(
            q4,
            k4,
            v4,
            shape=(batch, hq, hk, nq, nk, d, dv),
            scale=scale,
            causal=causal,
            window=None,
            q_offset=q_offset,
            k_offset=k_offset,
            rotary=rotary,
            support=None,
            values=None,
            w_index=None,
            bias=None,
            bias_index=None,
            num_threads=threads,
            check_kv=check_finite,
            check_q=check_finite,
            memory_limit=resolve_memory_limit(limit),
        )
    except (ValueError, TypeError, MemoryError):
        return None
    if nd == 3:
        out4, lse3 = out4[0], lse3[0]
    return out4, lse3


def attention(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    eps: float = 0.0,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[tuple] = None,
    bias: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    method: str = "auto",
    memory_limit: Optional[int] = None,
    return_lse: bool = False,
    check_finite: bool = True,
    num_threads: Optional[int] = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    route: Optional[str] = None,
) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Attention with relative-position matrices ``W_δ``.

    For query ``i`` at position ``p_i = q_offset + i`` and key ``j`` at ``p'_j = k_offset + j``,
    with ``δ = p_i - p'_j``::

        M_ij = scale * q_i^T W_δ k_j                    (scale defaults to 1/sqrt(d))
        A_ij = exp(M_ij + bias(δ))                       (0 where causal/window drop δ)
        out_i = Σ_j A_ij v_j / Σ_j A_ij,   lse_i = log Σ_j A_ij

    Args:
        q: ``(..., n_q, d)`` float32 or float64.  The axis -3, if any, is the heads axis.
        k: ``(..., n_k, d)``; its heads axis may divide q's (grouped-query attention).
        v: ``(..., n_k, d_v)``.
        w: :class:`Rotary`, :class:`BlockW`, :class:`SparseW` or an array ``(..., 2L-1, d, d)``
            (row ``δ + L - 1`` holds ``W_δ``); leading dims broadcast against q's leading dims.
            ``None``: ``W_δ = I``, plain scaled dot-product attention (q and k already rotated,
            or positions only through ``bias``, as in T5 or ALiBi).
        eps: the largest error allowed in any output entry; 0 means exact.
        scale: score scale, default ``1/sqrt(d)``.
        causal: drop pairs with ``δ < 0`` (top-left aligned with zero offsets, like PyTorch's
            ``is_causal``; ``q_offset = n_k - n_q`` gives flash-attn's bottom-right alignment).
        window: ``(left, right)``: keep ``-right <= δ <= left`` (None on a side: unbounded).
        bias: additive score bias per δ, ``(..., 2L-1)`` (e.g. :func:`alibi`); ``-inf`` masks.
        q_offset, k_offset: positions of the first query and key (a KV cache: ``q_offset =
            n_k - n_q``), ints with ``|offset| <= 2**52``.  Every position ``q_offset + i``,
            ``k_offset + j`` is then below ``2**53`` in magnitude, where float64 still holds
            each integer, so RoPE gives each position its own angle; the Rust API refuses
            Rotary (non-zero frequencies) at positions of ``2**53`` or more.
        method: ``"auto"``, ``"exact"`` or ``"fast"``.
        memory_limit: bytes the working set may use (default: 80% of available memory);
            ``MemoryError`` is raised before allocating beyond it.
        return_lse: also return ``lse`` of shape ``(..., n_q)``.
        check_finite: scan inputs for NaN/Inf and raise ``ValueError`` (default True).  Rows
            of ``k`` and ``v`` that no query can see (causal, window) may go unscanned: the
            exact forward reads and checks only the others.
        num_threads: threads to use (default: rayon's pool, ``RAYON_NUM_THREADS`` or all cores).
        cu_seqlens_q, cu_seqlens_k: packed sequences (flash-attn's ``cu_seqlens``): int arrays
            ``[0, len_0, len_0 + len_1, ...]`` splitting q's ``n_q`` axis (and k's, v's ``n_k``
            axis; default: the same as q's) into documents that attend only within themselves.
            Positions restart in each document: ``q_offset``/``k_offset`` (an int, or one int
            per document) place its first query and key, so RoPE, masks and biases apply per
            document.  No work or memory is spent on pairs across documents.
        route: the fast method's route: ``"auto"`` (the cheaper of those that certify),
            ``"toeplitz"`` (any ``w``, bias and mask) or ``"lowrank"`` (Rotary or ``w=None``,
            any mask and window, no bias or an ALiBi one: ``bias(δ) = -s|δ|``, as
            :func:`alibi` builds).  ``None``: ``FASTROPE_FAST_PATH`` from the
            environment if set, else ``"auto"``.  :func:`plan` lists the routes refused and why.

    Returns:
        ``out`` of shape ``(..., n_q, d_v)`` in the input dtype, and ``lse`` if asked for.  A row
        with no visible key returns ``out = 0`` and ``lse = -inf``.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        q, k, v = _varlen.arrays(("q", q), ("k", k), ("v", v))
        docs = _varlen.documents(
            cu_seqlens_q, cu_seqlens_k, q.shape[-2], k.shape[-2], q_offset, k_offset
        )
        return _varlen.attention(
            attention,
            q,
            k,
            v,
            w,
            eps,
            docs,
            return_lse,
            scale=scale,
            causal=causal,
            window=window,
            bias=bias,
            method=method,
            memory_limit=memory_limit,
            check_finite=check_finite,
            num_threads=num_threads,
            route=route,
        )
    eps = check_eps(eps)
    method = check_method(method)
    threads = check_threads(num_threads)
    route = check_route(route)
    if bias is None and window is None and (method == "exact" or (eps == 0.0 and method == "auto")):
        res = _plain_forward(
            q, k, v, w, scale, causal, q_offset, k_offset, check_finite, threads, memory_limit
        )
        if res is not None:
            return res if return_lse else res[0]
    # k and v are checked natively: by the exact forward as it reads them, or by the fast
    # method's planning probe (in parallel, before any bound is read from them).
    native_kv_check = check_finite
    call = prepare(
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
        check_finite=check_finite,
        defer_kv_check=native_kv_check,
    )
    if method == "exact" or (eps == 0.0 and method == "auto"):
        # The exact method, as make_plan would choose it, without building a Plan: the working
        # set is checked against memory_limit natively.
        limit = resolve_memory_limit(memory_limit)
        out4, lse3 = _forward(call, threads, check_kv=native_kv_check, memory_limit=limit)
        out, lse = _finish_forward(call, out4, lse3)
        return (out, lse) if return_lse else out
    p = _resolve(call, eps, method, memory_limit, False, threads, route, native_kv_check)
    if p.method == "fast":
        try:
            kernel_eps = _kernel_eps(call, eps)
            out4, lse3, _ = _fast(call, kernel_eps, p.memory_limit, True, threads, route, p.native)
        except ApproximationError:
            # A head's own data failed the run-time certificate (the plan's a-priori bound was
            # too loose to certify every head in advance): never return an uncertified result.
            if method == "fast":
                raise
            out4, lse3 = _forward(call, threads)
    else:
        out4, lse3 = _forward(call, threads, check_kv=native_kv_check)
    out, lse = _finish_forward(call, out4, lse3)
    return (out, lse) if return_lse else out


def attention_grad(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    dout: Any,
    eps: float = 0.0,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[tuple] = None,
    bias: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    method: str = "auto",
    memory_limit: Optional[int] = None,
    check_finite: bool = True,
    num_threads: Optional[int] = None,
    out: Any = None,
    lse: Any = None,
    dlse: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    route: Optional[str] = None,
    bias_grad: bool = True,
    grad_error: str = "relative",
) -> Gradients:
    """Gradients of ``sum(attention(q, k, v, w, ...) * dout)`` (``+ sum(lse * dlse)``).

    With ``P = A / l`` and ``dS = P ∘ (dout V^T - rowsum(dout ∘ out) + dlse)``::

        dv_j = Σ_i P_ij dout_i
        dq_i = scale Σ_j dS_ij W_δ k_j          dk_j = scale Σ_i dS_ij W_δ^T q_i
        dW_δ = scale Σ_{i-j=δ} dS_ij q_i k_j^T   dbias(δ) = Σ_{i-j=δ} dS_ij

    ``out`` and ``lse`` from a forward with ``return_lse=True`` may be passed to skip
    recomputing them.  ``dlse``, shape ``(..., n_q)``, is a cotangent for ``lse`` (the gradient
    of a loss that also uses ``lse``, e.g. a merge of sequence shards by
    :func:`merge_partials`).  With ``d lse_i / d A_ij = 1 / l_i`` it joins ``dS`` as above; the
    fast backward takes it on its low-rank path (:class:`Rotary` or ``w=None``, no bias or an
    ALiBi one with ``bias_grad=False``), elsewhere a nonzero ``dlse`` runs the exact backward
    (``method="fast"`` raises :class:`ApproximationError`).
    Returns :class:`Gradients` ``(dq, dk, dv, dw, dbias)``: ``dw`` in the stored
    layout of ``w`` (``None`` for :class:`Rotary`), ``dbias`` shaped like ``bias`` (or ``None``).
    With ``cu_seqlens_q``/``cu_seqlens_k`` (packed documents) ``dw`` and ``dbias`` are summed
    over the documents.  ``bias_grad=False`` skips ``dbias`` (returned as ``None``): for a
    fixed bias such as ALiBi's, which lets the fast backward take its low-rank route (the
    route computes no bias gradient).

    ``grad_error`` says what ``eps`` bounds in the fast backward.  ``"relative"`` (the
    default): each gradient ``G`` (``dq``, ``dk``, ``dv``, ``dw``, ``dbias``) satisfies
    ``max|G_fast - G| <= eps * S_G``, where ``S_G >= max|G|`` is a bound on the gradient's
    magnitude certified from this call's data (with ``Γ = max_i min(Σ_c |dout_ic| range(v_c),
    2 |dout_i| max_j |v_j - mid(v)|) + max|dlse|`` and the column sums ``colP`` of ``P``:
    ``S_dq = Γ scale max|W_δ k_j|``, ``S_dk = Γ scale max|W_δ^T q_i| colP``, ``S_dv =
    max|dout| colP``).  It is unchanged when ``dout`` is rescaled and does not grow with
    ``d_v``; :func:`plan` with ``backward=True, dout=...`` reports ``S_G``
    (``details["grad_scale"]``).  ``"absolute"``: every entry within ``eps`` of the exact
    gradient, ``max|G_fast - G| <= eps``.  Other arguments as in :func:`attention`.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        q, k, v, dout, out = _varlen.arrays(
            ("q", q), ("k", k), ("v", v), ("dout", dout), ("out", out)
        )
        lse = None if lse is None else np.asarray(lse)
        dlse = None if dlse is None else np.asarray(dlse)
        docs = _varlen.documents(
            cu_seqlens_q, cu_seqlens_k, q.shape[-2], k.shape[-2], q_offset, k_offset
        )
        return Gradients(
            *_varlen.attention_grad(
                attention_grad,
                q,
                k,
                v,
                w,
                dout,
                eps,
                docs,
                out,
                lse,
                dlse,
                scale=scale,
                causal=causal,
                window=window,
                bias=bias,
                method=method,
                memory_limit=memory_limit,
                check_finite=check_finite,
                num_threads=num_threads,
                route=route,
                bias_grad=bias_grad,
                grad_error=grad_error,
            )
        )
    eps = check_eps(eps)
    grad_error = check_grad_error(grad_error)
    method = check_method(method)
    threads = check_threads(num_threads)
    route = check_route(route)
    call = prepare(
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
        check_finite=check_finite,
        full_dense_support=True,
    )
    call.bias_grad = bool(bias_grad)
    call.grad_error = grad_error
    batch, hq, hk, nq, nk, d, dv = call.shape
    out_shape = call.lead_q + (nq, 0 if call.dv_padded else dv)
    dout_a = _like(dout, "dout", out_shape, call.dtype, check_finite)
    dlse_a = None
    if dlse is not None:
        dlse_a = _like(dlse, "dlse", call.lead_q + (nq,), call.dtype, check_finite)
        if not np.any(dlse_a):
            dlse_a = None
    dout4 = dout_a.reshape(batch, hq, nq, 0 if call.dv_padded else dv)
    if call.dv_padded:
        dout4 = np.zeros((batch, hq, nq, 1), call.dtype)
    dlse3 = None if dlse_a is None else np.ascontiguousarray(dlse_a.reshape(batch, hq, nq))
    p = make_plan(
        call,
        eps,
        method,
        memory_limit,
        backward=True,
        fast_probe=_backward_probe(call, None, dout4, threads, dlse3, route),
    )
    if p.method == "fast":
        try:
            # The fast backward recomputes the approximate forward it differentiates in its
            # first pass: `out`/`lse` are not needed.
            dq, dk, dv4, dw3, db2 = _fast_backward(
                call, dout4, eps, p.memory_limit, threads, dlse3, route, p.native
            )
            return _finish_grads(call, dq, dk, dv4, dw3, db2)
        except ApproximationError:
            # A head's own data failed the run-time certificate: never return an uncertified
            # result.
            if method == "fast":
                raise
    if dlse_a is not None:
        return _grad_with_dlse(call, dout_a, dlse_a, out, lse, check_finite, threads)
    if out is None or lse is None:
        out4, lse3 = _forward(call, threads)
    else:
        out4 = _like(out, "out", out_shape, call.dtype, check_finite)
        lse3 = _like(lse, "lse", call.lead_q + (nq,), call.dtype, False)
        if call.dv_padded:
            out4 = np.zeros(call.lead_q + (nq, 1), call.dtype)
        out4 = out4.reshape(batch, hq, nq, dv)
        lse3 = lse3.reshape(batch, hq, nq)
    dq, dk, dv4, dw3, db2 = _native.exact_backward(
        call.q4,
        call.k4,
        call.v4,
        out4,
        lse3,
        dout4,
        **call.native_args(),
        want_dw=call.values is not None,
        want_dbias=call.want_dbias,
        num_threads=threads,
    )
    return _finish_grads(call, dq, dk, dv4, dw3, db2)


def _grad_with_dlse(call: Call, dout_a, dlse_a, out, lse, check_finite: bool, threads):
    """The exact backward with a cotangent for ``lse``.

    ``d lse_i / d M_ij = P_ij``, so ``dS_ij = P_ij (dout_i · v_j - dout_i · out_i + dlse_i)``.
    The core computes ``dS_ij = P_ij (dout_i · v_j - D_i)`` with ``D_i = dout_i · out_i`` from
    the ``out`` it is given: a column ``0`` appended to ``v``, ``1`` to ``dout`` and ``-dlse`` to
    ``out`` gives exactly the above, and the extra column of ``dv`` is dropped.
    """
    batch, hq, hk, nq, nk, d, dv = call.shape
    dv_user = 0 if call.dv_padded else dv
    if out is None or lse is None:
        out4, lse3 = _forward(call, threads)
        out4 = out4[..., :dv_user]
    else:
        out4 = _like(out, "out", call.lead_q + (nq, dv_user), call.dtype, check_finite)
        lse3 = _like(lse, "lse", call.lead_q + (nq,), call.dtype, False)
        out4 = out4.reshape(batch, hq, nq, dv_user)
        lse3 = lse3.reshape(batch, hq, nq)
    col_q = (batch, hq, nq, 1)
    v2 = np.concatenate([call.v4[..., :dv_user], np.zeros((batch, hk, nk, 1), call.dtype)], axis=-1)
    out2 = np.concatenate([out4, -dlse_a.reshape(col_q)], axis=-1)
    dout2 = np.concatenate(
        [dout_a.reshape(batch, hq, nq, dv_user), np.ones(col_q, call.dtype)], axis=-1
    )
    args = call.native_args()
    args["shape"] = (batch, hq, hk, nq, nk, d, dv_user + 1)
    dq, dk, dv4, dw3, db2 = _native.exact_backward(
        call.q4,
        call.k4,
        v2,
        out2,
        lse3,
        dout2,
        **args,
        want_dw=call.values is not None,
        want_dbias=call.want_dbias,
        num_threads=threads,
    )
    dv4 = dv4[..., :dv_user]
    if call.dv_padded:  # _finish_grads drops the padded column of a d_v = 0 call
        dv4 = np.zeros((batch, hk, nk, 1), call.dtype)
    return _finish_grads(call, dq, dk, dv4, dw3, db2)


def _fast_backward(
    call: Call,
    dout4: np.ndarray,
    eps: float,
    limit: int,
    threads: Optional[int],
    dlse3: Optional[np.ndarray] = None,
    route: str = "auto",
    handle: Any = None,
):
    """The native fast backward: ``(dq, dk, dv, dw, dbias)`` in canonical form (the plan of
    ``handle`` executed as it is when given)."""
    res = _native.fast_backward(
        call.q4,
        call.k4,
        call.v4,
        dout4,
        **call.native_args(),
        eps=eps,
        want_dw=call.values is not None,
        want_dbias=call.want_dbias,
        memory_limit=limit,
        run=True,
        num_threads=threads,
        dlse=dlse3,
        route=route,
        plan=handle,
        grad_error=call.grad_error,
    )
    return res[:5]


def _finish_grads(call: Call, dq, dk, dv4, dw3, db2) -> Gradients:
    """Canonical gradients back into the caller's shapes and layouts."""
    batch, hq, hk, nq, nk, d, dv = call.shape
    if call.dv_padded:
        dv4 = dv4[..., :0]
    dbias = None if db2 is None else db2.reshape(call.bias_shape)
    if call.d_padded:  # w=None with an odd d: drop the zero column added to q and k
        d -= 1
        dq, dk = dq[..., :d], dk[..., :d]
    return Gradients(
        dq.reshape(call.lead_q + (nq, d)),
        dk.reshape(call.lead_k + (nk, d)),
        dv4.reshape(call.lead_k + (nk, dv4.shape[-1])),
        restore_dw(call, dw3),
        dbias,
    )


def _like(x: Any, name: str, shape: tuple, dtype: np.dtype, check_finite: bool) -> np.ndarray:
    from ._api import _check_finite, as_float_array

    a = as_float_array(x, name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    if check_finite:
        _check_finite(a, name)
    return np.asarray(a, dtype=dtype)


def _shape_arrays(q: Any, k: Any, v: Any, dtype: Any):
    """Zero-stride stand-ins for shape tuples (no memory), or None when arrays were given."""
    shapes = [x for x in (q, k, v) if isinstance(x, (tuple, list))]
    if not shapes:
        return None
    if len(shapes) != 3:
        raise TypeError("q, k, v: expected three arrays or three shape tuples, got a mix")
    dt = np.dtype(dtype)
    out = []
    for name, s in zip("qkv", (q, k, v)):
        if not all(isinstance(x, (int, np.integer)) and x >= 0 for x in s):
            raise ValueError(f"{name}: expected a shape tuple of non-negative ints, got {s!r}")
        out.append(np.broadcast_to(np.zeros((), dt), tuple(int(x) for x in s)))
    return out


def plan(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    eps: float = 0.0,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[tuple] = None,
    bias: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    method: str = "auto",
    memory_limit: Optional[int] = None,
    backward: bool = False,
    check_finite: bool = True,
    num_threads: Optional[int] = None,
    bound_r: Optional[float] = None,
    v_max: float = 1.0,
    dtype: Any = np.float32,
    route: Optional[str] = None,
    bias_grad: bool = True,
    grad_error: str = "relative",
    dout: Any = None,
) -> Plan:
    """What :func:`attention` (or, with ``backward=True``, :func:`attention_grad`) would do.

    ``q``, ``k``, ``v`` are arrays (the bounds ``R >= max|M_ij|`` and ``max|v|`` are read from
    them, as a call would) or shape tuples such as ``(8, 65536, 4)``: then ``bound_r`` (the
    largest ``|M_ij|`` to certify) and ``v_max`` give the bounds and ``dtype`` the input dtype,
    and the plan is a prediction for any inputs within them.  ``bias_grad`` and ``grad_error``
    as in :func:`attention_grad` (with ``backward=True``); ``dout`` (with ``backward=True`` and
    arrays) plans the backward for that ``dout`` (and ``details["grad_scale"]`` gives the
    magnitudes ``S_G`` the relative contract refers to), otherwise for any ``dout`` with
    entries at most 1.

    Returns a :class:`Plan`: the method and the fast route, its predicted cost and working set,
    the polynomial degree and certified error when the fast method is considered, ``why``, and
    ``refused``: every method and route considered and not taken, with the reason.
    """
    eps = check_eps(eps)
    method = check_method(method)
    threads = check_threads(num_threads)
    route = check_route(route)
    grad_error = check_grad_error(grad_error)
    stand_ins = _shape_arrays(q, k, v, dtype)
    if dout is not None and (stand_ins is not None or not backward):
        raise ValueError("dout: only with backward=True and arrays for q, k, v")
    given = None
    if stand_ins is not None:
        q, k, v = stand_ins
        if bound_r is None:
            raise ValueError("bound_r: required when q, k, v are shape tuples (the largest |M_ij|)")
        given = (float(bound_r), float(v_max))
        check_finite = False
    call = prepare(
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
        check_finite=check_finite,
        full_dense_support=backward,
    )
    if given is not None:
        call.v_max_given = given[1]
    call.bias_grad = bool(bias_grad)
    call.grad_error = grad_error

    def probe(kernel_eps: float, limit: int) -> dict:
        return _native.fast_forward(
            call.q4,
            call.k4,
            call.v4,
            **call.native_args(),
            eps=kernel_eps,
            memory_limit=limit,
            run=False,
            num_threads=threads,
            bounds=given,
            route=route,
        )[2]

    probe.route = route
    if dout is not None:
        batch, hq, hk, nq, nk, d, dv = call.shape
        out_shape = call.lead_q + (nq, 0 if call.dv_padded else dv)
        dout4 = _like(dout, "dout", out_shape, call.dtype, check_finite)
        if call.dv_padded:
            dout4 = np.zeros((batch, hq, nq, 1), call.dtype)
        dout4 = np.ascontiguousarray(dout4.reshape(batch, hq, nq, dout4.shape[-1]))
        probe = _backward_probe(call, None, dout4, threads, None, route)
    return make_plan(call, eps, method, memory_limit, backward=backward, fast_probe=probe)
