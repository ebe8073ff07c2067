import importlib
import json
import math

import pytest
import torch
from conftest import tiny_config

from scratchgpt.checkpoint import load_checkpoint, load_training_state
from scratchgpt.config import ModelConfig, TrainConfig
from scratchgpt.device import autocast_dtype
from scratchgpt.errors import ConfigError, ScratchGPTError
from scratchgpt.model import GPT
from scratchgpt.optim import configure_optimizer
from scratchgpt.train import TrainingDiverged, lr_at, train

train_module = importlib.import_module("scratchgpt.train")  # the package exports a function of the same name
device_module = importlib.import_module("scratchgpt.device")


def test_lr_schedule_boundaries():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # 1/10 of the way up
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warmup ends at the full rate
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the full rate
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway: the mean of max and min
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    rates = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # decays monotonically


def test_lr_schedule_without_warmup_and_with_explicit_decay_steps():
    cfg = TrainConfig(learning_rate=2e-3, min_lr=0.0, warmup_steps=0, max_steps=1000, lr_decay_steps=100)
    assert lr_at(0, cfg) == pytest.approx(2e-3)
    assert lr_at(50, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == 0.0 and lr_at(999, cfg) == 0.0


@pytest.mark.parametrize("kw", [dict(max_steps=-1), dict(batch_size=0), dict(min_lr=1.0, learning_rate=0.1),
                                dict(device="tpu"), dict(dtype="int8"), dict(learning_rate=float("nan"))])
def test_invalid_train_config_is_refused(kw):
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True))
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_autocast_choice_and_fallback(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is None  # on a CPU, auto is measured (tests/test_dtype.py)
    with pytest.raises(ScratchGPTError, match="float16 needs a GPU"):
        autocast_dtype("float16", cpu)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = configure_optimizer(model, TrainConfig(learning_rate=3e-3, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(20, (4, 16))
    y = torch.randint(20, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # random targets memorised: from ln(20) = 3.0 to near zero


def test_gradient_accumulation_matches_one_big_batch(small_corpus):
    """Two micro-batches of 4 with the loss halved give the gradient of one batch of 8."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(20, (8, 8)), torch.randint(20, (8, 8))
    model(x, y)[1].backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (model(x[part], y[part])[1] / 2).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(big, model.parameters(), strict=True))


def test_short_training_run_lowers_val_loss_and_writes_the_run(tmp_path, small_corpus):
    result = train(tiny_config(small_corpus, max_steps=60, eval_interval=20, sample_tokens=20), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(20)
    assert result.full_val_loss < 1.5 and result.steps == 60
    assert result.full_val_bpc == pytest.approx(result.full_val_loss / math.log(2))
    for name in ("best", "last"):
        assert (tmp_path / "run" / name / "model.safetensors").is_file()
    assert (tmp_path / "run" / "samples.txt").read_text().count("=== step") == 3
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((tmp_path / "run" / "last" / "meta.json").read_text())
    assert meta["step"] == 60 and meta["full_val"]["val_loss"] == pytest.approx(result.full_val_loss)


def test_train_leaves_the_callers_config_alone(tmp_path, small_corpus):
    """The run fills in vocab_size and may take --init-from's shape, on its own copy."""
    config = tiny_config(small_corpus, max_steps=2, eval_interval=2)
    before = config.to_dict()
    train(config, tmp_path / "run", progress=False)
    assert config.to_dict() == before and config.model.vocab_size == 0
    fine_tune = tiny_config(small_corpus, max_steps=2, eval_interval=2, init_from=str(tmp_path / "run"))
    fine_tune.model.n_layer, fine_tune.model.dropout = 1, 0.1  # the checkpoint's 2 layers win; dropout is free
    before = fine_tune.to_dict()
    train(fine_tune, tmp_path / "tuned", progress=False)
    assert fine_tune.to_dict() == before
    _, _, saved, _ = load_checkpoint(tmp_path / "tuned")
    assert (saved.model.n_layer, saved.model.dropout, saved.model.vocab_size) == (2, 0.1, 20)


def test_ten_step_run_leaves_a_usable_checkpoint(tmp_path, small_corpus):
    train(tiny_config(small_corpus, max_steps=10, eval_interval=1000, save_every=5), tmp_path / "run", progress=False)
    model, tok, config, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 10 and config.model.vocab_size == tok.vocab_size
    assert (tmp_path / "run" / "step-000005" / "optimizer.safetensors").is_file()


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, small_corpus):
    cfg = tiny_config(small_corpus, max_steps=10)
    cfg.model.tie_weights = False
    cfg.model.bias = True
    train(cfg, tmp_path / "run", progress=False)
    model, tok, _, _ = load_checkpoint(tmp_path / "run" / "last")
    again, _, _, _ = load_checkpoint(tmp_path / "run" / "last")
    idx = torch.tensor([tok.encode("the cat sat")])
    assert torch.equal(model(idx)[0], again(idx)[0])
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, small_corpus):
    cfg = dict(max_steps=30, eval_interval=10, lr_decay_steps=30)  # the same schedule for both runs
    train(tiny_config(small_corpus, **cfg), tmp_path / "full", progress=False)
    # the same run, stopped after 10 steps, then resumed to 30
    half = tiny_config(small_corpus, **cfg)
    half.train.max_steps = 10
    train(half, tmp_path / "split", progress=False)
    train(tiny_config(small_corpus, **cfg), tmp_path / "split", resume=True, progress=False)
    full, _, _, _ = load_checkpoint(tmp_path / "full" / "last")
    split, _, _, _ = load_checkpoint(tmp_path / "split" / "last")
    for (name, a), (_, b) in zip(full.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    opt_full, state_full = load_training_state(tmp_path / "full" / "last")
    opt_split, state_split = load_training_state(tmp_path / "split" / "last")
    assert torch.equal(state_full["rng_batches"], state_split["rng_batches"])
    assert torch.equal(opt_full["state"][0]["exp_avg_sq"], opt_split["state"][0]["exp_avg_sq"])


def test_resume_with_dropout_is_bit_identical(tmp_path, small_corpus):
    def cfg(steps):
        c = tiny_config(small_corpus, max_steps=steps, eval_interval=8, lr_decay_steps=24)
        c.model.dropout = 0.2
        return c

    train(cfg(24), tmp_path / "full", progress=False)
    train(cfg(8), tmp_path / "split", progress=False)
    train(cfg(24), tmp_path / "split", resume=True, progress=False)
    full, _, _, _ = load_checkpoint(tmp_path / "full" / "last")
    split, _, _, _ = load_checkpoint(tmp_path / "split" / "last")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), split.state_dict().values(), strict=True))


