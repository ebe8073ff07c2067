"""Training as a function: `train(config, out_dir) -> TrainResult`.

One step: fetch `grad_accum_steps` batches, run forward and backward under autocast, clip the
global gradient norm, set the learning rate for this step, take an AdamW step. Every
`eval_interval` steps: estimate train and val loss, print a sample, append to metrics.jsonl
and samples.txt, save `last/` (and `best/` when the val loss improved). At the end: the full
validation loss, a final save, and loss.png (drawn by plot.py).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .batches import BatchSampler
from .build import build_model
from .chat.data import ChatData, chat_data_from_config
from .chat.template import chat_tokenizer, end_id
from .checkpoint import (
    load_checkpoint,
    load_training_state,
    read_config,
    recover_interrupted_save,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import FREE_MODEL_FIELDS, Config, ModelConfig, TrainConfig
from .data import Dataset, dataset_from_config
from .device import (
    CompiledOrEager,
    SlowdownWatch,
    compile_model,
    governed,
    resolve_device,
    tick,
    verify_device,
)
from .distributed import DistributedContext, all_sum, gather, setup, teardown
from .errors import CheckpointError, ScratchGPTError
from .evaluate import EvalResult, EvaluationStopped, progress_bar
from .files import atomic_write_bytes, sha256_of
from .lora import add_lora, count_trainable, grow_vocab
from .model import count_parameters
from .optim import (
    configure_optimizer,
    load_optimizer_state,
    muon_momentum_at,
    set_learning_rate,
    set_muon_momentum,
)
from .plot import plot_run
from .runlog import TensorBoardLog
from .sample import generate
from .speed.dtype import autocast_for
from .tokenizer import Tokenizer


class TrainingDiverged(ScratchGPTError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Pure helpers: schedule, hardware choices, optimizer


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate for 0-based `step`: linear warmup to learning_rate, then decay to min_lr.

    Warmup reaches the full rate at step `warmup_steps - 1`. After it, `progress` in [0, 1] says
    how far the decay has come: by default (step - warmup) / (decay_steps - warmup); a
    time-budgeted run passes the fraction of its time spent instead. "cosine" follows half a
    cosine from learning_rate to min_lr; "wsd" (warmup-stable-decay) holds learning_rate, then
    falls linearly to min_lr over the last `decay_fraction` of the run.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if progress is None:
        span = cfg.decay_steps - cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / span if span > 0 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "wsd":
        stable = 1.0 - cfg.decay_fraction
        coeff = 1.0 if progress <= stable else (1.0 - progress) / cfg.decay_fraction  # 1 -> 0
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ---------------------------------------------------------------------------------------------
# One training step, in two halves so that the loop can check the loss between them


def accumulate_gradients(step_model: torch.nn.Module, sampler: BatchSampler, scaler: torch.amp.GradScaler,
                         accum_steps: int, amp: torch.dtype | None, device: torch.device, ddp: bool = False) -> float:
    """Forward and backward over `accum_steps` micro-batches; returns the step's mean loss."""
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        x, y = sampler.next_batch()
        # Under DDP, gradients are averaged across processes only on the last micro-batch.
        sync = step_model.no_sync() if ddp and micro_step < accum_steps - 1 else nullcontext()
        with sync:
            loss = _forward_backward(step_model, x, y, scaler, accum_steps, amp, device)
        loss_sum += loss.detach()
    return loss_sum.item()  # one device sync per step, not one per micro-batch


def _forward_backward(step_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scaler: torch.amp.GradScaler,
                      accum_steps: int, amp: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """One micro-batch: forward, backward; returns its loss divided by the number of micro-batches."""
    with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
        _, loss = step_model(x, y)
    # Each micro-batch's loss is a mean over its tokens; dividing by the number of
    # micro-batches makes the summed gradients equal those of one big batch's mean.
    loss = loss / accum_steps
    if not isinstance(step_model, CompiledOrEager):
        scaler.scale(loss).backward()
    elif not step_model.backward(scaler.scale(loss)):
        # torch.compile builds the backward graph during the first backward pass; that failed,
        # so the run goes on eager from this same batch.
        return _forward_backward(step_model, x, y, scaler, accum_steps, amp, device)
    return loss


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    grad_clip: float) -> torch.Tensor | None:
    """Clip the global gradient norm, take the optimizer step, clear the gradients; the norm before clipping
    (a tensor, read only when logged), or None without clipping."""
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ---------------------------------------------------------------------------------------------
# Evaluation during training


