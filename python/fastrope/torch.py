"""PyTorch adapter: :func:`attention` as ``torch.library`` custom ops, and :class:`RopeAttention`.

``import fastrope`` needs only NumPy; this module needs ``torch`` (import it as
``fastrope.torch``).  The computation is fastrope's CPU core: tensors go to NumPy without a copy,
the GIL is released while the core runs, and results come back as tensors.

Two custom ops, each with a fake (shape) function, so that eager mode, ``torch.compile`` and
``torch.library.opcheck`` all see the same thing (the flash-attention pattern)::

    fastrope::attention_fwd(q, k, v, w_values?, w_support?, bias?, <config>) -> (out, lse)
    fastrope::attention_bwd(dout, dlse?, q, k, v, out, lse, w_values?, w_support?, bias?, <config>)
        -> (dq, dk, dv, dw, dbias)

and ``register_autograd`` connects them: gradients flow to ``q``, ``k``, ``v``, to tensor-valued
position matrices (``BlockW.blocks``, ``SparseW.values``, a dense ``W``) and to ``bias``, and
also through ``lse`` when it is returned (so :func:`fastrope.merge_partials` over shards is
differentiable end to end).  The position matrix travels as op arguments: a kind
(``"rotary"``, ``"block"``, ``"sparse"``, ``"dense"``), a spec string (the rotary parameters as
JSON, or the block layout) and the values/support tensors.

float16/bfloat16 inputs are computed in float32; ``out`` has the input dtype and ``lse`` is
float32.  Only CPU tensors are accepted.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

import fastrope

from . import _varlen
from ._attention import _plain_forward, _plain_rotary
from ._merge import check_shards, grad_with_lse_cotangent
from ._position import BlockW, Rotary, _rotate_rows
from ._validate import UNBOUNDED as _UNBOUNDED
from ._validate import (
    WParts,
    check_eps,
    check_grad_error,
    check_method,
    check_one_dtype,
    check_threads,
    join_w,
    split_w,
    window_pair,
)
from .integrations import validate_shapes

__all__ = ["attention", "merge_partials", "RopeAttention", "KVCache", "rotary_blocks", "rotate"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_PLAIN_DTYPES = (torch.float32, torch.float64)
_FLOATS = _PLAIN_DTYPES + _LOW_PRECISION


# ------------------------------------------------------------------------------------------
# Encoding w as op arguments
# ------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _rotary_spec(w: Rotary) -> str:
    scaling = None if w.scaling is None else dict(w.scaling)
    return json.dumps({"base": float(w.base), "layout": w.layout, "scaling": scaling})


@functools.lru_cache(maxsize=64)
def _rotary_from_spec(spec: str) -> Rotary:
    p = json.loads(spec)
    return Rotary(base=p["base"], layout=p["layout"], scaling=p["scaling"])


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name}: expected a torch.Tensor (or a NumPy array), got {type(x).__name__}")


def _is_dense(w: Any) -> bool:
    return isinstance(w, (Tensor, np.ndarray))


def _encode_w(w: Any):
    """``(kind, spec, values, support)`` for the op arguments."""
    p = split_w(w, _is_dense, "a tensor", lambda x: type(x).__name__)
    if p.kind in ("none", "rotary"):
        return p.kind, "" if w is None else _rotary_spec(w), None, None
    if p.kind == "block":
        return "block", p.layout, _as_tensor(p.values, "w.blocks"), None
    if p.kind == "sparse":
        sup = p.support
        if not isinstance(sup, Tensor):
            sup = torch.as_tensor(np.asarray(sup))
        if sup.is_floating_point() or sup.dtype == torch.bool:
            raise TypeError(
                f"w.support: expected an int array of shape (|S|, 2), got dtype {sup.dtype}"
            )
        return "sparse", "", _as_tensor(p.values, "w.values"), sup.to(torch.int64)
    return "dense", "", _as_tensor(p.values, "w"), None


def _decode_w(kind: str, spec: str, values: Any, support: Any):
    """The ``w`` that :func:`_encode_w` encoded (``values`` may be shape stand-ins)."""
    rotary = _rotary_from_spec(spec) if kind == "rotary" else None
    layout = spec if kind == "block" else "interleaved"
    return join_w(WParts(kind, rotary, layout, values, support))


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """``t`` as an array (a view), detached only when it requires grad (a detach is a tensor
    per call)."""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _t(a: Optional[np.ndarray], dtype: torch.dtype) -> Tensor:
    if a is None:
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(a))


def _window(window: Optional[Sequence]) -> Optional[List[int]]:
    if window is None:
        return None
    return [_UNBOUNDED if x is None else x for x in window_pair(window)]


def _kw(scale, causal, window, q_offset, k_offset, check_finite):
    return dict(
        scale=None if scale is None or math.isnan(scale) else scale,
        causal=causal,
        window=None if window is None else tuple(window),
        q_offset=q_offset,
        k_offset=k_offset,
        check_finite=check_finite,
    )


def _static_shapes(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or all(isinstance(s, int) for s in t.shape) for t in tensors)


# ------------------------------------------------------------------------------------------
# The custom ops
# ------------------------------------------------------------------------------------------


def _forward_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_values: Optional[Tensor],
    w_support: Optional[Tensor],
    bias: Optional[Tensor],
    w_kind: str,
    w_spec: str,
    eps: float,
    scale: float,
    causal: bool,
    window: Optional[List[int]],
    q_offset: int,
    k_offset: int,
    method: str,
    memory_limit: Optional[int],
    check_finite: bool,
    num_threads: Optional[int],
    grad_error: str,
) -> tuple[Tensor, Tensor]:
    """The forward op; ``grad_error`` is unused here and carried to the backward's config."""
    _check_cpu(q=q, k=k, v=v, w_values=w_values, bias=bias)
    w = _decode_w(w_kind, w_spec, _np(w_values), _np(w_support))
    out, lse = fastrope.attention(
        _np(q),
        _np(k),
        _np(v),
        w,
        eps,
        bias=_np(bias),
        method=method,
        memory_limit=memory_limit,
        num_threads=num_threads,
        return_lse=True,
        **_kw(scale, causal, window, q_offset, k_offset, check_finite),
    )
    return _t(out, q.dtype), _t(lse, q.dtype)


