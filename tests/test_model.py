import math
import re

import pytest
import torch

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig, config_from_preset, load_preset, preset_names
from scratchgpt.errors import ConfigError
from scratchgpt.model import GPT, Bigram, count_parameters, manual_attention


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def gpt_parameter_count(V, T, L, C, H, bias, tied):
    """GPT-2 parameter count written out layer by layer."""
    per_block = (C + bias * C) * 2  # two LayerNorms
    per_block += C * 3 * C + bias * 3 * C  # c_attn
    per_block += C * C + bias * C  # attn c_proj
    per_block += C * H + bias * H + H * C + bias * C  # MLP
    total = V * C + T * C + L * per_block + (C + bias * C)  # embeddings, blocks, ln_f
    return total + (0 if tied else V * C)


def test_fresh_bigram_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = Bigram(ModelConfig(model_type="bigram", vocab_size=65, block_size=8))
    idx = torch.randint(65, (16, 8))
    _, loss = model(idx, torch.randint(65, (16, 8)))
    assert count_parameters(model) == 65 * 65 == 4225
    assert loss.item() == pytest.approx(math.log(65), abs=0.02)


def test_fresh_gpt_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(small(vocab_size=65))
    _, loss = model(torch.randint(65, (4, 16)), torch.randint(65, (4, 16)))
    assert loss.item() == pytest.approx(math.log(65), abs=0.1)


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_parameter_count_by_hand(bias, tied):
    model = GPT(small(bias=bias, tie_weights=tied, mlp_hidden=48))
    assert count_parameters(model) == gpt_parameter_count(23, 16, 2, 32, 48, bias, tied)


@pytest.mark.parametrize("name", preset_names())
def test_preset_parameter_counts_match_their_descriptions(name):
    """Each preset's description states its size on Tiny Shakespeare; the built model must agree."""
    stated = re.search(r"([\d,]+) parameters on Tiny Shakespeare", load_preset(name)["description"])
    assert stated, f"preset {name}'s description does not state its parameter count"
    cfg = config_from_preset(name).model
    cfg.vocab_size = 65
    assert count_parameters(build_model(cfg)) == int(stated.group(1).replace(",", ""))


def test_weight_tying_shares_one_matrix():
    model = GPT(small(tie_weights=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert GPT(small(tie_weights=False)).lm_head.weight is not GPT(small(tie_weights=False)).transformer.wte.weight


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(small(n_layer=8, n_embd=128))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_logits_over_every_position():
    model = GPT(small())
    logits, loss = model(torch.randint(23, (3, 11)))
    assert logits.shape == (3, 11, 23) and loss is None


def test_causality_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    idx = torch.randint(23, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 5) % 23
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_manual_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(manual_attention(q, k, v), fused, atol=1e-5)


def test_manual_attention_follows_the_mask_or_the_causal_triangle_as_sdpa_does():
    """Without a mask, causal (training, a prefill); with one, what it allows (a cached step over rows of other lengths)."""
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    assert torch.allclose(manual_attention(q, k, v), sdpa(q, k, v, is_causal=True), atol=1e-6)
    mask = torch.tensor([[True] * 7, [True, True, True, False, False, False, False]]).view(2, 1, 1, 7)
    one = q[:, :, :1]  # one query per row, seeing all 7 keys in row 0 and the first 3 in row 1
    assert torch.allclose(manual_attention(one, k, v, mask=mask), sdpa(one, k, v, attn_mask=mask), atol=1e-6)
    assert torch.allclose(manual_attention(one[:1], k[:1], v[:1], mask=mask[:1]), sdpa(one[:1], k[:1], v[:1]), atol=1e-6)


def test_manual_and_sdpa_models_agree():
    torch.manual_seed(0)
    sdpa = GPT(small(attention="sdpa")).eval()
    manual = GPT(small(attention="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(23, (2, 16))
    assert torch.allclose(sdpa(idx)[0], manual(idx)[0], atol=1e-5)


def test_first_position_attends_only_to_itself():
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    out = manual_attention(q, k, v)
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0])
    weights = torch.softmax((q @ k.transpose(-2, -1))[0, 0, 1, :2] / 2.0, dim=-1)  # sqrt(hs) = 2
    assert torch.allclose(out[0, 0, 1], weights @ v[0, 0, :2], atol=1e-6)


def test_the_classic_gpt_refuses_options_beyond_gpt2_and_names_build_model():
    with pytest.raises(ConfigError, match=r"rope, relu2.*build_model"):
        GPT(small(position="rope", activation="relu2"))
    assert type(build_model(small(position="rope"))).__name__ == "ModernGPT"
    assert type(build_model(small(activation="gelu_tanh"))) is GPT  # GPT-2's own GELU is classic


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(small())(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(attention="flash"), "attention"),
])
def test_invalid_model_config_is_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        small(**kw)
