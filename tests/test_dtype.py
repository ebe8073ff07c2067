"""`--dtype auto` on a CPU (speed/dtype.py): float32 without native bf16, else a probe decides, once per machine."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.speed import dtype as dtype_module
from scratchgpt.speed.dtype import auto_cpu_dtype, choose, cpu_info, probe

NATIVE = ("Intel(R) Xeon(R) Test", frozenset({"avx512f", "avx512_bf16"}))
PLAIN = ("AMD Test", frozenset({"avx2", "avx512f"}))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1))


@pytest.fixture
def batch():
    return torch.randint(20, (2, 8)), torch.randint(20, (2, 8))


def test_cpu_info_reads_the_model_name_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_info(str(path)) == ("Test CPU @ 2GHz", frozenset({"fpu", "avx512f", "avx512_bf16", "amx_tile"}))
    assert cpu_info(str(tmp_path / "missing")) == ("unknown", frozenset())


def test_bf16_wins_only_when_clearly_faster():
    assert choose(1.0, 0.89) == "bfloat16"
    assert choose(1.0, 0.95) == "float32"  # a near tie keeps float32's exact arithmetic
    assert choose(1.0, 1.3) == "float32"


def test_no_native_bf16_means_float32_without_a_probe(model, batch, monkeypatch):
    monkeypatch.setattr(dtype_module, "probe", lambda *a: pytest.fail("no probe without native bf16"))
    amp, reason = auto_cpu_dtype(model, *batch, info=PLAIN)
    assert amp is None and "no native bf16" in reason


def test_the_probe_decides_once_per_machine_and_model(model, batch, monkeypatch):
    calls = []
    monkeypatch.setattr(dtype_module, "probe", lambda *a: calls.append(1) or (1.0, 0.5))
    amp, reason = auto_cpu_dtype(model, *batch, info=NATIVE)
    assert amp == torch.bfloat16 and "2.00x" in reason and "just now" in reason
    amp, reason = auto_cpu_dtype(model, *batch, info=NATIVE)
    assert amp == torch.bfloat16 and "cached" in reason and len(calls) == 1
    other = build_model(ModelConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    monkeypatch.setattr(dtype_module, "probe", lambda *a: calls.append(1) or (1.0, 1.2))
    amp, _ = auto_cpu_dtype(other, *batch, info=NATIVE)  # another shape: measured again, and here bf16 loses
    assert amp is None and len(calls) == 2
    dtype_module.cache_file().write_text("{not json")  # a damaged cache is measured again, not an error
    assert auto_cpu_dtype(other, *batch, info=NATIVE)[0] is None and len(calls) == 3


def test_the_probe_leaves_the_model_its_gradients_and_the_random_state_alone(model, batch):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    float32_s, bfloat16_s = probe(model, *batch)
    assert float32_s > 0 and bfloat16_s > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_with_dtype_auto_says_what_it_chose(tmp_path, small_corpus, monkeypatch):
    from scratchgpt.train import train

    monkeypatch.setattr(dtype_module, "cpu_info", lambda: PLAIN)
    lines = []
    train(tiny_config(small_corpus, max_steps=2, dtype="auto"), tmp_path / "run", progress=False, log=lines.append)
    assert "autocast off (--dtype auto chose float32: this CPU has no native bf16" in lines[0]