_attention_fwd = torch.library.custom_op("fastrope::attention_fwd", mutates_args=())(_forward_impl)


def _plain_call(*tensors: Optional[Tensor]) -> bool:
    """Whether a call can skip the custom op's dispatch (~50 us, a third of a small decode step):
    nothing to differentiate (inference mode, no_grad, or no input requiring grad), and neither
    torch.compile nor a torch.func transform watching."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


@_attention_fwd.register_fake
def _attention_fwd_fake(
    q, k, v, w_values, w_support, bias, w_kind, w_spec, eps, scale, causal, window, q_offset,
    k_offset, method, memory_limit, check_finite, num_threads, grad_error,
):  # fmt: skip
    if _static_shapes(q, k, v, w_values, bias) and isinstance(q_offset + k_offset, int):
        support = None
        if w_kind == "sparse":  # the support's entries are data: a stand-in of the same size
            n, d = w_support.shape[0], q.shape[-1]
            support = np.stack(np.divmod(np.arange(n), d), 1)
        values = None if w_values is None else tuple(w_values.shape)
        w = _decode_w(w_kind, w_spec, values, support)
        validate_shapes(
            q.shape, k.shape, v.shape, w, None if bias is None else bias.shape,
            np.float64 if q.dtype == torch.float64 else np.float32,
            **_kw(scale, causal, window, q_offset, k_offset, False),
        )  # fmt: skip
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(q.shape[:-1])
    return out, lse


@torch.library.custom_op("fastrope::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    w_values: Optional[Tensor],
    w_support: Optional[Tensor],
    bias: Optional[Tensor],
    w_kind: str,
    w_spec: str,
    eps: float,
    scale: float,
    causal: bool,
    window: Optional[List[int]],
    q_offset: int,
    k_offset: int,
    method: str,
    memory_limit: Optional[int],
    check_finite: bool,
    num_threads: Optional[int],
    grad_error: str,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_cpu(q=q, k=k, v=v, w_values=w_values, bias=bias)
    w = _decode_w(w_kind, w_spec, _np(w_values), _np(w_support))
    g = grad_with_lse_cotangent(
        _np(q),
        _np(k),
        _np(v),
        w,
        _np(dout),
        _np(dlse),
        eps,
        out=_np(out),
        lse=_np(lse),
        bias=_np(bias),
        method=method,
        memory_limit=memory_limit,
        num_threads=num_threads,
        bias_grad=bias_grad,
        grad_error=grad_error,
        **_kw(scale, causal, window, q_offset, k_offset, check_finite),
    )
    return (
        _t(g.dq, q.dtype),
        _t(g.dk, q.dtype),
        _t(g.dv, q.dtype),
        _t(g.dw, q.dtype),
        _t(g.dbias, q.dtype),
    )


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, w_values, w_support, bias, *args):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t, dtype=q.dtype).contiguous()

    return (
        torch.empty_like(q).contiguous(),
        torch.empty_like(k).contiguous(),
        torch.empty_like(v).contiguous(),
        like(w_values),
        like(bias),
    )


_CONFIG = (
    "w_kind",
    "w_spec",
    "eps",
    "scale",
    "causal",
    "window",
    "q_offset",
    "k_offset",
    "method",
    "memory_limit",
    "check_finite",
    "num_threads",
    "grad_error",
)


def _setup_context(ctx, inputs, output):
    q, k, v, w_values, w_support, bias = inputs[:6]
    out, lse = output
    ctx.config = inputs[6:]
    ctx.save_for_backward(q, k, v, w_values, w_support, bias, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, w_values, w_support, bias, out, lse = ctx.saved_tensors
    # a bias that needs no gradient (ALiBi's fixed slopes) leaves the fast backward its
    # low-rank route
    bias_grad = bias is not None and bool(ctx.needs_input_grad[5])
    dq, dk, dv, dw, dbias = _attention_bwd(
        dout.contiguous(),
        dlse,
        q,
        k,
        v,
        out,
        lse,
        w_values,
        w_support,
        bias,
        *ctx.config,
        bias_grad,
    )
    return (
        dq,
        dk,
        dv,
        None if w_values is None else dw,
        None,
        dbias if bias_grad else None,
    ) + (None,) * len(_CONFIG)


torch.library.register_autograd("fastrope::attention_fwd", _backward, setup_context=_setup_context)


def _check_cpu(**tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(
                f"{name}: expected a CPU tensor, got one on device {t.device} (fastrope is a CPU"
                " library: move the tensors with .cpu())"
            )


# ------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Any,
    eps: float = 0.0,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Optional[tuple] = None,
    bias: Optional[Tensor] = None,
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
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`fastrope.attention` on CPU tensors, differentiable, usable under ``torch.compile``.

    Args:
        q: ``(..., n_q, d)``; axis -3, if any, is the heads axis.
        k: ``(..., n_k, d)``; its heads may divide q's (grouped-query attention).
        v: ``(..., n_k, d_v)``.
        w: :class:`fastrope.Rotary`, or :class:`fastrope.BlockW` / :class:`fastrope.SparseW` whose
            ``blocks``/``values`` are tensors, or a tensor ``(..., 2L-1, d, d)``.  Gradients flow
            to those tensors when they require grad.  ``None``: ``W_δ = I`` (q, k already
            rotated, or positions only through ``bias``).
        bias: an additive Toeplitz bias tensor ``(..., 2L-1)`` (gradients flow to it).
        Everything else as in :func:`fastrope.attention`: ``δ = (q_offset + i) - (k_offset + j)``;
        ``causal`` keeps ``δ >= 0``, ``window=(left, right)`` keeps ``-right <= δ <= left``::

            causal, q_offset = n_k - n_q = 2 (KV cache)     ■ visible  ⬚ masked
                k:  0 1 2 3 4
            q 0:    ■ ■ ■ ⬚ ⬚
            q 1:    ■ ■ ■ ■ ⬚
            q 2:    ■ ■ ■ ■ ■

        cu_seqlens_q, cu_seqlens_k: packed documents, as in :func:`fastrope.attention`
            (concrete int arrays or lists, not traced values): one call per document, the
            results concatenated.
        grad_error: what ``eps`` bounds in the fast backward, as in
            :func:`fastrope.attention_grad`: ``"relative"`` (each gradient within ``eps`` times
            its certified magnitude) or ``"absolute"``.

    Returns:
        ``out`` ``(..., n_q, d_v)`` in q's dtype, and with ``return_lse=True`` also ``lse``
        ``(..., n_q)`` (float32 for float16/bfloat16 inputs).  A row that sees no key gets 0 and
        ``lse = -inf``.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        docs = _varlen.documents(
            cu_seqlens_q, cu_seqlens_k, q.shape[-2], k.shape[-2], q_offset, k_offset
        )
        return _varlen.concatenated(
            attention,
            lambda xs, axis: torch.cat(xs, dim=axis),
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
        )
    if (
        bias is None
        and window is None
        and type(q) is Tensor
        and type(k) is Tensor
        and type(v) is Tensor
        and q.dtype in _PLAIN_DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.device.type == "cpu"
        and k.device.type == "cpu"
        and v.device.type == "cpu"
        and (method == "exact" or (method == "auto" and type(eps) in (int, float) and eps == 0))
        and _plain_call(q, k, v)
    ):
        # A plain call with nothing to differentiate (a generation step): straight to the NumPy
        # API's plain path (see fastrope._attention._plain_forward), without the custom op's
        # argument encoding. Anything that path does not take goes on below.
        check_eps(eps)
        check_grad_error(grad_error)
        res = _plain_forward(
            _np(q), _np(k), _np(v), w, scale, causal, q_offset, k_offset,
            check_finite, check_threads(num_threads), memory_limit,
        )  # fmt: skip
        if res is not None:
            out = torch.from_numpy(res[0])
            return (out, torch.from_numpy(res[1])) if return_lse else out
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
            )
    check_one_dtype(q, k, v)
    kind, spec, w_values, w_support = _encode_w(w)
    if bias is not None:
        bias = _as_tensor(bias, "bias")
    _check_cpu(q=q, k=k, v=v, w_values=w_values, bias=bias)
    eps = check_eps(eps)
    method = check_method(method)
    grad_error = check_grad_error(grad_error)
    in_dtype = q.dtype
    dtype = torch.float32 if in_dtype in _LOW_PRECISION else in_dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if w_values is not None:
        if not w_values.is_floating_point():
            raise TypeError(f"w: expected float values, got dtype {w_values.dtype}")
        w_values = w_values.to(dtype)
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bias: expected a float tensor, got dtype {bias.dtype}")
        bias = bias.to(dtype)
    op = _forward_impl if _plain_call(q, k, v, w_values, bias) else _attention_fwd
    out, lse = op(
        q,
        k,
        v,
        w_values,
        w_support,
        bias,
        kind,
        spec,
        eps,
        math.nan if scale is None else float(scale),
        causal,
        _window(window),
        q_offset,
        k_offset,
        method,
        memory_limit,
        check_finite,
        num_threads,
        grad_error,
    )
    out = out.to(in_dtype)
    return (out, lse) if return_lse else out


def merge_partials(outs: Union[Sequence[Tensor], Tensor], lses: Union[Sequence[Tensor], Tensor]):
    """:func:`fastrope.merge_partials` on tensors, written in torch ops: differentiable, also
    through each shard's ``lse`` (so sharded attention backpropagates end to end).

    ``fastrope.merge_partials`` calls this when it is given tensors.
    """
    check_shards(outs, lses)
    o = torch.stack(list(outs)) if isinstance(outs, (list, tuple)) else outs
    s = torch.stack(list(lses)) if isinstance(lses, (list, tuple)) else lses
    if o.ndim < 3 or tuple(s.shape) != tuple(o.shape[:-1]):
        raise ValueError(
            f"outs, lses: expected shards of shape (..., n_q, d_v) and (..., n_q), got stacked"
            f" {tuple(o.shape)} and {tuple(s.shape)}"
        )
    s = s.to(o.dtype) if s.dtype != o.dtype and o.dtype in (torch.float32, torch.float64) else s
    # The result does not depend on the shift m, so it carries no gradient (and the all -inf
    # rows never see log(0) or 0 * inf in the backward).
    m = s.detach().amax(dim=0)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wts = torch.exp(s - m)
    tot = wts.sum(dim=0)
    seen = tot > 0
    safe = torch.where(seen, tot, torch.ones_like(tot))
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(tot, -float("inf")))
    out = (wts.unsqueeze(-1) * o.to(wts.dtype)).sum(dim=0) / safe.unsqueeze(-1)
    return out.to(o.dtype), lse


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------


def rotary_blocks(
    head_dim: int,
    max_len: int,
    base: float = 10000.0,
    layout: str = "interleaved",
    heads: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A ``BlockW`` table ``(heads?, 2L-1, d/2, 2, 2)`` equal to RoPE: a learnable RoPE start.

    ``blocks[δ + L - 1, m] = [[cos δθ_m, sin δθ_m], [-sin δθ_m, cos δθ_m]]`` with
    ``θ_m = base^(-2m/d)`` (docs/DESIGN.md §1), so ``BlockW(rotary_blocks(...))`` equals
    ``Rotary(base, layout)`` for ``|δ| < max_len``.
    """
    theta, _ = Rotary(base=base, layout=layout).frequencies(head_dim)
    delta = np.arange(-(max_len - 1), max_len, dtype=np.float64)
    ang = delta[:, None] * theta[None, :]
    c, s = np.cos(ang), np.sin(ang)
    blocks = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
    t = torch.from_numpy(blocks).to(dtype)
    if heads is not None:
        t = t.expand((heads,) + t.shape).clone()
    return t


