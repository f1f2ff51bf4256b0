"""attn_implementation="fastrope" against eager where positions and masks are not the plain
causal case: static caches (SDPA's top-left ``is_causal`` with ``attention_mask=None``), padding
with and without a static cache, key masks with gaps, custom 4-D masks, packed rows, and every
rope type of transformers with RoPE applied in fastrope.  Tokens must be eager's and scores within
1e-5 (float32)."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import hf_logits, hf_model  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

import fastrope.integrations.transformers as fr_hf  # noqa: E402

TOL = 1e-5
VOCAB, PAD = 64, 0


def _config(**rope):
    fr_hf.register()
    params = {"rope_type": "default", "rope_theta": 500.0}
    params.update(rope)
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        rope_parameters=params,
    )


IMPLS = [("fastrope", False), ("fastrope", True)]
IMPL_IDS = ["hf-rope", "rope-in-fastrope"]


@pytest.fixture(scope="module")
def config():
    return _config()


@pytest.fixture(scope="module")
def eager(config):
    return hf_model(config, "eager")


@pytest.fixture(scope="module", params=IMPLS, ids=IMPL_IDS)
def model(request, config):
    return hf_model(config, *request.param)


def _ids(b, n, seed=1):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _generate(m, ids, mask=None, **kw):
    kw = dict(
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
        **kw,
    )
    with torch.no_grad():
        return m.generate(ids, attention_mask=mask, **kw)


def _same_generation(got, ref):
    assert torch.equal(got.sequences, ref.sequences)
    err = (torch.stack(got.scores) - torch.stack(ref.scores)).abs().max().item()
    assert err <= TOL, err


# ---- static cache ----------------------------------------------------------------------------


def test_static_cache_no_padding(eager, model):
    """attention_mask=None into a static cache: SDPA aligns is_causal top-left over the buffer."""
    ids = _ids(1, 7)
    ref = _generate(eager, ids, cache_implementation="static")
    _same_generation(_generate(model, ids, cache_implementation="static"), ref)
    _same_generation(_generate(model, ids), ref)  # dynamic cache: the same tokens


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_generation_with_padding(eager, model, side, cache):
    ids = _ids(3, 9, seed=2)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:  # right padding: the generated tokens come after a gap of padding
        mask[1, 6:] = 0
        mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    _same_generation(_generate(model, ids, mask, **kw), _generate(eager, ids, mask, **kw))


def test_mask_with_gaps_in_prompt(eager, model):
    """input_ids.ne(pad) with pad ids inside a row: keys with gaps, forward and generation."""
    ids = _ids(2, 11, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    mask[1, 1] = 0
    mask[1, 6:8] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    valid = mask.bool()
    ref = hf_logits(eager, ids, attention_mask=mask)
    got = hf_logits(model, ids, attention_mask=mask)
    assert (got - ref)[valid].abs().max().item() <= TOL
    _same_generation(_generate(model, ids, mask), _generate(eager, ids, mask))


def test_custom_4d_masks(eager, model):
    """Full (bidirectional) and block-diagonal (packed documents) 4-D masks, as given."""
    ids = _ids(2, 10, seed=4)
    full = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    ref = hf_logits(eager, ids, attention_mask=full)
    assert (hf_logits(model, ids, attention_mask=full) - ref).abs().max().item() <= TOL
    docs = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    packed = (docs[:, None] == docs[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    packed = packed.expand(2, 1, 10, 10)
    pos = torch.cat([torch.arange(4), torch.arange(3), torch.arange(3)])[None].expand(2, -1)
    # eager adds a 4-D mask to the scores: give it the additive form (0 keeps, min drops)
    additive = torch.zeros(packed.shape).masked_fill(~packed, torch.finfo(torch.float32).min)
    ref = hf_logits(eager, ids, attention_mask=additive, position_ids=pos)
    for m in (packed, additive):
        got = hf_logits(model, ids, attention_mask=m, position_ids=pos)
        assert (got - ref).abs().max().item() <= TOL


def test_packed_rows_equal_documents_fed_one_by_one(model):
    """Padding-free packing (position ids that restart, no mask) gives each document's own
    logits."""
    lens = [5, 3, 6]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lens)]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    got = hf_logits(model, ids, position_ids=pos, use_cache=False)  # as in training
    start = 0
    for d, n in zip(docs, lens):
        ref = hf_logits(model, d)
        assert (got[:, start : start + n] - ref).abs().max().item() <= TOL
        start += n


def test_unsupported_pattern_names_the_row():
    config = _config()
    m = hf_model(config, "fastrope")
    attn = m.model.layers[0].self_attn
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(NotImplementedError, match=r"query \d+ (sees|does not see) key \d+"):
        fr_hf.fastrope_attention_forward(attn, q, k, k, mask[None, None])


# ---- the mask/position analysis against a masked softmax, on random patterns ----------------


def _rotate_half(x, pos, inv_freq):
    ang = pos[:, None].double() * inv_freq[None, :].double()
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def _masked_reference(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], -float("inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


class _Attn(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rope", [False, True], ids=["w-none", "rotary"])
def test_random_padding_gaps_and_documents(seed, rope):
    """Rows with random valid keys (gaps), packed documents, a cache offset: fastrope's split
    into key runs equals a masked softmax, with RoPE positions derived as generate assigns them
    (consecutive over each document's valid tokens)."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hk, d = 3, 4, 2, 8
    nk = int(torch.randint(6, 20, (1,), generator=g))
    nq = int(torch.randint(1, nk + 1, (1,), generator=g))
    q0 = int(torch.randint(0, nk - nq + 1, (1,), generator=g))
    qidx = torch.arange(nq) + q0
    masks, positions = [], []
    for _ in range(b):
        valid = torch.rand(nk, generator=g) > 0.3
        valid[qidx] |= torch.rand(nq, generator=g) > 0.2  # most queries are valid tokens
        cuts = torch.sort(
            torch.randint(1, nk, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
        ).values
        doc = torch.searchsorted(cuts, torch.arange(nk), right=True)
        rank = torch.zeros(nk, dtype=torch.long)
        for dd in doc.unique():
            sel = (doc == dd) & valid
            rank[sel] = torch.arange(int(sel.sum()))
        causal = qidx[:, None] >= torch.arange(nk)[None, :]
        m = causal & valid[None, :] & (doc[qidx][:, None] == doc[None, :])
        masks.append(m)
        positions.append(torch.where(valid[qidx], rank[qidx], torch.ones(nq, dtype=torch.long)))
    mask = torch.stack(masks)
    pos_q = torch.stack(positions)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    mod = _Attn()
    scale = d**-0.5
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if rope:
        inv_freq = 1.0 / (500.0 ** (torch.arange(0, d, 2).double() / d))
        mod.fastrope_w = fr_hf.Rotary(base=500.0, layout="half")
        # key positions: their rank among the valid keys of their document (generate's cumsum)
        ref_rows = []
        for i in range(b):
            valid = mask[i].any(0)
            doc_start = mask[i].int().argmax(-1)
            kpos = torch.zeros(nk, dtype=torch.long)
            for s in doc_start[mask[i].any(1)].unique():
                nxt = doc_start[doc_start > s]
                end = int(nxt.min()) if nxt.numel() else nk
                sel = valid & (torch.arange(nk) >= s) & (torch.arange(nk) < end)
                kpos[sel] = torch.arange(int(sel.sum()))
            qq = _rotate_half(q[i], pos_q[i], inv_freq)
            kk = _rotate_half(kr[i], kpos, inv_freq)
            ref_rows.append(
                _masked_reference(qq[None], kk[None], vr[i : i + 1], mask[i : i + 1], scale)
            )
        ref = torch.cat(ref_rows)
        kw = {"position_ids": pos_q}
    else:
        ref = _masked_reference(q, kr, vr, mask, scale)
        kw = {}
    out, _ = fr_hf.fastrope_attention_forward(mod, q, k, v, mask[:, None], scaling=scale, **kw)
    got = out.transpose(1, 2)
    seen = mask.any(-1)  # rows with no visible key: 0 (eager's are filler)
    valid_q = torch.stack([mask[i].any(0)[qidx] for i in range(b)]) & seen
    rows = valid_q if rope else seen
    err = (got - ref).abs().amax(-1).transpose(0, 1)[:, rows].max().item() if rows.any() else 0.0
    assert err <= 1e-10, err


# ---- rope types -------------------------------------------------------------------------------

ROPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "linear-original-key": {
        "rope_type": "linear",
        "factor": 2.0,
        "original_max_position_embeddings": 16,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic-original-key": {
        "rope_type": "dynamic",
        "factor": 2.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-options": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [1.0, 2.0, 3.0, 4.0],
        "original_max_position_embeddings": 16,
    },
    "proportional": {"rope_type": "proportional", "factor": 1.5},
}


def test_every_rope_type_is_covered():
    kinds = {r.get("rope_type", "default") for r in ROPES.values()}
    assert kinds == set(ROPE_INIT_FUNCTIONS) | {"default"}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rotary_from_config_is_transformers_rope(name):
    """The frequencies and attention factor of rotary_from_config are those of transformers' own
    rope functions (float32 in transformers: compared to its rounding)."""
    config = _config(**ROPES[name])
    kind = config.rope_parameters["rope_type"]
    seq_lens = [None, 30, 100] if kind in ("dynamic", "longrope") else [None]
    for seq_len in seq_lens:
        if kind == "default":
            ref, ref_f = transformers.LlamaForCausalLM(config).model.rotary_emb.inv_freq, 1.0
        else:
            ref, ref_f = ROPE_INIT_FUNCTIONS[kind](copy.deepcopy(config), None, seq_len=seq_len)
        if kind == "dynamic":
            theta, f = fr_hf.rotary_from_config(config).frequencies(
                8, None if seq_len is None else seq_len - 1
            )
        else:
            theta, f = fr_hf.rotary_from_config(config, seq_len=seq_len).frequencies(8)
        assert torch.allclose(torch.as_tensor(theta), ref.double(), rtol=1e-6, atol=0)
        assert f == pytest.approx(ref_f, rel=1e-7)


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("n", [12, 40], ids=["short", "past-threshold"])
def test_rope_in_fastrope_forward_equals_eager(name, n):
    config = _config(**ROPES[name])
    ids = _ids(2, n, seed=5)
    ref = hf_logits(hf_model(config, "eager"), ids)
    got = hf_logits(hf_model(config, "fastrope", rope_in_fastrope=True), ids)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_rope_in_fastrope_generation_equals_eager(name, cache):
    """Generation with padding, both caches, every rope type (below the dynamic threshold)."""
    config = _config(**ROPES[name])
    ids = _ids(2, 8, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    ref = _generate(hf_model(config, "eager"), ids, mask, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no frequency change below the thresholds
        got = _generate(hf_model(config, "fastrope", rope_in_fastrope=True), ids, mask, **kw)
    _same_generation(got, ref)


def test_dynamic_rope_changing_during_generation_warns():
    config = _config(**ROPES["dynamic"])
    ids = _ids(1, 62, seed=7)  # generation crosses max_position_embeddings = 64
    m = hf_model(config, "fastrope", rope_in_fastrope=True)
    with pytest.warns(UserWarning, match="changed its frequencies"):
        _generate(m, ids)


def test_partial_rotary_is_refused():
    config = _config(partial_rotary_factor=0.5)
    with pytest.raises(NotImplementedError, match="partial_rotary_factor"):
        fr_hf.rotary_from_config(config)


def test_gradients_through_split_keys_match_eager(config):
    """Training with key masks that split into runs (gaps) and packed documents: the parameter
    gradients are eager's (the log-sum-exp merge is differentiated too)."""
    ids = _ids(2, 12, seed=8)
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    mask[1, :2] = 0
    # the loss reads the logits of valid tokens only (a query that sees no key is filler: eager
    # averages every key there, SDPA and fastrope give 0)
    use = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    grads = {}
    for impl, rope in [("eager", False), ("fastrope", False), ("fastrope", True)]:
        m = hf_model(config, impl, rope).train()
        logits = m(ids, attention_mask=mask).logits[:, :-1][use]
        torch.nn.functional.cross_entropy(logits, ids[:, 1:][use]).backward()
        grads[impl, rope] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    ref = grads["eager", False]
    for key in [("fastrope", False), ("fastrope", True)]:
        assert grads[key].keys() == ref.keys()
        for n, g in ref.items():
            assert (grads[key][n] - g).abs().max().item() <= TOL, (key, n)


def test_compiled_forward_generation(eager, config):
    """torch.compile'd model forward (transformers' compiled generation): the attention runs
    eagerly inside the graph (its calls depend on the mask's values), the tokens are eager's."""
    m = hf_model(config, "fastrope", True)
    m.forward = torch.compile(m.forward)
    ids = _ids(2, 9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    kw = {"cache_implementation": "static"}
    _same_generation(_generate(m, ids, mask, **kw), _generate(eager, ids, mask, **kw))