def test_nan_loss_stops_training_without_touching_best(tmp_path, small_corpus):
    # Step 0's update with a rate of 1e30 leaves finite but huge weights: step 1's loss is NaN.
    config = tiny_config(small_corpus, learning_rate=1e30, min_lr=0.0, warmup_steps=1, max_steps=40, eval_interval=1)
    with pytest.raises(TrainingDiverged, match="at step 1;.*lower --lr"):
        train(config, tmp_path / "run", progress=False)
    last, _, _, meta = load_checkpoint(tmp_path / "run" / "last")
    assert meta["step"] == 1 and all(torch.isfinite(t).all() for t in last.state_dict().values())
    assert not (tmp_path / "run" / "best").exists()  # the step-1 estimate was NaN: never "best"


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_steps=10, max_steps=110, lr_schedule="wsd", decay_fraction=0.4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(70, cfg) == pytest.approx(1e-3)  # 60% of the post-warmup span: still stable
    assert lr_at(90, cfg) == pytest.approx(0.5e-3)  # halfway through the decay
    assert lr_at(110, cfg) == 0.0


def test_schedule_follows_progress_when_given():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=5, max_steps=10)
    assert lr_at(3, cfg, progress=0.9) == pytest.approx(4 * 1e-3 / 5)  # warmup is counted in steps
    assert lr_at(500, cfg, progress=0.5) == pytest.approx(5.5e-4)
    assert lr_at(500, cfg, progress=1.0) == pytest.approx(1e-4)
    assert lr_at(500, cfg, progress=1.7) == pytest.approx(1e-4)


