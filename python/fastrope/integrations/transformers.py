"""Hugging Face transformers: ``attn_implementation="fastrope"``.

::

    import fastrope.integrations.transformers as fr_hf
    fr_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastrope")

(transformers 5 stores the choice on the config object: give each model its own config copy.)

:func:`register` adds ``"fastrope"`` to transformers' attention-function registry
(``AttentionInterface``) and to its mask registry (``AttentionMaskInterface``, with the boolean
masks of ``sdpa``, which are ``None`` for a plain causal mask).  Every model whose attention goes
through ``ALL_ATTENTION_FUNCTIONS`` (the Llama family; tested on Llama) then runs its attention in
fastrope's exact (or, with ``eps > 0``, fast) kernels.

**Where RoPE is applied.**  Hugging Face models rotate q and k (``apply_rotary_pos_emb``) *before*
the attention function; so by default fastrope receives rotated q/k and computes plain
``softmax(q k^T * scaling) v`` (``w=None``: position matrix ``W_δ = I``, the same GEMM kernels as
:class:`fastrope.Rotary`).  To let fastrope apply RoPE itself through ``w`` — so that the
position matrix is a :class:`fastrope.Rotary` and the fast method, learned :class:`BlockW` tables
and so on apply — call :func:`apply_rope_in_fastrope` on the model: it replaces the model's
rotary embedding by the identity (``cos = 1, sin = 0``, so ``apply_rotary_pos_emb`` leaves q and
k alone and the KV cache stores un-rotated keys) and gives every attention layer
``fastrope_w = Rotary(rope_theta, layout="half", scaling=<the config's rope parameters>)``.

Masks: fastrope has no arbitrary ``n_q x n_k`` mask.  Causal masks, sliding windows, KV caches
and padding (left or right: each row's valid keys must be one contiguous range) are turned into
positions and offsets; any other mask pattern (packed sequences, custom masks) raises
``NotImplementedError`` rather than being silently ignored.  Attention dropout and soft-capping
are not supported (``ValueError``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .. import torch as fr_torch
from .._position import Rotary

__all__ = ["register", "fastrope_attention_forward", "apply_rope_in_fastrope", "rotary_from_config"]

NAME = "fastrope"


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` (default ``"fastrope"``) available in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fastrope_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def rotary_from_config(config: Any) -> Rotary:
    """The :class:`fastrope.Rotary` of a transformers config (``rope_parameters`` in v5,
    ``rope_theta``/``rope_scaling`` before), in Hugging Face's ``"half"`` layout."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        base = getattr(config, "rope_theta", 10000.0)
        scaling = getattr(config, "rope_scaling", None)
    else:
        params = dict(params)
        base = params.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = params
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif "original_max_position_embeddings" not in scaling and kind in ("dynamic", "yarn"):
            scaling["original_max_position_embeddings"] = config.max_position_embeddings
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("fastrope: partial_rotary_factor != 1 is not supported")
    return Rotary(base=float(base), layout="half", scaling=scaling)


class _IdentityRotaryEmbedding(nn.Module):
    """Stands in for a model's rotary embedding: ``cos = 1, sin = 0`` (RoPE is done in fastrope)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = tuple(position_ids.shape) + (self.head_dim,)
        return x.new_ones(shape), x.new_zeros(shape)


def apply_rope_in_fastrope(model: nn.Module) -> nn.Module:
    """Let fastrope apply RoPE through ``w`` instead of Hugging Face's ``apply_rotary_pos_emb``.

    The model must use ``attn_implementation="fastrope"``.  Replaces each ``rotary_emb`` module
    by the identity and sets ``fastrope_w`` (a :class:`fastrope.Rotary` from the config) on every
    attention module; returns the model.  The logits are unchanged (up to float rounding).
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"model: expected attn_implementation={NAME!r} (call register() first), got {impl!r}"
        )
    rotary = rotary_from_config(config)
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name == "rotary_emb" and hasattr(child, "inv_freq"):
                head_dim = 2 * child.inv_freq.shape[-1]
                setattr(parent, child_name, _IdentityRotaryEmbedding(head_dim))
                replaced += 1
    if replaced == 0:
        raise ValueError("model: found no rotary_emb module with inv_freq to replace")
    n_attn = 0
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "q_proj"):
            mod.fastrope_w = rotary
            n_attn += 1
    if n_attn == 0:
        raise ValueError("model: found no attention module (with layer_idx and q_proj)")
    return model