def rotate(
    x: Tensor, w: Rotary, position: int = 0, *, max_position: Optional[int] = None
) -> Tensor:
    """``x`` ``(..., n, d)`` rotated as :class:`fastrope.Rotary` ``w`` rotates row ``i`` at
    ``position + i``, times the attention factor: ``x_p' = f (x_p cos φ - x_r sin φ)``,
    ``x_r' = f (x_p sin φ + x_r cos φ)``, ``φ = (position + i) θ_m`` for each pair ``(p, r)``.

    ``attention(rotate(q, w, q_offset), rotate(k, w, k_offset), v, None)`` equals
    ``attention(q, k, v, w, q_offset=q_offset, k_offset=k_offset)`` up to rounding (masks and
    biases still take the offsets).  Differentiable (torch ops; angles in float64).
    ``max_position`` is the largest position of the call, for ``"dynamic"`` scaling only.
    """
    d, n = x.shape[-1], x.shape[-2]
    if type(w) is Rotary and w.scaling is None and d % 2 == 0:
        theta, factor, _ = _plain_rotary(w.base, w.layout, d)
    elif _static_frequencies(w):
        theta, factor = _frequencies(_rotary_spec(w), d)
    else:
        theta, factor = w.frequencies(d, max_position)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _plain_call(x):
        # Nothing to differentiate: the same arithmetic in NumPy (a decode step's query is one
        # row, and a dozen torch ops on it cost more than the attention's NumPy overhead).
        xn = _np(x)
        c, s = _tables(theta, factor, position, n, xn.dtype)
        return torch.from_numpy(_rotate_rows(xn, c, s, w.layout))
    ang = np.arange(position, position + n, dtype=np.float64)[:, None] * theta[None, :]
    # float16/bfloat16 rotate in float32 and round once (as the attention computes in float32).
    dt = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    c = torch.from_numpy(np.cos(ang) * factor).to(dt)
    s = torch.from_numpy(np.sin(ang) * factor).to(dt)
    xc = x.to(dt)
    if w.layout == "interleaved":
        xp, xr = xc[..., 0::2], xc[..., 1::2]
        out = torch.stack([xp * c - xr * s, xp * s + xr * c], dim=-1).flatten(-2)
    else:
        h = d // 2
        xp, xr = xc[..., :h], xc[..., h:]
        out = torch.cat([xp * c - xr * s, xp * s + xr * c], dim=-1)
    return out.to(x.dtype)