def eval_batches(step: int, cfg: TrainConfig) -> int:
    """Batches per split for the loss estimate at `step`: `eval_iters`, but no more than cost about
    what the training since the last evaluation did (a forward pass is about a third of a step,
    and there are two splits), so a short run of a big preset is not buried in its evaluations."""
    steps_since_last = min(step, cfg.eval_interval) * cfg.grad_accum_steps
    return max(1, min(cfg.eval_iters, math.ceil(1.5 * steps_since_last)))


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data: Dataset, cfg: Config, device: torch.device, amp: torch.dtype | None,
                  step: int | None = None, should_stop: Callable[[], bool] | None = None,
                  progress: bool = False) -> dict[str, float]:
    """Mean loss over `eval_batches` batches per split, drawn from the same windows at every evaluation.

    Raises EvaluationStopped between two batches once `should_stop()` is true.
    """
    n_batches = cfg.train.eval_iters if step is None else eval_batches(step, cfg.train)
    losses = {}
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    try:
        with progress_bar(2 * n_batches, "loss estimate", progress) as bar:
            for split in ("train", "val"):
                sampler = data.sampler(split, cfg.model.block_size, cfg.train.batch_size, seed=1234, device=device)
                total = 0.0
                for _ in range(n_batches):
                    if should_stop and should_stop():
                        raise EvaluationStopped
                    tick()
                    x, y = sampler.next_batch()
                    with ctx:
                        _, loss = model(x, y)
                    total += loss.item()
                    bar.update(1)
                losses[split] = total / n_batches
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def _final_eval_seconds(model: torch.nn.Module, data: Dataset, cfg: Config, device: torch.device, amp: torch.dtype | None) -> float:
    """Measured cost of what a run does after its last step: the loss estimate, the full
    validation pass and the saves, with a margin."""
    block = cfg.model.block_size
    was_training = model.training
    model.eval()
    x = torch.zeros(32, block, dtype=torch.long, device=device)
    model(x)  # warm-up
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        model(x)
        timings.append(time.perf_counter() - start)
    per_batch = min(timings)
    model.train(was_training)
    full_batches = math.ceil((data.val_tokens - 1) / block / 32)
    estimate_batches = 2 * cfg.train.eval_iters * cfg.train.batch_size / 32
    return 1.15 * per_batch * (full_batches + estimate_batches) + 1.0  # + saving and plotting