def _valid_key_ranges(mask: torch.Tensor) -> list:
    """Per batch row, the contiguous range ``[lo, hi)`` of keys that any query sees."""
    seen = mask.any(dim=-2).any(dim=-2)  # (B, n_k)
    ranges = []
    for b in range(seen.shape[0]):
        idx = torch.nonzero(seen[b]).flatten()
        if idx.numel() == 0:
            ranges.append((0, 0))
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if int(idx.numel()) != hi - lo:
            raise NotImplementedError(
                "fastrope: attention_mask row has non-contiguous valid keys (packed sequences or"
                " a custom mask); only causal/sliding-window masks with left or right padding are"
                " supported"
            )
        ranges.append((lo, hi))
    return ranges


def _pattern(nq: int, n: int, q_offset: int, causal: bool, window) -> torch.Tensor:
    delta = (torch.arange(nq)[:, None] + q_offset) - torch.arange(n)[None, :]
    keep = torch.ones(nq, n, dtype=torch.bool)
    if causal:
        keep &= delta >= 0
    if window is not None:
        keep &= delta <= window[0]
    return keep


def fastrope_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
):
    """The attention function transformers calls: q ``(B, Hq, n_q, d)``, k/v ``(B, Hk, n_k, d)``
    → ``(B, n_q, Hq, d_v)`` and no attention weights.

    The queries are the last ``n_q`` of the ``n_k`` positions (KV cache). ``module.fastrope_w``
    (set by :func:`apply_rope_in_fastrope`) is the position matrix; without it q and k arrive
    rotated and ``W_δ = I``.  ``module.fastrope_eps`` / ``fastrope_method`` (default 0 /
    ``"auto"``) select the method.
    """
    if dropout and module.training:
        raise ValueError(
            "fastrope: attention dropout is not supported; set config.attention_dropout = 0"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("fastrope: attention logit soft-capping is not supported")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("fastrope: position_bias tensors are not supported")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    sliding = kwargs.get("sliding_window") or None
    window = None if sliding is None else (int(sliding) - 1, None)
    nq, nk = query.shape[-2], key.shape[-2]
    w = getattr(module, "fastrope_w", None)
    eps = getattr(module, "fastrope_eps", 0.0)
    method = getattr(module, "fastrope_method", "auto")

    if attention_mask is None:
        groups = [(list(range(query.shape[0])), 0, nk)]
    else:
        mask = attention_mask
        if mask.dtype != torch.bool:  # an additive float mask: 0 keeps, very negative drops
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask.expand(query.shape[0], -1, nq, nk)
        ranges = _valid_key_ranges(mask)
        for b, (lo, hi) in enumerate(ranges):
            want = torch.zeros(nq, nk, dtype=torch.bool)
            want[:, lo:hi] = _pattern(nq, hi - lo, nk - nq - lo, causal, window)
            if not bool((mask[b] == want).all()):
                raise NotImplementedError(
                    "fastrope: attention_mask is not a causal/sliding-window mask with padding"
                    f" (batch row {b}); arbitrary masks are not supported"
                )
        groups = {}
        for b, r in enumerate(ranges):
            groups.setdefault(r, []).append(b)
        groups = [(rows, lo, hi) for (lo, hi), rows in groups.items()]

    out = query.new_zeros(query.shape[:-1] + (value.shape[-1],))
    position_ids = kwargs.get("position_ids")
    for rows, lo, hi in groups:
        if hi <= lo:
            continue
        q_offset = nk - nq - lo  # key lo sits at position 0
        if w is not None and position_ids is not None:
            _check_positions(position_ids, rows, q_offset)
        sel = rows if len(rows) < query.shape[0] else slice(None)
        o = fr_torch.attention(
            query[sel],
            key[sel][..., lo:hi, :],
            value[sel][..., lo:hi, :],
            w,
            eps,
            scale=scaling,
            causal=causal,
            window=window,
            q_offset=q_offset,
            method=method,
        )
        if isinstance(sel, slice):
            out = o
        else:
            out = out.index_copy(0, torch.tensor(rows), o)
    return out.transpose(1, 2).contiguous(), None


def _check_positions(position_ids: torch.Tensor, rows: list, q_offset: int) -> None:
    """With RoPE in fastrope only ``δ`` matters, and it comes from token indices: check that the
    valid queries' ``position_ids`` are consecutive (true for caches, padding and ``generate``)."""
    nq = position_ids.shape[-1]
    valid = torch.arange(nq) + q_offset >= 0
    for b in rows:
        pos = position_ids[b if position_ids.shape[0] > 1 else 0][valid]
        step = pos - torch.arange(pos.numel(), device=pos.device)
        if pos.numel() and not bool((step == step[0]).all()):
            raise NotImplementedError(
                "fastrope: position_ids are not consecutive over the valid tokens (row"
                f" {b}); with apply_rope_in_fastrope, positions must follow the token order"
            )