_last_tables: list = [None]


def _tables(theta: np.ndarray, factor: float, position: int, n: int, dtype: np.dtype) -> tuple:
    """``(f cos φ, f sin φ)`` of rows ``position..position + n`` in ``dtype``; the last call's
    tables are kept (every layer of a generation step rotates at the same position), as one
    tuple read and written whole, so threads never mix two calls' tables."""
    key = (id(theta), float(factor), position, n, dtype)
    last = _last_tables[0]
    if last is not None and last[0] == key and last[3] is theta:
        return last[1], last[2]
    ang = np.arange(position, position + n, dtype=np.float64)[:, None] * theta[None, :]
    c = (np.cos(ang) * factor).astype(dtype)
    s = (np.sin(ang) * factor).astype(dtype)
    c.flags.writeable = s.flags.writeable = False
    _last_tables[0] = (key, c, s, theta)
    return c, s


@functools.lru_cache(maxsize=64)
def _frequencies(spec: str, d: int) -> tuple[np.ndarray, float]:
    """``Rotary.frequencies`` of a static ``w`` (by its spec), computed once per head dim."""
    theta, factor = _rotary_from_spec(spec).frequencies(d)
    theta = np.asarray(theta, np.float64)
    theta.flags.writeable = False
    return theta, factor


def _static_frequencies(w: Rotary) -> bool:
    """Whether ``w``'s frequencies do not depend on the call's length (all but dynamic NTK)."""
    sc = w.scaling or {}
    return (sc.get("rope_type") or sc.get("type")) != "dynamic"