class FakeClock:
    """A stand-in for time.perf_counter that advances a fixed amount per reading: a
    time-budgeted run then behaves the same on a busy or an idle machine."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name):
        import time

        return getattr(time, name)


def test_time_budget_ends_the_run_annealed_and_within_budget(tmp_path, small_corpus, monkeypatch):
    """No step limit: the clock ends the run, and the schedule has reached its end by then."""
    clock = FakeClock(tick=0.05)
    monkeypatch.setattr(train_module, "time", clock)
    cfg = tiny_config(small_corpus, max_steps=0, time_budget=20.0, eval_interval=100000, lr_schedule="wsd",
                      min_lr=0.0, warmup_steps=2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps >= 20 and not math.isnan(result.full_val_loss)
    assert result.elapsed_seconds <= 20.0  # start-up, training and the final evaluation fit the budget
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in rows if r["kind"] == "train"]
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == result.steps
    assert rates[-1] < 0.1 * cfg.train.learning_rate  # annealed towards min_lr = 0 at the end
    assert rates[0] == pytest.approx(cfg.train.learning_rate)  # stable phase at the full rate


def test_time_budget_too_short_is_refused(tmp_path, small_corpus):
    from scratchgpt.errors import ScratchGPTError

    with pytest.raises(ScratchGPTError, match="too short"):
        train(tiny_config(small_corpus, max_steps=0, time_budget=0.01), tmp_path / "run", progress=False)


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, small_corpus, monkeypatch):
    """torch.compile fails lazily, at the first batch; the run warns, trains eager and matches an eager run."""

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("simulated: the C++ compiler crashed\nsecond line")

    monkeypatch.setattr(device_module, "cpp_compiler_missing", lambda device: None)
    monkeypatch.setattr(train_module.torch, "compile", lambda model: Broken())
    messages = []
    compiled = train(tiny_config(small_corpus, max_steps=6, compile=True), tmp_path / "c", progress=False, log=messages.append)
    eager = train(tiny_config(small_corpus, max_steps=6), tmp_path / "e", progress=False)
    warnings = [m for m in messages if "torch.compile failed" in m]
    assert len(warnings) == 1 and "simulated: the C++ compiler crashed" in warnings[0] and "second line" not in warnings[0]
    assert compiled.full_val_loss == eager.full_val_loss


class FailsInBackward(torch.autograd.Function):
    """The identity, whose backward pass raises: a compiled backward graph that cannot be built."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated: the backward graph did not compile\nsecond line")


def test_a_failing_compiled_backward_falls_back_to_eager(tmp_path, small_corpus, monkeypatch):
    """torch.compile builds the backward graph in the first backward pass; if that fails, the
    run warns once, redoes the batch eagerly and ends where an eager run ends."""

    class ForwardOnly(torch.nn.Module):  # stands in for a compiled model whose backward cannot compile
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            logits, loss = self.model(x, y)
            return logits, FailsInBackward.apply(loss)

    monkeypatch.setattr(device_module, "cpp_compiler_missing", lambda device: None)
    monkeypatch.setattr(train_module.torch, "compile", ForwardOnly)
    messages = []
    compiled = train(tiny_config(small_corpus, max_steps=6, compile=True, grad_accum_steps=2), tmp_path / "c",
                     progress=False, log=messages.append)
    eager = train(tiny_config(small_corpus, max_steps=6, grad_accum_steps=2), tmp_path / "e", progress=False)
    warnings = [m for m in messages if "torch.compile failed" in m]
    assert len(warnings) == 1 and "backward graph did not compile" in warnings[0] and "second line" not in warnings[0]
    assert compiled.full_val_loss == eager.full_val_loss


def test_backward_errors_after_a_good_first_backward_are_raised():
    wrapper = device_module.CompiledOrEager(torch.nn.Linear(2, 2), warn=print)

    def loss(fails: bool) -> torch.Tensor:
        out = wrapper.model(torch.ones(2)).sum()
        return FailsInBackward.apply(out) if fails else out

    assert wrapper.backward(loss(fails=False))  # a good first backward pass
    with pytest.raises(RuntimeError, match="did not compile"):
        wrapper.backward(loss(fails=True))
    assert wrapper.compiled is not None  # still compiled: the error was not a compile failure
    wrapper = device_module.CompiledOrEager(torch.nn.Linear(2, 2), warn=print)
    wrapper.compiled = None  # already eager: nothing to fall back to
    with pytest.raises(RuntimeError, match="did not compile"):
        wrapper.backward(loss(fails=True))


