"""attn_implementation="fastrope" in Hugging Face transformers: a tiny random Llama with GQA gives
the eager implementation's logits (within 1e-4 in float32), with Hugging Face applying RoPE or
with fastrope applying it through w; padding, KV-cache generation, gradients and the errors."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import hf_logits, hf_model  # noqa: E402

import fastrope  # noqa: E402
import fastrope.integrations.transformers as fr_hf  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def config():
    fr_hf.register()
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )


@pytest.fixture(scope="module")
def models(config):
    return {
        "eager": hf_model(config, "eager"),
        "fastrope": hf_model(config, "fastrope"),
        "fastrope_rope": hf_model(config, "fastrope", rope_in_fastrope=True),
    }


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))


def test_register_and_rotary_from_config(models, config):
    from transformers import AttentionInterface

    assert fr_hf.NAME in AttentionInterface._global_mapping
    r = fr_hf.rotary_from_config(config)
    assert r == fastrope.Rotary(base=500.0, layout="half")
    attn = models["fastrope_rope"].model.layers[0].self_attn
    assert attn.fastrope_w == r
    c = copy.deepcopy(config)
    c.rope_parameters = {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}
    # other rope types carry transformers' own frequencies (test_transformers_masks.py)
    theta, f = fr_hf.rotary_from_config(c).frequencies(8)
    assert f == 1.0
    assert abs(theta - fastrope.Rotary(base=500.0).frequencies(8)[0] / 2).max() <= 1e-7


@pytest.mark.parametrize("impl", ["fastrope", "fastrope_rope"])
def test_logits_equal_eager(models, ids, impl):
    ref = hf_logits(models["eager"], ids)
    got = hf_logits(models[impl], ids)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("impl", ["fastrope", "fastrope_rope"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(models, ids, impl, side):
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :4] = 0
        valid = slice(4, None)
    else:
        mask[1, 9:] = 0
        valid = slice(0, 9)
    ref = hf_logits(models["eager"], ids, attention_mask=mask)
    got = hf_logits(models[impl], ids, attention_mask=mask)
    assert (got[0] - ref[0]).abs().max().item() <= TOL
    assert (got[1, valid] - ref[1, valid]).abs().max().item() <= TOL


@pytest.mark.parametrize("impl", ["fastrope", "fastrope_rope"])
def test_generate_with_kv_cache(models, ids, impl):
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = models["eager"].generate(ids[:1], **kw)
    got = models[impl].generate(ids[:1], **kw)
    assert torch.equal(got.sequences, ref.sequences)
    assert (torch.stack(got.scores) - torch.stack(ref.scores)).abs().max().item() <= TOL


def test_gradients_match_eager(config, ids):
    """Training through attn_implementation="fastrope": the same parameter gradients as eager."""
    grads = {}
    for impl in ("eager", "fastrope"):
        m = hf_model(config, impl).train()
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads[impl] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["fastrope"].keys()
    for n, g in grads["eager"].items():
        assert (grads["fastrope"][n] - g).abs().max().item() <= TOL, n


def test_unsupported_masks_and_options(models, config, ids):
    m = models["fastrope"]
    # a mask that is neither causal nor bidirectional over valid keys
    mask4 = torch.ones(2, 1, 13, 13, dtype=torch.bool).triu()
    with pytest.raises(NotImplementedError, match="attention_mask"):
        hf_logits(m, ids, attention_mask=mask4)
    with pytest.raises(ValueError, match="attn_implementation"):
        fr_hf.apply_rope_in_fastrope(hf_model(config, "eager"))
    attn = m.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="dropout"):
        attn.train()
        try:
            fr_hf.fastrope_attention_forward(attn, q, q[:, :2], q[:, :2], None, dropout=0.1)
        finally:
            attn.eval()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_in_fastrope_equals_eager(config, ids, rope):
    """fastrope.Rotary built from the config's rope parameters reproduces HF's scaled RoPE."""
    c = copy.deepcopy(config)
    c.rope_parameters = dict(rope, rope_theta=500.0)
    ref = hf_logits(hf_model(c, "eager"), ids)
    got = hf_logits(hf_model(c, "fastrope", rope_in_fastrope=True), ids)
    assert (got - ref).abs().max().item() <= TOL