class KVCache:
    """Keys and values seen so far, ``(batch, kv_heads, n, d)``; :meth:`update` appends.

    A :class:`RopeAttention` with a :class:`fastrope.Rotary` (without dynamic scaling) stores its
    keys *rotated* (``rotated`` is then True, as in Hugging Face's caches): a generation step
    rotates its new keys only, and attends with ``w=None`` (the decode kernel then reads the
    cache in place instead of rotating every cached key again).  A cache serves one module and
    one ``k_offset``.
    """

    def __init__(self) -> None:
        # Storage with room to grow (rows beyond `_n` unused), as a vector grows: appending a
        # step's key costs O(1) amortised instead of the O(n) copy of a `torch.cat`.
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        self._n = 0
        self.rotated: Optional[bool] = None
        self.k_offset: Optional[int] = None

    @property
    def k(self) -> Optional[Tensor]:
        """The cached keys ``(batch, kv_heads, n, d)`` (a view of the cache's storage)."""
        return None if self._k is None else self._k[..., : self._n, :]

    @property
    def v(self) -> Optional[Tensor]:
        """The cached values ``(batch, kv_heads, n, d_v)`` (a view of the cache's storage)."""
        return None if self._v is None else self._v[..., : self._n, :]

    def __len__(self) -> int:
        return self._n

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k`` ``(batch, kv_heads, m, d)`` and ``v``; returns all keys and values.

        Without autograd (inference mode, ``no_grad``, or nothing requiring grad) the rows are
        written into the cache's storage, which doubles when full; views returned earlier keep
        their rows. With autograd (or while the cache holds keys that require grad) it is
        extended by ``torch.cat``, so gradients flow through it."""
        m = k.shape[-2]
        if self._k is not None:
            for name, new, old in (("k", k, self._k), ("v", v, self._v)):
                if new.shape[:-2] != old.shape[:-2] or new.shape[-1] != old.shape[-1]:
                    raise ValueError(
                        f"{name}: expected shape (..., n, {old.shape[-1]}) with leading dims"
                        f" {tuple(old.shape[:-2])} like the cache's, got {tuple(new.shape)}"
                    )
        stored = [t for t in (self._k, self._v) if t is not None]
        if any(t.requires_grad for t in stored) or (
            torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        ):
            self._k = k if self._k is None else torch.cat([self.k, k], dim=-2)
            self._v = v if self._v is None else torch.cat([self.v, v], dim=-2)
            self._n += m
            return self._k, self._v
        n = self._n + m
        # Storage made under inference_mode cannot be written outside it: a new one then.
        stale = any(t.is_inference() for t in stored) and not torch.is_inference_mode_enabled()
        if self._k is None or n > self._k.shape[-2] or stale:
            cap = max(2 * n, 64)
            for name in ("_k", "_v"):
                new = k if name == "_k" else v
                buf = new.new_empty(new.shape[:-2] + (cap, new.shape[-1]))
                old = getattr(self, name)
                if old is not None:
                    buf[..., : self._n, :] = old[..., : self._n, :]
                setattr(self, name, buf)
        self._k[..., self._n : n, :] = k
        self._v[..., self._n : n, :] = v
        self._n = n
        return self.k, self.v

    def _claim(self, rotated: bool, k_offset: int) -> None:
        if self.rotated is None:
            self.rotated, self.k_offset = rotated, k_offset
        elif self.rotated != rotated:
            raise ValueError(
                "cache: it holds "
                + ("rotated" if self.rotated else "unrotated")
                + " keys from another kind of module; use one KVCache per module"
            )
        elif self.k_offset != k_offset:
            raise ValueError(
                f"k_offset: the cache's keys start at position {self.k_offset}, got {k_offset}"
            )


class RopeAttention(nn.Module):
    """Attention with relative position matrices for ``(batch, heads, n, d)`` q, k, v.

    ``w`` is a :class:`fastrope.Rotary` (nothing learned), or ``"block"`` for a learnable
    :class:`fastrope.BlockW` parameter of shape ``(heads?, 2·max_len-1, d/2, 2, 2)`` initialised
    to RoPE (``init="rotary"``) or to the identity (``init="identity"``).  k and v may have fewer
    heads than q (grouped-query attention).

    Positions: q sits at ``q_offset``, k at ``k_offset``; the default ``q_offset`` is
    ``k_offset + n_k - n_q`` (the queries are the last ``n_q`` positions), which is what a KV cache
    needs: pass ``cache=KVCache()`` and feed one chunk at a time.
    """

    def __init__(
        self,
        w: Union[Rotary, str] = "rotary",
        *,
        head_dim: Optional[int] = None,
        max_len: Optional[int] = None,
        heads: Optional[int] = None,
        layout: str = "interleaved",
        base: float = 10000.0,
        init: str = "rotary",
        causal: bool = True,
        window: Optional[tuple] = None,
        scale: Optional[float] = None,
        eps: float = 0.0,
        method: str = "auto",
        num_threads: Optional[int] = None,
        grad_error: str = "relative",
    ) -> None:
        super().__init__()
        if w == "rotary":
            w = Rotary(base=base, layout=layout)
        if isinstance(w, Rotary):
            self.rotary: Optional[Rotary] = w
            self.blocks = None
            self.layout = w.layout
        elif w == "block":
            if head_dim is None or max_len is None:
                raise ValueError("w='block': expected head_dim and max_len")
            if init == "rotary":
                b = rotary_blocks(head_dim, max_len, base, layout, heads)
            elif init == "identity":
                b = rotary_blocks(head_dim, max_len, base, layout, heads).zero_()
                b[..., 0, 0] = 1.0
                b[..., 1, 1] = 1.0
            else:
                raise ValueError(f"init: expected 'rotary' or 'identity', got {init!r}")
            self.rotary = None
            self.blocks = nn.Parameter(b)
            self.layout = layout
        else:
            raise ValueError(f"w: expected fastrope.Rotary, 'rotary' or 'block', got {w!r}")
        self.causal, self.window, self.scale = causal, window, scale
        self.eps, self.method, self.num_threads = eps, method, num_threads
        self.grad_error = check_grad_error(grad_error)

    @property
    def w(self) -> Union[Rotary, BlockW]:
        return self.rotary if self.blocks is None else BlockW(self.blocks, layout=self.layout)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        cache: Optional[KVCache] = None,
        q_offset: Optional[int] = None,
        k_offset: int = 0,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        w = self.w
        if cache is not None:
            rotate_first = isinstance(w, Rotary) and _static_frequencies(w)
            cache._claim(rotate_first, k_offset)
            if rotate_first:
                # Rotate the new keys once, at their positions; attend with w=None below.
                k = rotate(k, w, k_offset + len(cache))
            k, v = cache.update(k, v)
        if q_offset is None:
            q_offset = k_offset + k.shape[-2] - q.shape[-2]
        if cache is not None and cache.rotated:
            q, w = rotate(q, w, q_offset), None
        return attention(
            q,
            k,
            v,
            w,
            self.eps,
            scale=self.scale,
            causal=self.causal,
            window=self.window,
            bias=bias,
            q_offset=q_offset,
            k_offset=k_offset,
            method=self.method,
            num_threads=self.num_threads,
            grad_error=self.grad_error,
        )

    def extra_repr(self) -> str:
        w = "BlockW" + str(tuple(self.blocks.shape)) if self.blocks is not None else self.rotary
        return f"w={w}, causal={self.causal}, window={self.window}, eps={self.eps}"