def test_compile_errors_after_a_good_first_call_are_raised():
    class Flaky(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise ValueError("a real error in step 2")
            return x

    wrapper = device_module.CompiledOrEager(torch.nn.Linear(2, 2), warn=print)
    wrapper.compiled = Flaky()
    assert wrapper(torch.ones(1)) is not None
    with pytest.raises(ValueError, match="step 2"):
        wrapper(torch.ones(1))


def test_missing_cpp_compiler_is_detected_and_skips_compile(monkeypatch):
    import torch._inductor.config as inductor_config

    cpu = torch.device("cpu")
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    reason = device_module.cpp_compiler_missing(cpu)
    assert reason is not None and "C++ compiler" in reason
    messages = []
    model = torch.nn.Linear(2, 2)
    assert device_module.compile_model(model, cpu, messages.append) is model
    assert len(messages) == 1 and "training without it" in messages[0]
    assert device_module.cpp_compiler_missing(torch.device("meta")) is None  # only CPU builds C++ kernels


@pytest.mark.slow  # about 45 s on 2 cores (a cold compile): run with -m slow
def test_compiled_training_matches_eager(tmp_path, small_corpus):
    """A real torch.compile run (20 to 60 s of compiling on 2 cores) ends where the eager run does."""
    compiled = train(tiny_config(small_corpus, max_steps=10, compile=True), tmp_path / "c", progress=False)
    eager = train(tiny_config(small_corpus, max_steps=10), tmp_path / "e", progress=False)
    assert compiled.full_val_loss == pytest.approx(eager.full_val_loss, abs=1e-3)


def test_a_metrics_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path):
    from scratchgpt.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.9}\n{"step": 30, "lo', encoding="utf-8")
    _truncate_metrics(path, 20)
    assert path.read_text(encoding="utf-8") == '{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.9}\n'


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import os

    from scratchgpt import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    files.atomic_write_bytes(tmp_path / "a.bin", b"payload")
    assert (tmp_path / "a.bin").read_bytes() == b"payload" and len(synced) == 2  # the file, then its directory


def test_tensorboard_events_read_back_as_the_metrics_rows(tmp_path, small_corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(small_corpus, max_steps=30, eval_interval=10, lr_decay_steps=30, sample_tokens=8, tensorboard=True)
    train(config, tmp_path / "run", progress=False, log=lambda line: None)
    config.train.max_steps = 40  # resumed: the events past step 30 would be dropped, and the new ones follow
    train(config, tmp_path / "run", resume=True, progress=False, log=lambda line: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for kind, name in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "val_loss"), ("eval", "train_loss")):
        expected = [(r["step"], r[name]) for r in rows if r["kind"] == kind]
        got = [(e.step, e.value) for e in events.Scalars(f"{kind}/{name}")]
        assert [s for s, _ in got] == [s for s, _ in expected], name
        assert all(math.isclose(g, e, rel_tol=1e-6) for (_, g), (_, e) in zip(got, expected, strict=True)), name
    assert [e.step for e in events.Tensors("sample/text_summary")] == [10, 20, 30, 40]


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, small_corpus, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ScratchGPTError, match=r"pip install 'scratchgpt\[tensorboard\]'"):
        train(tiny_config(small_corpus, max_steps=2, tensorboard=True), tmp_path / "run", progress=False, log=lambda line: None)


def test_muon_momentum_warms_up_linearly_on_muons_groups_only():
    from scratchgpt.optim import muon_momentum_at, set_muon_momentum

    cfg = TrainConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=100)
    assert [round(muon_momentum_at(s, cfg), 4) for s in (0, 50, 100, 500)] == [0.85, 0.9, 0.95, 0.95]
    assert muon_momentum_at(0, TrainConfig(optimizer="muon")) == 0.95  # no warm-up: constant
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    set_muon_momentum(opt, 0.87)
    muon = [g for g in opt.param_groups if "ns_steps" in g]
    assert muon and all(g["momentum"] == 0.87 for g in muon)
    assert all("momentum" not in g for g in opt.param_groups if "ns_steps" not in g)  # AdamW's groups untouched
