"""Hugging Face transformers: ``attn_implementation="fastrope"``.

::

    import fastrope.integrations.transformers as fr_hf
    fr_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastrope")

(transformers 5 stores the choice on the config object: give each model its own config copy.)

:func:`register` adds ``"fastrope"`` to transformers' attention-function registry
(``AttentionInterface``) and to its mask registry (``AttentionMaskInterface``, with the boolean
masks of ``sdpa``, which are ``None`` where SDPA would rely on ``is_causal``).  Every model whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` (the Llama family; tested on Llama, with
transformers' own Llama test suite in ``make hf-conformance``) then runs its attention in fastrope's
exact (or, with ``eps > 0``, fast) kernels.

**Where RoPE is applied.**  Hugging Face models rotate q and k (``apply_rotary_pos_emb``) *before*
the attention function; so by default fastrope receives rotated q/k and computes plain
``softmax(q k^T * scaling) v`` (``w=None``: position matrix ``W_δ = I``, the same GEMM kernels as
:class:`fastrope.Rotary`).  To let fastrope apply RoPE itself through ``w`` — so that the
position matrix is a :class:`fastrope.Rotary` and the fast method, learned :class:`BlockW` tables
and so on apply — call :func:`apply_rope_in_fastrope` on the model: the model's rotary embedding
then returns the identity (``cos = 1, sin = 0``, so ``apply_rotary_pos_emb`` leaves q and k alone
and the KV cache stores un-rotated keys) and every attention layer gets
``fastrope_w = Rotary(..., layout="half")`` with the frequencies and attention factor of that
rotary embedding (``inv_freq``, ``attention_scaling``): transformers' own values for every rope
type.

**Masks, as SDPA reads them.**  ``attention_mask=None`` means what it means to SDPA:
``is_causal`` with SDPA's top-left alignment when there is more than one query (a prefill into an
empty static cache), every key for one query.  A boolean (or additive float) 4-D mask is read as
*causal (or sliding-window) attention over each row's valid keys*, with the valid keys in any
pattern (left or right padding, gaps from padding inside a row, the empty slots of a static cache)
and rows packed with several documents (the block-diagonal masks of padding-free training).  The
keys are split into their contiguous valid runs; each run is one fastrope call and the runs are
merged by their log-sum-exps (:func:`fastrope.merge_partials`), so no mask is materialised beyond
the one transformers made.  Any other pattern raises ``NotImplementedError`` naming the row and
the first entry that differs, never a silent approximation.  Attention dropout and soft-capping are
not supported (``ValueError``).

**Positions with RoPE in fastrope.**  ``δ`` must be the difference of the positions that
transformers gives the tokens.  A query's position is its ``position_ids`` entry (padding queries'
filler positions included: ``generate`` reads the logits of a right-padded row's last token).  A
key's position is not passed to the attention function: each attention layer records the
positions of the cache slots as its queries enter them, and a slot it has not seen (a cache filled
elsewhere) gets the position that the valid tokens imply: within each document, consecutive valid
keys have consecutive positions (``generate``'s ``cumsum(attention_mask) - 1``), or the cache index
if the queries' positions say so.

With ``dynamic`` and ``longrope`` rope types, transformers changes the frequencies while
generating, and its cache keeps the earlier keys rotated with the earlier frequencies; fastrope
applies the current frequencies to every key, so that the result stays a function of relative
positions: the two agree until the frequencies first change during a generation, and a
``UserWarning`` says when they do.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .. import torch as fr_torch
from .._merge import merge_partials
from .._position import Rotary

__all__ = ["register", "fastrope_attention_forward", "apply_rope_in_fastrope", "rotary_from_config"]

NAME = "fastrope"


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` (default ``"fastrope"``) available in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fastrope_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# RoPE parameters
# ---------------------------------------------------------------------------------------------


def _rope_parameters(config: Any) -> dict:
    """The config's rope parameters as one dict with ``rope_type`` and ``rope_theta`` (the v5
    ``rope_parameters`` or the older ``rope_theta``/``rope_scaling`` attributes)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    else:
        params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check_full_rotary(n_freq: int, head_dim: int) -> None:
    if n_freq != head_dim // 2:
        raise NotImplementedError(
            f"fastrope: the rotary embedding has {n_freq} frequencies for head_dim {head_dim}"
            " (partial_rotary_factor < 1: RoPE on part of the head dim) and is not supported;"
            " leave RoPE to transformers (do not call apply_rope_in_fastrope)"
        )


