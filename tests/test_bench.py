"""`scratchgpt bench train`: its JSON report, its baseline, and the CPU thread setting."""

import json
from dataclasses import asdict

import torch
from conftest import TINY_MODEL_FLAGS, tiny_config

from scratchgpt.cli import main
from scratchgpt.config import config_from_preset
from scratchgpt.optim import configure_optimizer
from scratchgpt.speed.bench import baseline_config
from scratchgpt.train import train

TINY = TINY_MODEL_FLAGS


def test_bench_train_json_reports_both_paths_consistently(small_corpus, capsys):
    threads_before = torch.get_num_threads()
    assert main(["bench", "train", "--preset", "cpu-baby", "--data", str(small_corpus), "--steps", "4", "--json",
                 "--threads", "1", *TINY]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    settings = report["settings"]
    assert settings["tokens_per_step"] == 4 * 16 and settings["threads"] == 1
    # --dtype auto: what the probe chose (or float32 without native bf16), and the reason says which
    assert settings["autocast"] == ("bfloat16" if settings["dtype_choice"].startswith("bfloat16:") else "off")
    assert settings["compile"] is False
    assert torch.get_num_threads() == threads_before  # the setting lasts for the benchmark only
    # The classic recipe runs PyTorch's default AdamW on a CPU (a loop over the tensors); the
    # fused kernel is one of the fast path's choices, so only the config's path gets it.
    assert settings["baseline"] == {"dtype": "float32", "compile": False, "attention": "sdpa",
                                    "adamw": "pytorch default"}


def test_negative_threads_is_refused(small_corpus, capsys):
    assert main(["train", "--data", str(small_corpus), "--threads", "-1", *TINY]) != 0
    assert "threads must be >= 0" in capsys.readouterr().err


def test_train_runs_with_the_thread_count_it_is_given(tmp_path, small_corpus):
    before = torch.get_num_threads()
    messages = []
    train(tiny_config(small_corpus, max_steps=2, eval_interval=2, threads=1), tmp_path / "run", progress=False,
          log=messages.append)
    assert any(", 1 CPU thread," in m for m in messages), messages[:2]
    assert torch.get_num_threads() == before


def test_the_baseline_is_the_plain_path_of_the_same_model():
    config = config_from_preset("speedrun")  # bf16 autocast, compiled, written-out attention
    plain = baseline_config(config)
    assert (plain.train.dtype, plain.train.compile, plain.model.attention) == ("float32", False, "sdpa")
    assert (config.train.dtype, config.train.compile, config.model.attention) == ("auto", True, "manual")  # untouched
    unchanged = {**asdict(plain.model), "attention": "manual"}
    assert unchanged == asdict(config.model)
    assert {**asdict(plain.train), "dtype": "auto", "compile": True} == asdict(config.train)


def test_configure_optimizer_builds_fused_or_default_adamw(small_corpus):
    """The fast path's fused kernel, or PyTorch's default AdamW for the baseline (asserted in the report above)."""
    config = tiny_config(small_corpus)
    model = torch.nn.Linear(4, 4)
    assert configure_optimizer(model, config.train, torch.device("cpu")).defaults["fused"] is True
    assert not configure_optimizer(model, config.train, torch.device("cpu"), fused=False).defaults["fused"]
