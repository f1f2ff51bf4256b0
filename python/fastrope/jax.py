"""JAX adapter: :func:`attention` under ``jit``, ``grad`` and ``vmap``.

``import fastrope`` needs only NumPy; this module needs ``jax`` (import it as ``fastrope.jax``).

The forward and the backward are each one ``jax.pure_callback`` into fastrope's CPU core, tied
together by ``jax.custom_vjp``; arguments are checked when the function is traced (shapes,
dtypes, table coverage), so mistakes fail at ``jit`` time with the core's own messages.  Under
``vmap`` the callbacks run once on the whole batch (``vmap_method="broadcast_all"``: the mapped
axes become extra leading batch dims of the core call, and position/bias tables get size-1 axes
so that they still line up with q's heads).  Gradients flow to ``q``, ``k``, ``v``, to the values
of a :class:`fastrope.BlockW` / :class:`fastrope.SparseW` / dense ``w`` and to ``bias``, and
through ``lse`` when it is returned.

Positions and masks (``q_offset``, ``k_offset``, ``causal``, ``window``, ``scale``) are static:
they must be Python numbers, not traced values.  float16/bfloat16 compute in float32; float64
needs ``jax.config.update("jax_enable_x64", True)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import fastrope

from . import _varlen
from ._merge import grad_with_lse_cotangent
from ._position import Rotary, SparseW
from ._validate import (
    WParts,
    check_eps,
    check_grad_error,
    check_method,
    check_one_dtype,
    join_w,
    split_w,
)
from .integrations import validate_shapes

__all__ = ["attention"]

# Number of trailing axes (after the table axis) of each table's stored values.
_TAIL = {"block": 3, "sparse": 1, "dense": 2, "bias": 0}


@dataclass(frozen=True)
class _Config:
    """Everything static about a call (hashable: it is a ``nondiff_argnums`` argument)."""

    kind: str  # "rotary" | "block" | "sparse" | "dense"
    rotary: Optional[Rotary]
    layout: str
    support: Optional[tuple]
    q_ndim: int
    w_ndim: int
    bias_ndim: int
    eps: float
    scale: Optional[float]
    causal: bool
    window: Optional[tuple]
    q_offset: int
    k_offset: int
    method: str
    memory_limit: Optional[int]
    check_finite: bool
    num_threads: Optional[int]
    grad_error: str = "relative"
    bias_grad: bool = True

    def w(self, values: Optional[np.ndarray]):
        sup = None
        if self.kind == "sparse":
            sup = np.asarray(self.support, dtype=np.int64).reshape(-1, 2)
        return join_w(WParts(self.kind, self.rotary, self.layout, values, sup))

    def kw(self) -> dict:
        return dict(
            scale=self.scale,
            causal=self.causal,
            window=self.window,
            q_offset=self.q_offset,
            k_offset=self.k_offset,
            method=self.method,
            memory_limit=self.memory_limit,
            check_finite=self.check_finite,
            num_threads=self.num_threads,
        )


def _align(x: Optional[np.ndarray], orig_ndim: int, tail: int, cfg: _Config, extra: int):
    """Give a table the vmapped batch axes and size-1 axes up to q's leading dims."""
    if x is None:
        return None
    lead_w = orig_ndim - 1 - tail  # leading dims before the table axis
    lead_q = cfg.q_ndim - 2
    pad = max(lead_q - lead_w, 0) if extra else 0
    return x.reshape(x.shape[:extra] + (1,) * pad + x.shape[extra:])


def _unalign(g: Optional[np.ndarray], shape: tuple):
    return None if g is None else np.ascontiguousarray(g).reshape(shape)


def _forward_host(cfg: _Config, q, k, v, wv, bias):
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    extra = q.ndim - cfg.q_ndim
    wv = None if wv is None else _align(np.asarray(wv), cfg.w_ndim, _TAIL[cfg.kind], cfg, extra)
    bias = None if bias is None else _align(np.asarray(bias), cfg.bias_ndim, 0, cfg, extra)
    out, lse = fastrope.attention(
        q, k, v, cfg.w(wv), cfg.eps, bias=bias, return_lse=True, **cfg.kw()
    )
    return out, lse