def _explicit_rotary(base: float, inv_freq: Any, attention_factor: float) -> Rotary:
    theta = [float(x) for x in torch.as_tensor(inv_freq).detach().double().cpu().flatten()]
    scaling = {"rope_type": "explicit", "inv_freq": theta}
    if float(attention_factor) != 1.0:
        scaling["attention_factor"] = float(attention_factor)
    return Rotary(base=float(base), layout="half", scaling=scaling)


def rotary_from_config(config: Any, seq_len: Optional[int] = None) -> Rotary:
    """The :class:`fastrope.Rotary` of a transformers config, in Hugging Face's ``"half"`` layout.

    ``rope_type="default"`` gives ``Rotary(base=rope_theta)``.  ``"dynamic"`` gives fastrope's own
    dynamic NTK with transformers' threshold (``config.max_position_embeddings``, which
    transformers reads for this type, whatever ``original_max_position_embeddings`` says), so that
    each call's frequencies follow its largest position as in one transformers forward.  Every
    other type (``linear``, ``yarn``, ``llama3``, ``longrope``, ...) gives the frequencies and
    attention factor that transformers' own ``ROPE_INIT_FUNCTIONS`` compute from the config
    (``seq_len`` as transformers passes it: ``None`` at initialisation), as an ``"explicit"``
    Rotary: every key is read exactly as transformers reads it.
    """
    params = _rope_parameters(config)
    kind = params["rope_type"]
    base = float(params.get("rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind in ("default", "dynamic"):
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1))
        _check_full_rotary(int(head_dim * (partial or 1)) // 2, head_dim)
    if kind == "default":
        return Rotary(base=base, layout="half")
    if kind == "dynamic":
        scaling = {
            "rope_type": "dynamic",
            "factor": float(params["factor"]),
            "original_max_position_embeddings": int(config.max_position_embeddings),
        }
        return Rotary(base=base, layout="half", scaling=scaling)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise NotImplementedError(
            f"fastrope: rope_type {kind!r} is not one of transformers' ROPE_INIT_FUNCTIONS"
            f" {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
    _check_full_rotary(int(inv_freq.shape[-1]), head_dim)
    return _explicit_rotary(base, inv_freq, factor)


class _RopeInFastrope(nn.Module):
    """Stands in for a model's rotary embedding: returns ``cos = 1, sin = 0`` (RoPE is done in
    fastrope) and keeps the wrapped module, whose frequencies the attention layers use.

    For rope types whose frequencies change with the call (``dynamic``, ``longrope``), each
    forward first runs the wrapped module, i.e. transformers' own frequency update, and hands the
    resulting frequencies to the attention layers."""

    def __init__(self, inner: nn.Module, base: float, layers: list) -> None:
        super().__init__()
        self.inner = inner
        self.head_dim = 2 * int(inner.inv_freq.shape[-1])
        self.base = base
        self.layers = layers
        kind = str(getattr(inner, "rope_type", "default"))
        self.default = kind == "default"
        self.dynamic = "dynamic" in kind or kind == "longrope"
        self.w = self._current()
        self._warned = False
        self._publish()

    def _current(self) -> Rotary:
        if self.default:  # the same frequencies, computed in float64 by fastrope
            return Rotary(base=self.base, layout="half")
        factor = getattr(self.inner, "attention_scaling", 1.0)
        return _explicit_rotary(self.base, self.inner.inv_freq, factor)

    def _publish(self) -> None:
        for mod in self.layers:
            mod.fastrope_w = self.w

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        if self.dynamic:
            self.inner(x, position_ids, *args, **kwargs)  # transformers' frequency update
            w = self._current()
            if w != self.w:
                if not self._warned and int(position_ids.min()) > 0:
                    self._warned = True
                    warnings.warn(
                        f"fastrope: {self.inner.rope_type} rope changed its frequencies at"
                        f" position {int(position_ids.min())}; transformers keeps the cached keys"
                        " rotated with the earlier frequencies, fastrope applies the current"
                        " ones to every key, so results differ from eager's from here on",
                        UserWarning,
                        stacklevel=2,
                    )
                self.w = w
                self._publish()
        shape = tuple(position_ids.shape) + (self.head_dim,)
        return x.new_ones(shape), x.new_zeros(shape)


def apply_rope_in_fastrope(model: nn.Module) -> nn.Module:
    """Let fastrope apply RoPE through ``w`` instead of Hugging Face's ``apply_rotary_pos_emb``.

    The model must use ``attn_implementation="fastrope"``.  Wraps each ``rotary_emb`` module so
    that it returns the identity, and sets ``fastrope_w`` (a :class:`fastrope.Rotary` with that
    module's frequencies and attention factor) on every attention module; returns the model.  The
    logits are unchanged (up to float rounding); see the module docstring for ``dynamic`` and
    ``longrope`` rope types during generation.
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"model: expected attn_implementation={NAME!r} (call register() first), got {impl!r}"
        )
    base = float(_rope_parameters(config).get("rope_theta", 10000.0))
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not layers:
        raise ValueError("model: found no attention module (with layer_idx and q_proj)")
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name == "rotary_emb" and hasattr(child, "inv_freq"):
                n_freq = int(child.inv_freq.shape[-1])
                _check_full_rotary(n_freq, getattr(layers[0], "head_dim", 2 * n_freq))
                setattr(parent, child_name, _RopeInFastrope(child, base, layers))
                replaced += 1
    if replaced == 0:
        raise ValueError("model: found no rotary_emb module with inv_freq to replace")
    return model


# ---------------------------------------------------------------------------------------------
# Masks and positions -> fastrope calls
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One fastrope call: query rows ``[q_lo, q_hi)`` against keys ``[k_lo, k_hi)``."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_offset: int
    k_offset: int
    causal: bool
    window: Optional[tuple]


def _bool_mask(attention_mask: torch.Tensor, b: int, nq: int, nk: int) -> torch.Tensor:
    """The mask as booleans ``(B, n_q, n_k)`` (True: attend)."""
    mask = attention_mask
    if mask.dtype != torch.bool:  # an additive float mask: 0 keeps, very negative drops
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() != 4:
        raise ValueError(
            f"attention_mask: expected a 4-D mask (batch, heads, n_q, n_k), got shape"
            f" {tuple(mask.shape)}"
        )
    if mask.shape[-1] < nk or mask.shape[-2] != nq:
        raise ValueError(
            f"attention_mask: expected shape (batch, heads, {nq}, >= {nk}), got {tuple(mask.shape)}"
        )
    mask = mask[..., :nk]
    if mask.shape[1] > 1:
        if not bool((mask == mask[:, :1]).all()):
            raise NotImplementedError("fastrope: attention_mask differs between heads")
        mask = mask[:, :1]
    return mask[:, 0].expand(b, nq, nk).cpu()


def _first_true(x: torch.Tensor) -> torch.Tensor:
    return x.int().argmax(-1)


def _last_true(x: torch.Tensor) -> torch.Tensor:
    return x.shape[-1] - 1 - x.flip(-1).int().argmax(-1)


def _runs(seg: torch.Tensor, shift: torch.Tensor) -> list:
    """Maximal runs ``[a, e)`` of equal consecutive ``(seg, shift)``, as ``(a, e, seg)``; runs
    with ``seg = -1`` are dropped."""
    n = seg.numel()
    if n == 0:
        return []
    change = torch.nonzero((seg[1:] != seg[:-1]) | (shift[1:] != shift[:-1])).flatten() + 1
    bounds = [0] + change.tolist() + [n]
    segs = seg[bounds[:-1]].tolist()
    return [(a, e, g) for a, e, g in zip(bounds[:-1], bounds[1:], segs) if g >= 0]


def _row_structure(vis, causal: bool, left: Optional[int], nq: int, nk: int):
    """The pattern of one batch row: ``(qidx, seg_q, seg_k, causal)`` with each query's cache
    index, each query's document (-1: sees no key), each key's document (-1: not valid) and
    whether the row is causal.  ``vis`` is the row's boolean mask ``(n_q, n_k)``, or None for
    SDPA's ``is_causal``.  A causal model's row that is not causal over its valid keys may still
    be a bidirectional one (a custom 4-D mask); anything else raises."""
    ar = torch.arange(nq)
    if vis is None:
        # SDPA: several queries are causal top-left; one query sees every key (bottom-right).
        q0 = 0 if (causal and nq > 1) else nk - nq
        zeros = torch.zeros(nk, dtype=torch.long)
        return ar + q0, torch.zeros(nq, dtype=torch.long), zeros, causal and nq > 1
    seen_q = vis.any(1)
    if not bool(seen_q.any()):
        return ar, torch.full((nq,), -1), torch.full((nk,), -1), causal
    first = None
    for kind in ("causal", "bidirectional") if causal else ("bidirectional",):
        found = _match(vis, seen_q, kind == "causal", left, nq, nk)
        if isinstance(found, tuple):
            return found + (kind == "causal",)
        first = first or found
        if left is not None:
            break
    raise NotImplementedError(
        f"fastrope: attention_mask is not causal{'' if left is None else ' sliding-window'}"
        f" attention over valid keys (padding, gaps, packed documents): {first}; any other"
        " pattern is not supported"
    )


def _match(vis, seen_q, causal: bool, left: Optional[int], nq: int, nk: int):
    """``(qidx, seg_q, seg_k)`` if ``vis`` is ``causal`` (or bidirectional) attention over valid
    keys in documents, else a sentence saying where it is not."""
    ar = torch.arange(nq)
    seen_k = vis.any(0)
    if causal:
        # A query's own key is in the cache, so its index is its last visible key; transformers
        # appends the queries to the cache, so they end at or before its last slot.
        q0 = int((_last_true(vis) - ar)[seen_q].max())
        if q0 + nq > nk or q0 < 0:
            return f"query {int(torch.nonzero(seen_q)[0])} sees keys after its own position"
    else:
        q0 = nk - nq
    qidx = ar + q0
    if left is None:
        # Documents start where a query's visible keys start (one start unless rows are packed).
        lo = _first_true(vis)
        starts = torch.unique(lo[seen_q])
        seg_k = torch.searchsorted(starts, torch.arange(nk), right=True) - 1
        seg_q = torch.searchsorted(starts, lo, right=True) - 1
    else:
        seg_k = torch.zeros(nk, dtype=torch.long)
        seg_q = torch.zeros(nq, dtype=torch.long)
    seg_k = torch.where(seen_k & (seg_k >= 0), seg_k, torch.full_like(seg_k, -1))
    seg_q = torch.where(seen_q, seg_q, torch.full_like(seg_q, -1))
    want = (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] >= 0)
    delta = qidx[:, None] - torch.arange(nk)[None, :]
    if causal:
        want &= delta >= 0
    if left is not None:
        want &= delta <= left
    if not bool((want == vis).all()):
        i, j = (torch.nonzero(want != vis)[0]).tolist()
        return f"query {i} {'sees' if bool(vis[i, j]) else 'does not see'} key {j}"
    return qidx, seg_q, seg_k


UNKNOWN = torch.iinfo(torch.long).min  # a cache slot whose position was not seen


def _row_shifts(qidx, seg_q, seg_k, pos_q, kpos):
    """Index-minus-position shifts of queries and keys, so that ``position = index - shift``
    (every query's position is its ``position_ids`` entry, padding queries' fillers included:
    ``generate`` reads the logits of a right-padded row's last, padding, token).

    ``kpos`` holds the positions the cached keys had when they entered the cache (UNKNOWN where
    this module did not see them); the rest are derived from the valid tokens (see the module
    docstring)."""
    nk = seg_k.numel()
    sk = torch.zeros(nk, dtype=torch.long)
    sq = qidx - pos_q
    kidx = torch.arange(nk)
    qclip = qidx.clamp(0, max(nk - 1, 0))
    known = kpos != UNKNOWN
    for s in torch.unique(seg_k[seg_k >= 0]).tolist():
        in_k = seg_k == s
        mine = seg_q == s
        valid = mine & (qidx >= 0) & (qidx < nk) & in_k[qclip]  # queries that are valid keys
        if bool((known | ~in_k).all()):
            sk[in_k] = (kidx - kpos)[in_k]
        elif bool(valid.any()):
            rank = torch.cumsum(in_k.long(), 0) - 1  # rank of each valid key in its document
            by_rank = (pos_q - rank[qclip])[valid]
            by_index = (pos_q - qidx)[valid]
            if bool((by_rank == by_rank[0]).all()):
                sk[in_k] = (kidx - rank - by_rank[0])[in_k]
            elif bool((by_index == by_index[0]).all()):
                sk[in_k] = -by_index[0]
            else:
                i = int(torch.nonzero(valid)[0])
                raise NotImplementedError(
                    "fastrope: position_ids do not follow the valid tokens (consecutive within"
                    f" each document, from query {i} on); with apply_rope_in_fastrope the keys'"
                    " positions must be derivable from them"
                )
            sk[in_k & known] = (kidx - kpos)[in_k & known]
        else:  # only padding queries: positions are the cache indices shifted as theirs
            sk[in_k] = sq[mine][0]
    return sq, sk


def _row_blocks(vis, causal, left, nq, nk, pos_q, record) -> tuple:
    """The fastrope calls of one batch row, and the positions of its cache slots.

    ``pos_q``: the queries' positions (None: positions do not matter, w=None); ``record``: the
    positions of the cache slots as last seen (None: none seen)."""
    qidx, seg_q, seg_k, causal = _row_structure(vis, causal, left, nq, nk)
    if pos_q is None:
        sq = torch.zeros(nq, dtype=torch.long)
        sk = torch.zeros(nk, dtype=torch.long)
        kpos = None
    else:
        # The queries enter the cache at their indices; a query at index 0 starts a new cache.
        kpos = torch.full((nk,), UNKNOWN, dtype=torch.long)
        if record is not None and int(qidx[0]) > 0:
            m = min(nk, record.numel())
            kpos[:m] = record[:m]
        inside = (qidx >= 0) & (qidx < nk)
        kpos[qidx[inside]] = pos_q[inside]
        sq, sk = _row_shifts(qidx, seg_q, seg_k, pos_q, kpos)
    # Runs of queries (and keys) in one document with one shift: one call per pair of runs.
    k_runs = _runs(seg_k, sk)
    blocks, copies = [], []
    # A lone query with the position and the visible keys of an earlier one has its output
    # (trailing right padding: filler positions, every valid key visible): computed once.
    if vis is not None:
        lo, hi = _first_true(vis).tolist(), _last_true(vis).tolist()
    first_with: dict = {}
    for qa, qe, q_seg in _runs(seg_q, sq):
        if qe - qa == 1 and vis is not None:
            sig = (q_seg, int(qidx[qa] - sq[qa]), lo[qa], hi[qa])
            if sig in first_with:
                copies.append((qa, first_with[sig]))
                continue
            first_with[sig] = qa
        for ka, ke, k_seg in k_runs:
            if q_seg != k_seg:
                continue
            t = int(sq[qa]) - int(sk[ka])
            q_first, q_last = int(qidx[qa]), int(qidx[qe - 1])
            if causal and q_last - ka < 0:
                continue  # every key after every query
            if left is not None and q_first - (ke - 1) > left:
                continue  # every key out of the window
            q_off, k_off = q_first - int(sq[qa]), ka - int(sk[ka])
            # δ_index = δ_position + t: causal keeps δ_index >= 0, the window δ_index <= left.
            if not causal:
                blk_causal, window = False, None
            elif t == 0:
                blk_causal, window = True, None if left is None else (left, None)
            elif t > 0 or q_first - (ke - 1) >= 0:
                right = max(t, 0) if q_first - (ke - 1) < 0 else None
                blk_causal = False
                window = (None if left is None else left - t, right)
                if window[0] is not None and window[0] < 0:
                    raise NotImplementedError(
                        "fastrope: a sliding window across a gap in the valid keys, with RoPE in"
                        " fastrope, is not supported"
                    )
            else:
                raise NotImplementedError(
                    "fastrope: key positions run ahead of the query positions; with"
                    " apply_rope_in_fastrope, position_ids must grow with the tokens"
                )
            if window == (None, None):
                window = None
            blocks.append(_Block(qa, qe, ka, ke, q_off, k_off, blk_causal, window))
    return (tuple(blocks), tuple(copies)), kpos


# The analysis of the last (mask, position_ids) seen: every layer of a forward gets the same
# two tensors, so the layers after the first reuse it.  Held by weak reference and checked by
# identity and version (an in-place change of either tensor is seen).
_LAST: dict = {}


def _ref(t: Optional[torch.Tensor]):
    return None if t is None else (weakref.ref(t), t._version)


def _same(r, t: Optional[torch.Tensor]) -> bool:
    if r is None or t is None:
        return r is None and t is None
    return r[0]() is t and t._version == r[1]


def _plans(module, attention_mask, position_ids, bsz, nq, nk, causal, left, rope) -> dict:
    """``{(blocks, copies): batch rows}`` for one call, and the module's record of its cache
    slots' positions updated."""
    key = (bsz, nq, nk, causal, left, rope)
    last = _LAST.get("entry")
    if (
        last is not None
        and last[0] == key
        and _same(last[1], attention_mask)
        and _same(last[2], position_ids)
    ):
        plans, kpos = last[3], last[4]
    else:
        mask = None if attention_mask is None else _bool_mask(attention_mask, bsz, nq, nk)
        if rope:
            pos = position_ids.cpu().long()
            if pos.dim() != 2 or pos.shape[-1] != nq:
                raise NotImplementedError(
                    f"fastrope: position_ids of shape {tuple(pos.shape)}; expected (batch,"
                    f" {nq}) with RoPE in fastrope"
                )
        records = getattr(module, "_fastrope_key_positions", None) if rope else None
        if records is not None and records.shape[0] != bsz:
            records = None
        plans, seen = {}, []
        for b in range(bsz):
            vis = None if mask is None else mask[b]
            pos_q = pos[b if pos.shape[0] > 1 else 0] if rope else None
            record = None if records is None else records[b]
            blocks, kpos_b = _row_blocks(vis, causal, left, nq, nk, pos_q, record)
            plans.setdefault(blocks, []).append(b)
            seen.append(kpos_b)
        kpos = torch.stack(seen) if rope else None
        _LAST["entry"] = (key, _ref(attention_mask), _ref(position_ids), plans, kpos)
    if rope:
        # The positions each cache slot was given, for the next call (transformers does not
        # pass the keys' positions; after right padding they are not the valid keys' ranks).
        module._fastrope_key_positions = kpos
    return plans


# The calls depend on the mask's values and positions (data, not shapes): inside torch.compile
# the function runs eagerly, a graph break, instead of being traced and recompiled per pattern.
@torch.compiler.disable
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

    Query and key positions come from the mask (``None``: SDPA's ``is_causal``) and from
    ``position_ids``; see the module docstring.  ``module.fastrope_w`` (set by
    :func:`apply_rope_in_fastrope`) is the position matrix; without it q and k arrive rotated and
    ``W_δ = I``.  ``module.fastrope_eps`` / ``fastrope_method`` (default 0 / ``"auto"``) select the
    method.
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
    left = None if sliding is None else int(sliding) - 1
    if left is not None and not causal:
        raise NotImplementedError("fastrope: bidirectional sliding-window attention")
    bsz, nq, nk = query.shape[0], query.shape[-2], key.shape[-2]
    w = getattr(module, "fastrope_w", None)
    eps = getattr(module, "fastrope_eps", 0.0)
    method = getattr(module, "fastrope_method", "auto")

    position_ids = kwargs.get("position_ids")
    rope = w is not None and position_ids is not None
    plans = _plans(module, attention_mask, position_ids, bsz, nq, nk, causal, left, rope)

    def run(q, k, v, plan):
        blocks, copies = plan
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
        by_rows: dict = {}
        for blk in blocks:
            by_rows.setdefault((blk.q_lo, blk.q_hi), []).append(blk)
        for (qa, qe), blks in by_rows.items():
            parts = [
                fr_torch.attention(
                    q[..., qa:qe, :],
                    k[..., b.k_lo : b.k_hi, :],
                    v[..., b.k_lo : b.k_hi, :],
                    w,
                    eps,
                    scale=scaling,
                    causal=b.causal,
                    window=b.window,
                    q_offset=b.q_offset,
                    k_offset=b.k_offset,
                    method=method,
                    return_lse=len(blks) > 1,
                )
                for b in blks
            ]
            if len(parts) == 1:
                o = parts[0]
            else:
                o, _ = merge_partials([p[0] for p in parts], [p[1] for p in parts])
                o = o.to(q.dtype)
            if qa == 0 and qe == nq:
                out = o
            else:
                out[..., qa:qe, :] = o
        for dst, src in copies:
            out[..., dst, :] = out[..., src, :].clone()
        return out

    if len(plans) == 1:
        (blocks,) = plans
        out = run(query, key, value, blocks)
    else:
        # Batch rows with one plan, in ranges of consecutive rows: views, never copies of k, v.
        out = query.new_zeros(query.shape[:-1] + (value.shape[-1],))
        for blocks, rows in plans.items():
            starts = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r - 1]
            ends = [r + 1 for i, r in enumerate(rows) if i == len(rows) - 1 or rows[i + 1] != r + 1]
            for a, e in zip(starts, ends):
                out[a:e] = run(query[a:e], key[a:e], value[a:e], blocks)
    return out.transpose(1, 2).contiguous(), None