def sample_text(model: torch.nn.Module, data: Dataset | ChatData, n_tokens: int, device: torch.device, seed: int = 0) -> str:
    """A short sample at temperature 1, to read how training is going: from a newline, or a reply to a conversation."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    start_ids = data.sample_prompt()
    idx = torch.tensor([start_ids], dtype=torch.long, device=device)
    ids = [int(t[0]) for t in generate(model, idx, n_tokens, temperature=1.0, generator=generator)]
    model.train(was_training)
    if isinstance(data, ChatData):  # the conversation and the reply, up to its end-of-turn token
        end = end_id(data.tokenizer)
        return data.tokenizer.decode(start_ids + (ids[: ids.index(end) + 1] if end in ids else ids))
    return data.tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------
# Interruption: finish the step, save, return


@contextmanager
def _stop_on_signals():
    """A flag set by SIGINT/SIGTERM, so the loop can save before exiting. No-op off the main thread."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    train_loss: float  # estimate at the last evaluation
    val_loss: float  # estimate at the last evaluation
    best_val_loss: float
    full_val_loss: float  # whole validation split, as `scratchgpt eval` computes it
    full_val_bpc: float
    n_parameters: int
    tokens_per_second: float
    elapsed_seconds: float
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _capture_rng(sampler: BatchSampler, dist_ctx: DistributedContext) -> dict[str, Any]:
    """Every random state the run depends on; under DDP each process's torch state is kept."""
    torch_states = gather(torch.get_rng_state(), dist_ctx)
    state: dict[str, Any] = {"rng_torch": torch_states[0], "rng_batches": sampler.state(), "world_size": dist_ctx.world_size}
    for rank, rank_state in enumerate(torch_states[1:], start=1):
        state[f"rng_torch_rank{rank}"] = rank_state
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng_cuda_{i}"] = s
    np_state = np.random.get_state()
    state["rng_numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    py_state = random.getstate()
    state["rng_python"] = [py_state[0], list(py_state[1]), py_state[2]]
    return state


def _restore_rng(state: dict[str, Any], sampler: BatchSampler, dist_ctx: DistributedContext) -> None:
    torch.set_rng_state(state.get(f"rng_torch_rank{dist_ctx.rank}", state["rng_torch"]) if dist_ctx.rank else state["rng_torch"])
    sampler.set_state(state["rng_batches"])
    if torch.cuda.is_available():
        cuda_states = [state[k] for k in sorted(k for k in state if k.startswith("rng_cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, pos, has_gauss, cached = state["rng_numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from, and a last row a crash cut short."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = [line for line in rows if (row := _parsed(line)) is not None and row.get("step", 0) <= step]
    if len(kept) != len(rows):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))


def _parsed(line: str) -> dict | None:
    """A metrics row, or None for a line that is not one (torn by a crash mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _prune_periodic(out: Path, keep: int) -> None:
    if keep:
        for old in sorted(out.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Where a run starts: fresh, resumed from out/last, or fine-tuned from --init-from


@dataclass
class Start:
    """What a run begins from. A fresh run has no weights; a resumed one has its step, optimizer and random states."""

    config: Config  # the run's own copy; under --init-from its model shape is the checkpoint's
    tokenizer: Tokenizer | None = None  # None: built from the corpus
    model: nn.Module | None = None  # None: a fresh one; a resumed LoRA run's model has its LoRA layers
    lora_base: dict[str, Any] | None = None  # a LoRA run's base checkpoint: its path and SHA-256
    optimizer_state: dict[str, Any] | None = None
    train_state: dict[str, Any] | None = None  # step, best val loss, tokens seen, time, random states

    @property
    def step(self) -> int:
        return int(self.train_state["step"]) if self.train_state else 0


def resume_config(run: Path, overrides: dict[str, dict[str, Any]]) -> Config:
    """The config saved in `run`/last, with `overrides` applied: what `--resume RUN` trains."""
    last = run / "last"
    recover_interrupted_save(last)
    if not (last / "meta.json").is_file():
        raise CheckpointError(f"cannot resume: {last} does not exist (is {run} a run directory from `scratchgpt train --out`?); "
                              "start a new run without --resume")
    base = read_config(last).to_dict()
    for section, values in overrides.items():
        base[section].update(values)
    return Config.from_dict(base)


def plan_start(config: Config, out: Path, resume: bool) -> Start:
    """Decide, once, where the run starts; the caller's config is copied, never changed."""
    config = copy.deepcopy(config)
    if resume:
        resume_config(out, {})  # the checks and the recovery of an interrupted save
        model, tokenizer, saved, meta = load_checkpoint(out / "last", merge_lora=False)
        optimizer_state, train_state = load_training_state(out / "last")
        if tokenizer.kind != config.data.tokenizer:
            raise CheckpointError(f"cannot resume {out / 'last'} with --tokenizer {config.data.tokenizer}: "
                                  f"the run was trained with the {tokenizer.kind} tokenizer")
        config.model.vocab_size = tokenizer.vocab_size
        differ = [f"{k} ({getattr(saved.model, k)!r} in the checkpoint, {getattr(config.model, k)!r} now)"
                  for k in asdict(saved.model) if k not in FREE_MODEL_FIELDS and getattr(saved.model, k) != getattr(config.model, k)]
        if differ:
            raise CheckpointError(f"cannot resume from {out / 'last'}: the model config does not match: {'; '.join(differ)}")
        return Start(config, tokenizer, model, meta.get("lora"), optimizer_state, train_state)
    if config.train.init_from:
        model, tokenizer, initial, _ = load_checkpoint(config.train.init_from)
        # The weights fix the network's shape; only the free fields come from this config.
        config.model = ModelConfig(**{**asdict(initial.model), **{k: getattr(config.model, k) for k in FREE_MODEL_FIELDS}})
        if config.data.chat:
            tokenizer = chat_tokenizer(tokenizer)
        base = resolve_checkpoint(config.train.init_from)
        lora_base = {"base": str(base.resolve()), "base_sha256": sha256_of(base / "model.safetensors")}
        return Start(config, tokenizer, model, lora_base if config.train.lora_rank else None)
    return Start(config)


# ---------------------------------------------------------------------------------------------
# The run: everything one training process holds, and the pieces of its loop


@dataclass
class Clock:
    """The run's wall clock, across resumes, and its time budget (0: none)."""

    t0: float  # time.perf_counter() when this process's part of the run started
    before: float = 0.0  # seconds the run had already spent before a resume
    budget: float = 0.0
    training_seconds: float = 0.0  # the budget minus what the final evaluation will need
    step_seconds: float = 0.0  # recent duration of one step, so a budgeted run stops before overrunning

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def progress(self) -> float | None:
        """The fraction of the training time spent, which drives the schedule of a budgeted run."""
        return self.elapsed() / self.training_seconds if self.budget else None

    def time_is_up(self) -> bool:
        return bool(self.budget and self.elapsed() + self.step_seconds >= self.training_seconds)

    def record_step(self, seconds: float) -> None:
        self.step_seconds = seconds if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * seconds


@dataclass
class Run:
    """One process's training run: its data, model, optimizer and bookkeeping."""

    config: Config
    out: Path
    dist_ctx: DistributedContext
    device: torch.device
    amp: torch.dtype | None
    data: Dataset
    model: nn.Module
    step_model: nn.Module  # the model to step: compiled and/or wrapped by DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    clock: Clock
    say: Callable[[str], None]
    progress: bool
    step: int = 0
    best_val: float = float("inf")
    tokens_seen: int = 0
    last_losses: dict[str, float] = field(default_factory=lambda: {"train": float("nan"), "val": float("nan")})
    lora_base: dict[str, Any] | None = None  # a LoRA run saves its adapter only, naming this base
    tensorboard: TensorBoardLog | None = None  # --tensorboard: the rows as events too
    grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping
    dtype_reason: str = ""  # why --dtype auto chose what it chose (speed/dtype.py)

    @property
    def main(self) -> bool:
        return self.dist_ctx.is_main

    @property
    def tokens_per_step(self) -> int:
        t = self.config.train
        return t.batch_size * self.config.model.block_size * t.grad_accum_steps * self.dist_ctx.world_size

    def save(self, name: str, meta: dict[str, Any], with_state: bool = True) -> None:
        """Write checkpoint `name` at the current step; with its optimizer and random states unless told not to."""
        state = self._train_state() if with_state else None  # a collective under DDP: every rank takes part
        if self.main:
            lora = {"lora": self.lora_base} if self.lora_base else {}
            save_checkpoint(self.out / name, self.model, self.data.tokenizer, self.config, {"step": self.step, **meta, **lora},
                            self.optimizer if with_state else None, state)

    def _train_state(self) -> dict[str, Any]:
        state = _capture_rng(self.sampler, self.dist_ctx)
        state.update(step=self.step, best_val_loss=self.best_val, tokens_seen=self.tokens_seen, elapsed_seconds=self.clock.elapsed())
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def log_metrics(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.row(row)


def _set_up(start: Start, out: Path, dist_ctx: DistributedContext, device: torch.device, progress: bool,
            say: Callable[[str], None], t0: float) -> Run:
    """Seed, read the data, build the model and optimizer, and restore a resumed run's states."""
    config, tcfg = start.config, start.config.train
    torch.manual_seed(tcfg.seed + dist_ctx.rank)  # dropout masks differ between replicas
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    if config.data.chat:
        data = chat_data_from_config(config.data, start.tokenizer, config.model.block_size, log=say)
    else:
        data = dataset_from_config(config.data, tokenizer=start.tokenizer, block_size=config.model.block_size,
                                   progress=progress and dist_ctx.is_main, log=say)
    model = _model_to_train(start, data.tokenizer.vocab_size, config)
    if device.type != "cpu" and not tcfg.trust_device:  # an accelerator proves itself before it trains
        x, y = data.sampler("train", config.model.block_size, min(tcfg.batch_size, 4), seed=0, device=torch.device("cpu")).next_batch()
        verify_device(model, x, y, device)
    model = model.to(device)
    amp, dtype_reason = autocast_for(tcfg.dtype, device, model, lambda: data.sampler(
        "train", config.model.block_size, tcfg.batch_size, seed=0, device=device).next_batch())
    optimizer = configure_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    sampler = data.sampler("train", config.model.block_size, tcfg.batch_size, seed=tcfg.seed, device=device,
                           rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    clock = Clock(t0, budget=tcfg.time_budget)
    run = Run(config, out, dist_ctx, device, amp, data, model, model, optimizer, scaler, sampler, clock, say, progress,
              lora_base=start.lora_base, dtype_reason=dtype_reason)
    if start.train_state:
        _restore(run, start)
    run.step_model = compile_model(model, device, say) if tcfg.compile else model
    if dist_ctx.enabled:
        run.step_model = DistributedDataParallel(run.step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        if start.train_state:
            _truncate_metrics(out / "metrics.jsonl", run.step)
        if tcfg.tensorboard:
            run.tensorboard = TensorBoardLog(out, purge_after=run.step if start.train_state else None)
    return run


def _model_to_train(start: Start, vocab_size: int, config: Config) -> nn.Module:
    """A fresh model; or the --init-from one, with LoRA layers (--lora-rank) or grown to new tokens; or a resumed one."""
    tcfg = config.train
    if start.model is None:
        config.model.vocab_size = vocab_size
        return build_model(config.model)
    model = start.model
    if start.train_state is None and tcfg.lora_rank:
        add_lora(model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_target_names, vocab_size=vocab_size)
    elif start.train_state is None:
        grow_vocab(model, vocab_size)  # the chat template's tokens get rows (lora.new_rows_like says how they start)
    config.model.vocab_size = vocab_size
    return model


def _restore(run: Run, start: Start) -> None:
    """Continue a resumed run where it stopped: optimizer, random states, counters and clock."""
    state = start.train_state
    load_optimizer_state(run.optimizer, start.optimizer_state)
    _restore_rng(state, run.sampler, run.dist_ctx)
    if "grad_scaler" in state and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["grad_scaler"])
    run.step, run.best_val, run.tokens_seen = start.step, float(state["best_val_loss"]), int(state["tokens_seen"])
    run.clock.before = float(state["elapsed_seconds"])
    if int(state.get("world_size", 1)) != run.dist_ctx.world_size:
        run.say(f"note: {run.out / 'last'} was saved by {state.get('world_size', 1)} process(es), resuming with "
                f"{run.dist_ctx.world_size}: the run continues, but not bit for bit")


def _announce(run: Run, resumed: bool) -> None:
    """The one line that says what is being trained, where, and how."""
    threads = torch.get_num_threads()
    run.say(
        f"scratchgpt: {run.config.model.model_type} with {count_parameters(run.model):,} parameters"
        + (f" ({count_trainable(run.model):,} trainable: LoRA rank {run.config.train.lora_rank})" if run.lora_base else "")
        + f", vocab {run.data.tokenizer.vocab_size}, {run.data.train_tokens:,} train / {run.data.val_tokens:,} val tokens, "
        f"device {run.device.type}"
        + (f" x {run.dist_ctx.world_size} processes" if run.dist_ctx.enabled else "")
        + (f", {threads} CPU thread{'s' if threads > 1 else ''}" if run.device.type == "cpu" else "")
        + f", autocast {str(run.amp).replace('torch.', '') if run.amp else 'off'}"
        + (f" (--dtype auto chose {run.dtype_reason})" if run.dtype_reason else "")
        + f", {run.tokens_per_step:,} tokens/step"
        + (f", resuming at step {run.step}" if resumed else "")
    )


def _set_budget(run: Run) -> None:
    """A time budget covers start-up, training and the final evaluation: training gets what is left
    once the final evaluation's measured cost is set aside, and the schedule follows time."""
    clock = run.clock
    if not clock.budget:
        return
    clock.training_seconds = clock.budget - _final_eval_seconds(run.model, run.data, run.config, run.device, run.amp)
    final = clock.budget - clock.training_seconds
    if clock.training_seconds - clock.elapsed() <= 0:
        raise ScratchGPTError(f"--time-budget {clock.budget:g} s is too short: start-up took {clock.elapsed():.1f} s and the "
                              f"final evaluation needs about {final:.1f} s; give it more time")
    run.say(f"time budget {clock.budget:.0f} s: {clock.training_seconds - clock.elapsed():.1f} s left for training after "
            f"start-up and {final:.1f} s set aside for the final evaluation")


def _take_step(run: Run, stop_flag: bool) -> tuple[float, float, bool]:
    """One optimizer step at the scheduled learning rate: (mean loss over processes, lr, whether any process must stop)."""
    tcfg = run.config.train
    lr = lr_at(run.step, tcfg, run.clock.progress())
    set_learning_rate(run.optimizer, lr)
    if tcfg.muon_momentum_warmup:
        set_muon_momentum(run.optimizer, muon_momentum_at(run.step, tcfg))
    loss = accumulate_gradients(run.step_model, run.sampler, run.scaler, tcfg.grad_accum_steps, run.amp, run.device,
                                ddp=run.dist_ctx.enabled)
    # One small collective per step: the mean loss over processes, and whether any was told to stop.
    total_loss, stop_votes = all_sum([loss, float(stop_flag)], run.dist_ctx, run.device)
    loss = total_loss / run.dist_ctx.world_size
    if not math.isfinite(loss):
        last = run.out / "last"
        raise TrainingDiverged(f"the training loss became {loss} at step {run.step}; lower --lr or raise --warmup-steps. "
                               f"The last good checkpoint is {last}" + ("" if last.exists() else " (none saved yet)"))
    run.grad_norm = apply_gradients(run.model, run.optimizer, run.scaler, tcfg.grad_clip)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    return loss, lr, stop_votes > 0


def _evaluate_and_save(run: Run, lr: float, finished: bool, should_stop: Callable[[], bool]) -> None:
    """Estimate train and val loss, log them with a sample, save best/ if val improved and last/ unless finishing.

    Every process evaluates the same fixed windows, so all agree on whether val improved.
    """
    run.last_losses = estimate_loss(run.model, run.data, run.config, run.device, run.amp, run.step,
                                    should_stop=should_stop, progress=run.progress and run.main)
    val = run.last_losses["val"]
    improved = val < run.best_val
    run.best_val = min(run.best_val, val)
    bpc, bpb = run.data.bits_per_char(val), run.data.bits_per_byte(val)  # right for tokens of many characters too
    run.say(f"step {run.step}: train loss {run.last_losses['train']:.4f}, val loss {val:.4f}, "
            f"val perplexity {math.exp(val):.2f}, val bpc {bpc:.3f}" + (" (best)" if improved else ""))
    run.log_metrics({"kind": "eval", "step": run.step, "train_loss": run.last_losses["train"], "val_loss": val,
                     "val_perplexity": math.exp(val), "val_bpc": bpc, "val_bpb": bpb, "lr": lr,
                     "elapsed_seconds": run.clock.elapsed()})
    sample_tokens = run.config.train.sample_tokens
    if sample_tokens and run.main:
        text = sample_text(run.model, run.data, sample_tokens, run.device)
        run.say(f"--- sample at step {run.step} ---\n{text}\n---")
        if run.tensorboard is not None:
            run.tensorboard.sample(run.step, text)
        with open(run.out / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {run.step} ===\n{text}\n\n")
    meta = {"train_loss": run.last_losses["train"], "val_loss": val}
    if improved:
        run.save("best", meta, with_state=False)
    if not finished:
        run.save("last", meta)


def _train_loop(run: Run, stop: dict[str, bool]) -> bool:
    """Step until the step limit or the time budget; True if a signal interrupted the run."""
    tcfg, clock, start_step = run.config.train, run.clock, run.step
    recent_loss, window_start, window_tokens = float("nan"), time.perf_counter(), 0
    slowdown = SlowdownWatch(run.say)
    bar = tqdm(total=tcfg.max_steps or None, initial=run.step, disable=not (run.progress and run.main), unit="step",
               dynamic_ncols=True)
    run.model.train()
    finished = run.step >= tcfg.step_limit
    try:
        while not finished:
            tick()  # the CPU thread count follows the machine's load (device.py)
            step_start = time.perf_counter()
            loss, lr, stop_voted = _take_step(run, stop["stop"])
            window_tokens += run.tokens_per_step
            recent_loss = loss if math.isnan(recent_loss) else 0.9 * recent_loss + 0.1 * loss
            if run.step > start_step + 1:  # the first step of a process is a warm-up, slower than the rest
                clock.record_step(time.perf_counter() - step_start)
            finished = run.step >= tcfg.step_limit or clock.time_is_up()
            if clock.budget and run.dist_ctx.enabled:  # every process must stop at the same step
                finished = all_sum([float(finished)], run.dist_ctx, run.device)[0] > 0
            if run.step % 10 == 0 or finished:
                now = time.perf_counter()
                tokens_per_second = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                norm = {"grad_norm": run.grad_norm.item()} if run.grad_norm is not None else {}
                run.log_metrics({"kind": "train", "step": run.step, "loss": loss, "lr": lr, "tokens_per_second": tokens_per_second,
                                 **norm})
                if run.step > start_step + 10:  # the first window holds the warm-up step
                    slowdown.observe(tokens_per_second)
                bar.set_postfix(loss=f"{recent_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
            bar.update(1)
            if stop_voted:
                return True
            if run.step % tcfg.eval_interval == 0 or finished:
                try:
                    _evaluate_and_save(run, lr, finished, should_stop=lambda: stop["stop"])
                except EvaluationStopped:
                    return True
            if tcfg.save_every and run.step % tcfg.save_every == 0:
                run.save(f"step-{run.step:06d}", {"train_loss": run.last_losses["train"], "val_loss": run.last_losses["val"]})
                if run.main:
                    _prune_periodic(run.out, tcfg.keep_checkpoints)
        return False
    finally:
        bar.close()


def _finish(run: Run, interrupted: bool, stop: dict[str, bool]) -> EvalResult | None:
    """The full validation pass (unless interrupted), the final last/ checkpoint and the loss curve."""
    full = None
    if not interrupted:
        try:
            full = run.data.evaluate(run.model, run.device, batch_size=32, should_stop=lambda: stop["stop"],
                                     progress=run.progress and run.main)
        except EvaluationStopped:
            interrupted = True
    losses = {"train_loss": run.last_losses["train"], "val_loss": run.last_losses["val"]}
    if full is None:
        run.say(f"interrupted: saving {run.out / 'last'} at step {run.step}")
        run.save("last", {**losses, "interrupted": True})
    else:
        run.say(f"full validation: loss {full.val_loss:.4f}, perplexity {full.val_perplexity:.2f}, "
                f"bpc {full.val_bpc:.3f} over {full.val_tokens:,} tokens")
        run.save("last", {**losses, "full_val": full.to_dict()})
    if run.main and (run.out / "metrics.jsonl").is_file():  # an interrupted run gets its curve too
        run.say(f"loss curve: {plot_run(run.out)}")
    return full


def train(
    config: Config,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    started_at: float | None = None,
) -> TrainResult:
    """Train `config` and write the run to `out_dir`; with `resume`, continue from `out_dir/last`.

    Launched by torchrun, each process trains a replica with DistributedDataParallel; only the
    main process (rank 0) prints, writes logs and saves checkpoints. `started_at` (a
    `time.perf_counter()` value, default now) is when the run's wall clock starts, so that a
    time budget can include the program's start-up. `config` itself is left unchanged.
    """
    t0 = time.perf_counter() if started_at is None else started_at
    out = Path(out_dir)
    dist_ctx, device = setup(resolve_device(config.train.device))
    with governed(config.train.threads, log or tqdm.write):
        try:
            return _train(plan_start(config, out, resume), out, dist_ctx, device, progress, log, t0)
        finally:
            teardown(dist_ctx)


def _train(start: Start, out: Path, dist_ctx: DistributedContext, device: torch.device, progress: bool,
           log: Callable[[str], None] | None, t0: float) -> TrainResult:
    say = (log or (lambda msg: tqdm.write(msg))) if dist_ctx.is_main else (lambda msg: None)
    run = _set_up(start, out, dist_ctx, device, progress, say, t0)
    _announce(run, resumed=start.train_state is not None)
    _set_budget(run)
    try:
        with _stop_on_signals() as stop:
            interrupted = _train_loop(run, stop)
            full = _finish(run, interrupted, stop)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
    total_seconds = run.clock.elapsed()
    return TrainResult(
        out_dir=str(out),
        steps=run.step,
        train_loss=run.last_losses["train"],
        val_loss=run.last_losses["val"],
        best_val_loss=run.best_val,
        full_val_loss=full.val_loss if full else float("nan"),
        full_val_bpc=full.val_bpc if full else float("nan"),
        n_parameters=count_parameters(run.model),
        tokens_per_second=run.tokens_seen / max(total_seconds, 1e-9),
        elapsed_seconds=total_seconds,
        interrupted=full is None,
    )