def _backward_host(cfg: _Config, q, k, v, wv, bias, out, lse, dout, dlse):
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    extra = q.ndim - cfg.q_ndim
    wv_shape = None if wv is None else np.shape(wv)
    b_shape = None if bias is None else np.shape(bias)
    wv = None if wv is None else _align(np.asarray(wv), cfg.w_ndim, _TAIL[cfg.kind], cfg, extra)
    bias = None if bias is None else _align(np.asarray(bias), cfg.bias_ndim, 0, cfg, extra)
    g = grad_with_lse_cotangent(
        q,
        k,
        v,
        cfg.w(wv),
        np.asarray(dout),
        np.asarray(dlse),
        cfg.eps,
        out=np.asarray(out),
        lse=np.asarray(lse),
        bias=bias,
        grad_error=cfg.grad_error,
        bias_grad=cfg.bias_grad,
        **cfg.kw(),
    )
    dbias = g.dbias
    if dbias is None and b_shape is not None:  # bias_grad=False: a zero cotangent for the bias
        dbias = np.zeros(b_shape, dtype=np.asarray(q).dtype)
    return g.dq, g.dk, g.dv, _unalign(g.dw, wv_shape), _unalign(dbias, b_shape)


def _sds(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _call_forward(cfg, q, k, v, wv, bias):
    lead = q.shape[:-1]
    shapes = (
        jax.ShapeDtypeStruct(lead + (v.shape[-1],), q.dtype),
        jax.ShapeDtypeStruct(lead, q.dtype),
    )
    return jax.pure_callback(
        functools.partial(_forward_host, cfg), shapes, q, k, v, wv, bias,
        vmap_method="broadcast_all",
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, wv, bias):
    return _call_forward(cfg, q, k, v, wv, bias)


def _attention_fwd(cfg, q, k, v, wv, bias):
    out, lse = _call_forward(cfg, q, k, v, wv, bias)
    return (out, lse), (q, k, v, wv, bias, out, lse)


def _attention_bwd(cfg, res, cts):
    q, k, v, wv, bias, out, lse = res
    dout, dlse = cts
    shapes = (
        _sds(q),
        _sds(k),
        _sds(v),
        None if wv is None else jax.ShapeDtypeStruct(wv.shape, q.dtype),
        None if bias is None else jax.ShapeDtypeStruct(bias.shape, q.dtype),
    )
    dq, dk, dv, dw, db = jax.pure_callback(
        functools.partial(_backward_host, cfg), shapes, q, k, v, wv, bias, out, lse,
        dout.astype(q.dtype), dlse.astype(q.dtype), vmap_method="broadcast_all",
    )  # fmt: skip
    dw = None if wv is None else dw.astype(wv.dtype)
    db = None if bias is None else db.astype(bias.dtype)
    return dq, dk, dv, dw, db


_attention.defvjp(_attention_fwd, _attention_bwd)


def _is_dense(w: Any) -> bool:
    return hasattr(w, "shape") and hasattr(w, "dtype")


def _static_int(x: Any, name: str) -> int:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name}: expected a Python int, got a traced value (it must be static)")
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


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
    grad_error: str = "relative",
    bias_grad: bool = True,
):
    """:func:`fastrope.attention` on JAX arrays, differentiable, usable under jit and vmap.

    Args:
        q: ``(..., n_q, d)``; axis -3, if any, is the heads axis.
        k: ``(..., n_k, d)``; its heads may divide q's (grouped-query attention).
        v: ``(..., n_k, d_v)``.
        w: :class:`fastrope.Rotary`, or :class:`fastrope.BlockW` / :class:`fastrope.SparseW` whose
            ``blocks``/``values`` are arrays (traced or not; ``SparseW.support`` must be
            concrete), or an array ``(..., 2L-1, d, d)``, or ``None`` (``W_δ = I``).
        bias: an additive Toeplitz bias ``(..., 2L-1)``.
        Everything else as in :func:`fastrope.attention`; ``scale``, ``causal``, ``window``,
        ``q_offset``, ``k_offset`` must be static Python values.

        cu_seqlens_q, cu_seqlens_k: packed documents, as in :func:`fastrope.attention`
            (concrete int arrays or lists, not traced values): one call per document, the
            results concatenated.
        grad_error: what ``eps`` bounds in the fast backward, as in
            :func:`fastrope.attention_grad`: ``"relative"`` (each gradient within ``eps`` times
            its certified magnitude) or ``"absolute"``.
        bias_grad: ``False`` declares ``bias`` fixed (ALiBi's slopes, say): its cotangent is
            zero and no ``dbias`` is computed, which lets the fast backward take its low-rank
            route (JAX does not tell a custom VJP which inputs need gradients).

    Returns:
        ``out`` ``(..., n_q, d_v)`` in q's dtype, and ``lse`` ``(..., n_q)`` with
        ``return_lse=True`` (float32 for float16/bfloat16 inputs).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        docs = _varlen.documents(
            cu_seqlens_q, cu_seqlens_k, q.shape[-2], k.shape[-2], q_offset, k_offset
        )
        return _varlen.concatenated(
            attention,
            lambda xs, axis: jnp.concatenate(xs, axis=axis),
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
            grad_error=grad_error,
            bias_grad=bias_grad,
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a float array, got dtype {x.dtype}")
    check_one_dtype(q, k, v)
    in_dtype = q.dtype
    dtype = jnp.float64 if in_dtype == jnp.float64 else jnp.float32
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)

    if isinstance(w, SparseW) and isinstance(w.support, jax.core.Tracer):
        raise TypeError("w.support: expected a concrete int array, got a traced value")
    parts = split_w(w, _is_dense, describe_w=lambda x: type(x).__name__)
    kind, rotary, layout = parts.kind, parts.rotary, parts.layout
    wv = None if parts.values is None else jnp.asarray(parts.values)
    support, sup = None, None
    if kind == "sparse":
        sup = np.asarray(parts.support)
        support = tuple(int(x) for x in sup.reshape(-1)) if sup.dtype.kind in "iu" else None
    # w with shapes for its arrays, for the trace-time checks
    w_shape = join_w(parts._replace(values=None if wv is None else wv.shape, support=sup))
    for name, x in (("w", wv), ("bias", bias)):
        if x is not None and not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise TypeError(f"{name}: expected float values, got dtype {jnp.asarray(x).dtype}")
    wv = None if wv is None else wv.astype(dtype)
    bias = None if bias is None else jnp.asarray(bias).astype(dtype)
    for name, x in (("scale", scale), ("window", window)):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"{name}: expected a static Python value, got a traced value")
    q_offset, k_offset = _static_int(q_offset, "q_offset"), _static_int(k_offset, "k_offset")
    cfg_kw = dict(
        scale=None if scale is None else float(scale),
        causal=causal,
        window=None if window is None else tuple(window),
        q_offset=q_offset,
        k_offset=k_offset,
    )
    np_dtype = np.float64 if dtype == jnp.float64 else np.float32
    validate_shapes(
        q.shape,
        k.shape,
        v.shape,
        w_shape,
        None if bias is None else bias.shape,
        np_dtype,
        **cfg_kw,
    )
    cfg = _Config(
        kind=kind,
        rotary=rotary,
        layout=layout,
        support=support,
        q_ndim=q.ndim,
        w_ndim=0 if wv is None else wv.ndim,
        bias_ndim=0 if bias is None else bias.ndim,
        eps=check_eps(eps),
        method=check_method(method),
        memory_limit=memory_limit,
        check_finite=bool(check_finite),
        num_threads=num_threads,
        grad_error=check_grad_error(grad_error),
        bias_grad=bool(bias_grad),
        **cfg_kw,
    )
    out, lse = _attention(cfg, q, k, v, wv, bias)
    out = out.astype(in_dtype)
    return (out, lse) if return_lse else out
