"""The fast CPU kernels (kernels.py) compute what the plain layers compute, and build_model swaps them in."""

import json

import pytest
import torch

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.inference.cache import KVCache
from scratchgpt.model import GPT
from scratchgpt.modern import ModernGPT
from scratchgpt.speed import kernels
from scratchgpt.speed.choices import choices_file


@pytest.fixture
def row_path(monkeypatch):
    """The row path chosen, whatever this machine's probe says."""
    monkeypatch.setattr(kernels, "row_path_wins", lambda threads: True)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("options", [{}, dict(position="rope", norm="rmsnorm", qk_norm=True, activation="relu2")])
def test_build_model_swaps_the_kernels_in_and_decodes_like_the_plain_model(options, monkeypatch, row_path):
    """Same state dict, same logits for a full pass and for cached one-token steps (where the row path runs)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the row path needs more than one block
    torch.manual_seed(0)
    fast = build_model(small(**options)).eval()
    plain = (ModernGPT if options else GPT)(small(**options)).eval()
    plain.load_state_dict(fast.state_dict())
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is kernels.RowBlockLinear for m in linears)
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert fast.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(23, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fast(idx)[0], plain(idx)[0], atol=1e-6)
        steps = []
        for model in (fast, plain):
            cache = KVCache.for_model(model)
            model(idx[:, :8], cache=cache)
            steps.append(torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)], dim=1))
    assert torch.allclose(steps[0], steps[1], atol=1e-5)


def test_cpu_bf16_autocast_attends_in_float32(monkeypatch):
    """Under bf16 autocast on CPU, SDPA gets float32 inputs (its bf16 kernel is slow) and the
    block still returns bf16 activations whose values match the float32 model's."""
    torch.manual_seed(0)
    model = build_model(small())
    idx = torch.randint(23, (2, 16))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        out = sdpa(q, k, v, **kw)
        seen.append(out.dtype)  # autocast would have downcast again inside an enabled region
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert seen == [torch.float32] * (2 * model.config.n_layer)
    assert logits.dtype == torch.bfloat16
    assert all(p.grad is not None for p in model.parameters())
    reference = model(idx)[0]
    assert (logits.float() - reference).abs().max() < 0.1  # bf16 matmuls: two to three digits


@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 1, 48), (2, 4, 48), (48,), (9, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_row_path_equals_f_linear(shape, bias, monkeypatch, row_path):
    """The few-row inference path (bmm over row blocks) gives F.linear's result; training never takes it."""
    torch.manual_seed(0)
    layer = kernels.RowBlockLinear(48, 96, bias=bias)
    x = torch.randn(shape)
    taken = []
    real = kernels.rows_times_weight
    monkeypatch.setattr(kernels, "rows_times_weight", lambda *a: taken.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(x)
    assert fast.shape == (*shape[:-1], 96)
    assert torch.allclose(fast, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert taken == ([1] if x.numel() // 48 <= kernels.RowBlockLinear.MAX_ROWS else [])
    layer(x).sum().backward()  # with autograd: the ordinary path, gradients as usual
    assert len(taken) <= 1 and layer.weight.grad is not None


def test_row_blocks_divide_the_weight(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert kernels.row_blocks(96) == 4 and kernels.row_blocks(66) == 2 and kernels.row_blocks(65) == 1


def test_where_the_row_path_measured_slower_f_linear_runs(monkeypatch):
    monkeypatch.setattr(kernels, "row_path_wins", lambda threads: False)
    monkeypatch.setattr(kernels, "rows_times_weight", lambda *a: pytest.fail("the row path ran"))
    layer = kernels.RowBlockLinear(48, 96)
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_the_row_path_is_chosen_once_per_machine_and_thread_count(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))  # no choice kept by an earlier test
    timings = [(1.0, 0.5), (1.0, 0.95), (1.0, 0.5)]  # each probe's seconds: F.linear's, the row path's
    calls = []

    def probe():
        calls.append(1)
        return timings[len(calls) - 1]

    monkeypatch.setattr(kernels, "probe_row_path", probe)
    kernels.row_path_wins.cache_clear()
    try:
        assert kernels.row_path_wins(2) is True and len(calls) == 1  # 2x faster: chosen
        kernels.row_path_wins.cache_clear()  # a new process: read from the cache directory, not measured
        assert kernels.row_path_wins(2) is True and len(calls) == 1
        assert kernels.row_path_wins(3) is False and len(calls) == 2  # another thread count; 5% is not clearly faster
        choices = choices_file(kernels.ROW_PATH_CHOICES)
        assert sorted(entry["speed"] for entry in json.loads(choices.read_text()).values()) == [1.053, 2.0]
        choices.write_text("{not json")  # a damaged file is measured again, not an error
        kernels.row_path_wins.cache_clear()
        assert kernels.row_path_wins(2) is True and len(calls) == 3
    finally:
        kernels.row_path_wins.cache_clear()


def test_the_probe_times_both_paths():
    linear_s, row_path_s = kernels.probe_row_path(n_embd=32, layers=1, rounds=2)
    assert linear_s > 0 and row_path_s > 0
