"""The options beyond GPT-2: RoPE, RMSNorm, QK-norm, ReLU^2, SwiGLU, zero-initialised projections, Muon."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from scratchgpt.build import build_model
from scratchgpt.checkpoint import load_checkpoint
from scratchgpt.config import ModelConfig, TrainConfig
from scratchgpt.modern import ModernAttention, ModernMLP, apply_rope, previous_tokens, rope_tables
from scratchgpt.optim import (
    MultiOptimizer,
    Muon,
    configure_optimizer,
    newton_schulz,
    set_learning_rate,
)
from scratchgpt.train import train

MODERN = dict(norm="rmsnorm", position="rope", qk_norm=True, activation="relu2", tie_weights=False)


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=19, block_size=16, n_layer=2, n_head=2, n_embd=16)
    base.update(kw)
    return ModelConfig(**base)


def test_rope_rotates_each_pair_by_its_angle():
    cos, sin = rope_tables(head_size=4, length=8, base=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 8, 4)  # pairs are (x0, x2) and (x1, x3)
    out = apply_rope(x, cos, sin)[0, 0]
    m = 3
    for pair, freq in (((0, 2), 1.0), ((1, 3), 100.0 ** (-2 / 4))):
        a, b = x[0, 0, m, pair[0]].item(), x[0, 0, m, pair[1]].item()
        angle = m * freq
        assert out[m, pair[0]].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
        assert out[m, pair[1]].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle), abs=1e-5)
    assert torch.allclose(out[0], x[0, 0, 0])  # position 0 is not rotated


def test_rope_preserves_norms_and_sees_relative_positions():
    torch.manual_seed(0)
    cos, sin = rope_tables(head_size=8, length=32)
    q, k = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    rq = apply_rope(q, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # the same query and key content, moved together by 5 positions, give the same score
    same_q, same_k = q[:, :, :1].expand(1, 1, 32, 8), k[:, :, :1].expand(1, 1, 32, 8)
    rq, rk = apply_rope(same_q, cos, sin), apply_rope(same_k, cos, sin)
    score = lambda m, n: (rq[0, 0, m] @ rk[0, 0, n]).item()  # noqa: E731
    assert score(7, 3) == pytest.approx(score(12, 8), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


@pytest.mark.parametrize("options", [MODERN, dict(MODERN, activation="swiglu"), dict(norm="rmsnorm"),
                                     dict(position="rope"), dict(qk_norm=True)])
def test_modern_options_stay_causal_and_agree_with_manual_attention(options):
    torch.manual_seed(0)
    sdpa = build_model(cfg(**options)).eval()
    manual = build_model(cfg(**options, attention="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(19, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 3) % 19
    a, b = sdpa(idx)[0], sdpa(changed)[0]
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert torch.allclose(a, manual(idx)[0], atol=1e-5)


def test_rope_model_has_no_position_table():
    names = dict(build_model(cfg(position="rope")).named_parameters())
    assert "transformer.wpe.weight" not in names and "transformer.wpe.weight" in dict(build_model(cfg()).named_parameters())


def test_relu2_and_swiglu_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    relu2 = ModernMLP(cfg(activation="relu2", mlp_hidden=8))
    h = relu2.c_fc(x)
    assert torch.allclose(relu2(x), relu2.c_proj(torch.clamp(h, min=0) ** 2), atol=1e-6)
    swiglu = ModernMLP(cfg(activation="swiglu", mlp_hidden=8))
    assert swiglu.c_fc.out_features == 16
    gate, value = swiglu.c_fc(x)[..., :8], swiglu.c_fc(x)[..., 8:]
    assert torch.allclose(swiglu(x), swiglu.c_proj(gate * torch.sigmoid(gate) * value), atol=1e-6)


def test_zero_initialised_projections_make_blocks_the_identity():
    torch.manual_seed(0)
    model = build_model(cfg(zero_init_proj=True, tie_weights=False)).eval()
    idx = torch.randint(19, (1, 10))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
    expected = model.lm_head(model.transformer.ln_f(x))
    assert torch.allclose(model(idx)[0], expected, atol=1e-6)


def test_qk_norm_attends_with_unit_rms_queries_and_keys_by_hand():
    torch.manual_seed(0)
    config = cfg(qk_norm=True, attention="manual")
    attn = ModernAttention(config).eval()
    B, T, C, nh = 2, 5, config.n_embd, config.n_head
    x = torch.randn(B, T, C) * 3
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)

    def unit_rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)

    scores = unit_rms(q) @ unit_rms(k).transpose(-2, -1) / math.sqrt(C // nh)  # (B, nh, T, T)
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    by_hand = attn.c_proj((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), by_hand, atol=1e-5)
    attn.qk_norm = False  # the same weights without the norm attend differently
    assert not torch.allclose(attn(x), by_hand, atol=1e-3)


def test_muon_updates_are_near_orthogonal():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(32, 32))
    opt = torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    grad = torch.randn(32, 4) @ torch.randn(4, 32) + 0.01 * torch.randn(32, 32)  # badly conditioned
    weight.grad = grad
    opt.step()
    update = -weight.detach()
    singular = torch.linalg.svdvals(update)
    assert singular.max() < 1.5 and singular.min() > 0.0
    top = singular[:4]
    assert top.max() / top.min() < 1.5  # the large directions are equalised...
    assert torch.linalg.svdvals(grad)[:4].max() / torch.linalg.svdvals(grad)[:4].min() > top.max() / top.min()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_batched_muon_matches_torch_muon():
    """The batched fast path takes the same steps as the reference torch.optim.Muon."""
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (16, 48), (16, 16), (16, 16), (48, 16)]
    ours = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fast = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95)
    slow = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(4):
        grads = [torch.randn(*s) for s in shapes]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        slow.step()
    for p, q in zip(ours, ref, strict=True):
        moved = (q.detach() - p.detach()).abs().max()
        assert moved < 2e-3, moved  # bfloat16 matmuls, batched or not, agree to rounding
        assert torch.equal(fast.state[p]["momentum_buffer"], slow.state[q]["momentum_buffer"])


def test_newton_schulz_orthogonalises_a_stack_of_matrices():
    torch.manual_seed(0)
    g = torch.randn(3, 8, 24)
    x = newton_schulz(g).float()
    singular = torch.linalg.svdvals(x)  # (3, 8)
    assert singular.min() > 0.5 and singular.max() < 1.5  # near 1: near-orthogonal rows
    assert torch.allclose(newton_schulz(g.mT).float(), x.mT, atol=1e-2)  # tall matrices take the same path


def test_polar_express_brings_small_singular_values_nearer_one_than_newton_schulz():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8))
    v, _ = torch.linalg.qr(torch.randn(24, 8))
    g = u @ torch.diag(torch.logspace(-3, 0, 8)) @ v.T  # singular values from 1e-3 to 1
    plain = torch.linalg.svdvals(newton_schulz(g).float())
    express = torch.linalg.svdvals(newton_schulz(g, polar_express=True).float())
    # In exact arithmetic five steps take 1e-3 to 0.47 (Newton-Schulz) and 0.86 (Polar Express); bf16 leaves less.
    assert plain.min() < 0.55 and express.min() > 0.6 and express.max() < 1.2
    assert (express - 1).abs().mean() < 0.6 * (plain - 1).abs().mean()  # all of them nearer 1
    with pytest.raises(ValueError, match="5 steps, not 6"):
        newton_schulz(g, steps=6, polar_express=True)


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = build_model(cfg(**MODERN))
    opt = configure_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(opt, MultiOptimizer)
    adamw, muon = opt.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("transformer.h.") and p.dim() == 2), name
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)


def test_embed_and_head_rates_get_groups_of_their_own_on_the_schedule():
    model = build_model(cfg(**MODERN))
    train_cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, embed_lr=1e-2, head_lr=5e-4)
    adamw = configure_optimizer(model, train_cfg, torch.device("cpu")).optimizers[0]
    scale_of = {id(p): g["lr_scale"] for g in adamw.param_groups for p in g["params"]}
    assert scale_of[id(model.transformer.wte.weight)] == pytest.approx(10.0)
    assert scale_of[id(model.lm_head.weight)] == pytest.approx(0.5)
    assert scale_of[id(model.transformer.ln_f.weight)] == 1.0
    set_learning_rate(adamw, 2e-4)  # a point of the schedule: each group at its own multiple of it
    rate_of = {id(p): g["lr"] for g in adamw.param_groups for p in g["params"]}
    assert rate_of[id(model.transformer.wte.weight)] == pytest.approx(2e-3)
    assert rate_of[id(model.lm_head.weight)] == pytest.approx(1e-4)
    # Without either rate the groups stay the two that earlier runs saved, so their optimizer state resumes.
    plain = configure_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers[0]
    assert [g["weight_decay"] for g in plain.param_groups] == [0.1, 0.0]


def test_modern_muon_run_learns_and_resumes_exactly(tmp_path, small_corpus):
    def config(steps):
        c = tiny_config(small_corpus, max_steps=steps, eval_interval=10, lr_decay_steps=30, optimizer="muon", muon_lr=0.02)
        for key, value in dict(MODERN, zero_init_proj=True).items():
            setattr(c.model, key, value)
        return c

    full = train(config(30), tmp_path / "full", progress=False)
    assert full.full_val_loss < math.log(20) - 1.0
    train(config(10), tmp_path / "split", progress=False)
    train(config(30), tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last")[0].state_dict()
    b = load_checkpoint(tmp_path / "split" / "last")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_with_a_zero_learning_rate_trains_without_moving_a_weight(tmp_path, small_corpus):
    config = tiny_config(small_corpus, optimizer="muon", learning_rate=0.0, min_lr=0.0, max_steps=5, eval_interval=5)
    torch.manual_seed(config.train.seed)
    result = train(config, tmp_path / "run", progress=False, log=lambda message: None)
    model, _, _, _ = load_checkpoint(tmp_path / "run" / "last")
    torch.manual_seed(config.train.seed)  # train() seeds the same way before building the model
    fresh = build_model(dataclasses.replace(model.config))
    assert result.steps == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_zero_init_head_starts_at_the_uniform_loss_and_embed_norm_at_unit_rms():
    import math

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm",
                                    tie_weights=False, zero_init_head=True, embed_norm=True))
    x = torch.randint(30, (2, 8))
    _, loss = model(x, x)
    assert math.isclose(loss.item(), math.log(30), rel_tol=1e-6)
    embedded = model.embed(x, None)
    assert torch.allclose(embedded.pow(2).mean(-1), torch.ones(2, 8), atol=1e-3)  # up to rms_norm's eps


def test_the_logit_softcap_bounds_the_logits_and_keeps_small_ones():
    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig

    torch.manual_seed(0)
    plain = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm"))
    capped = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm",
                                     logit_softcap=2.0))
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.lm_head.weight.mul_(100)
        capped.lm_head.weight.mul_(100)
    x = torch.randint(30, (2, 8))
    raw, _ = plain(x)
    soft, _ = capped(x)
    assert raw.abs().max() > 10 and soft.abs().max() <= 2  # tanh reaches the cap itself only by rounding
    assert torch.allclose(soft, 2.0 * torch.tanh(raw / 2.0), atol=1e-5)


def test_the_pair_embedding_adds_each_tokens_pair_row_by_hand():
    model = build_model(cfg(**MODERN, bigram_embed=True)).eval()
    V = model.config.vocab_size
    assert model.transformer.bigram.weight.shape == ((V + 1) * V, 16) and not model.transformer.bigram.weight.any()
    with torch.no_grad():
        model.transformer.bigram.weight.normal_()
    idx = torch.tensor([[3, 1, 2]])
    assert previous_tokens(idx, None, none=V).tolist() == [[V, 3, 1]]  # the window's first token follows nothing
    table, pairs = model.transformer.bigram.weight, torch.tensor([V * V + 3, 3 * V + 1, 1 * V + 2])
    expected = model.transformer.wte.weight[idx[0]] + table[pairs]
    torch.testing.assert_close(model.embed(idx, None)[0], expected)


def test_samples_of_a_pair_embedding_model_from_one_prefill_equal_the_reference():
    from scratchgpt.inference.engine import Request, SamplingSettings, run
    from scratchgpt.sample import generate_naive

    torch.manual_seed(0)
    model = build_model(cfg(**MODERN, bigram_embed=True)).eval()
    with torch.no_grad():
        model.transformer.bigram.weight.normal_()
        model.lm_head.weight.mul_(10)
    prompt = [1, 2, 3, 4]
    request = Request(prompt, SamplingSettings(max_new_tokens=30, num_samples=3), torch.Generator().manual_seed(5))
    rows = torch.tensor([output.ids for output in run(model, request)]).T  # (3, 30): copied rows, window jumps
    reference = generate_naive(model, torch.tensor([prompt]).expand(3, -1), 30, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.stack(list(reference), dim=1), rows)


def test_a_pair_embedding_refuses_what_it_cannot_be():
    from scratchgpt.errors import ConfigError, InteropError
    from scratchgpt.interop.hf import check_exportable
    from scratchgpt.lora import add_lora, grow_vocab

    with pytest.raises(ConfigError, match="bigram_embed.*vocab_size 5000"):
        build_model(cfg(**MODERN, bigram_embed=True, vocab_size=5000))
    model = build_model(cfg(**MODERN, bigram_embed=True))
    with pytest.raises(ConfigError, match="cannot grow"):
        grow_vocab(model, 23)
    with pytest.raises(ConfigError, match="cannot grow"):
        add_lora(model, rank=2, alpha=4.0, vocab_size=23)
    for option in (dict(bigram_embed=True), dict(embed_norm=True), dict(logit_softcap=15.0)):
        with pytest.raises(InteropError, match=f"{next(iter(option))}=.*no GPT-2 equivalent"):
            check_exportable(cfg(**option))


def test_a_run_with_its_own_embedding_rate_resumes_exactly_and_refuses_other_groups(tmp_path, small_corpus):
    from scratchgpt.errors import CheckpointError

    def config(steps, **rates):
        c = tiny_config(small_corpus, max_steps=steps, eval_interval=10, lr_decay_steps=20, optimizer="muon", **rates)
        c.model.tie_weights = False
        return c

    full = train(config(20, embed_lr=1e-2), tmp_path / "full", progress=False)
    train(config(10, embed_lr=1e-2), tmp_path / "split", progress=False)
    split = train(config(20, embed_lr=1e-2), tmp_path / "split", resume=True, progress=False)
    assert split.full_val_loss == full.full_val_loss  # the embedding's group and its moments came back as saved
    train(config(10, embed_lr=1e-2), tmp_path / "changed", progress=False)
    for rates in (dict(head_lr=1e-2), {}):  # the head's group where the embedding's was; no group of its own
        with pytest.raises(CheckpointError, match=r"groups \['embed', 'matrices', 'vectors', 'muon'\].*--embed-lr"):
            train(config(20, **rates), tmp_path / "changed", resume=True, progress=False)
