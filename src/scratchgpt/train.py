"""Training as a function: `train(config, out_dir) -> TrainResult`.

One step: fetch `grad_accum_steps` batches, run forward and backward under autocast, clip the
global gradient norm, set the learning rate for this step, take an AdamW step. Every
`eval_interval` steps: estimate train and val loss, print a sample, append to metrics.jsonl
and samples.txt, save `last/` (and `best/` when the val loss improved). At the end: the full
validation loss, a final save, and loss.png (drawn by plot.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import (
    load_checkpoint,
    load_training_state,
    recover_interrupted_save,
    save_checkpoint,
)
from .config import Config, ModelConfig, TrainConfig
from .data import BatchSampler, Dataset, dataset_from_config
from .device import (
    CompiledOrEager,
    SlowdownWatch,
    autocast_dtype,
    compile_model,
    governed,
    resolve_device,
    tick,
)
from .distributed import DistributedContext, all_sum, gather, setup, teardown
from .errors import CheckpointError, ScratchGPTError, TokenizerError
from .evaluate import EvaluationStopped, evaluate_split, progress_bar
from .model import build_model, count_parameters
from .optim import configure_optimizer, set_learning_rate
from .plot import plot_run
from .sample import generate


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
                    grad_clip: float) -> None:
    """Clip the global gradient norm, take the optimizer step, clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


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
            for split, ids in (("train", data.train_ids), ("val", data.val_ids)):
                sampler = BatchSampler(ids, cfg.model.block_size, cfg.train.batch_size, seed=1234, device=device)
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
    full_batches = math.ceil((len(data.val_ids) - 1) / block / 32)
    estimate_batches = 2 * cfg.train.eval_iters * cfg.train.batch_size / 32
    return 1.15 * per_batch * (full_batches + estimate_batches) + 1.0  # + saving and plotting


def sample_text(model: torch.nn.Module, data: Dataset, n_tokens: int, device: torch.device, seed: int = 0) -> str:
    """A short sample at temperature 1, starting from a newline, to read how training is going."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        start_ids = data.tokenizer.encode("\n")
    except TokenizerError:  # a corpus without newlines: start from the first token instead
        start_ids = [0]
    idx = torch.tensor([start_ids], dtype=torch.long, device=device)
    ids = [int(t[0]) for t in generate(model, idx, n_tokens, temperature=1.0, generator=generator)]
    model.train(was_training)
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


def _check_same_architecture(saved: ModelConfig, wanted: ModelConfig, where: Path) -> None:
    """Resuming may change training settings and dropout, but not the shape of the network."""
    free = {"dropout", "attention"}
    differ = [f"{k} ({getattr(saved, k)!r} in the checkpoint, {getattr(wanted, k)!r} now)"
              for k in asdict(saved) if k not in free and getattr(saved, k) != getattr(wanted, k)]
    if differ:
        raise CheckpointError(f"cannot resume from {where}: the model config does not match: {'; '.join(differ)}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (a crash can leave some)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _prune_periodic(out: Path, keep: int) -> None:
    if keep:
        for old in sorted(out.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
    time budget can include the program's start-up.
    """
    t0 = time.perf_counter() if started_at is None else started_at
    out = Path(out_dir)
    tcfg = config.train
    dist_ctx, device = setup(resolve_device(tcfg.device))
    with governed(tcfg.threads, log or tqdm.write):
        try:
            return _train(config, out, tcfg, dist_ctx, device, resume, progress, log, t0)
        finally:
            teardown(dist_ctx)


def _train(config: Config, out: Path, tcfg: TrainConfig, dist_ctx: DistributedContext, device: torch.device,
           resume: bool, progress: bool, log: Callable[[str], None] | None, t0: float) -> TrainResult:
    main = dist_ctx.is_main
    say = (log or (lambda msg: tqdm.write(msg))) if main else (lambda msg: None)

    # Resume: the tokenizer, weights and every random state come from last/.
    start_step, best_val, tokens_seen, elapsed_before = 0, float("inf"), 0, 0.0
    resumed = None
    if resume:
        last = out / "last"
        recover_interrupted_save(last)
        if not (last / "meta.json").is_file():
            raise CheckpointError(f"cannot resume: {last} does not exist; start a new run without --resume")
        resumed_model, resumed_tokenizer, resumed_config, _ = load_checkpoint(last)
        optimizer_state, train_state = load_training_state(last)
        resumed = (resumed_model, resumed_tokenizer, optimizer_state, train_state)
        start_step = int(train_state["step"])
        best_val = float(train_state["best_val_loss"])
        tokens_seen = int(train_state["tokens_seen"])
        elapsed_before = float(train_state["elapsed_seconds"])
        if int(train_state.get("world_size", 1)) != dist_ctx.world_size:
            say(f"note: {last} was saved by {train_state.get('world_size', 1)} process(es), resuming with "
                f"{dist_ctx.world_size}: the run continues, but not bit for bit")

    initial = None  # fine-tuning: (model, tokenizer) of the checkpoint the run starts from
    if tcfg.init_from and not resume:
        initial_model, initial_tokenizer, initial_config, _ = load_checkpoint(tcfg.init_from)
        initial = (initial_model, initial_tokenizer)
        # The weights fix the network's shape; dropout and the attention kernel stay free.
        config.model = ModelConfig(**{**asdict(initial_config.model), "dropout": config.model.dropout,
                                      "attention": config.model.attention})

    torch.manual_seed(tcfg.seed + dist_ctx.rank)  # dropout masks differ between replicas
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    amp = autocast_dtype(tcfg.dtype, device)

    if resumed and resumed[1].kind != config.data.tokenizer:
        raise CheckpointError(f"cannot resume {out / 'last'} with --tokenizer {config.data.tokenizer}: "
                              f"the run was trained with the {resumed[1].kind} tokenizer")
    fixed_tokenizer = resumed[1] if resumed else initial[1] if initial else None
    data = dataset_from_config(config.data, tokenizer=fixed_tokenizer, block_size=config.model.block_size,
                               progress=progress and main, log=say)
    config.model.vocab_size = data.tokenizer.vocab_size
    if resumed:
        _check_same_architecture(resumed_config.model, config.model, out / "last")
    model = build_model(config.model).to(device)
    if resumed or initial:
        model.load_state_dict((resumed or initial)[0].state_dict())
    optimizer = configure_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    sampler = BatchSampler(data.train_ids, config.model.block_size, tcfg.batch_size, seed=tcfg.seed, device=device,
                           rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    if resumed:
        optimizer.load_state_dict(resumed[2])
        _restore_rng(resumed[3], sampler, dist_ctx)
        if "grad_scaler" in resumed[3] and scaler.is_enabled():
            scaler.load_state_dict(resumed[3]["grad_scaler"])
    step_model = compile_model(model, device, say) if tcfg.compile else model
    if dist_ctx.enabled:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = count_parameters(model)

    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resumed:
            _truncate_metrics(metrics_path, start_step)
    tokens_per_step = tcfg.batch_size * config.model.block_size * tcfg.grad_accum_steps * dist_ctx.world_size
    say(
        f"scratchgpt: {config.model.model_type} with {n_params:,} parameters, vocab {data.tokenizer.vocab_size}, "
        f"{len(data.train_ids):,} train / {len(data.val_ids):,} val tokens, device {device.type}"
        + (f" x {dist_ctx.world_size} processes" if dist_ctx.enabled else "")
        + (f", {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}" if device.type == "cpu" else "")
        + f", autocast {str(amp).replace('torch.', '') if amp else 'off'}, {tokens_per_step:,} tokens/step"
        + (f", resuming at step {start_step}" if resumed else "")
    )

    def train_state(step: int) -> dict[str, Any]:
        state = _capture_rng(sampler, dist_ctx)
        state.update(step=step, best_val_loss=best_val, tokens_seen=tokens_seen, elapsed_seconds=elapsed())
        if scaler.is_enabled():
            state["grad_scaler"] = scaler.state_dict()
        return state

    def save(name: str, step: int, meta: dict[str, Any], with_state: bool = True) -> None:
        state = train_state(step) if with_state else None  # a collective under DDP: every rank takes part
        if main:
            save_checkpoint(out / name, model, data.tokenizer, config, {"step": step, **meta},
                            optimizer if with_state else None, state)

    def append_metrics(row: dict[str, Any]) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    # A time budget covers start-up, training and the final evaluation: training gets what is
    # left once the final evaluation's measured cost is set aside, and the schedule follows time.
    training_seconds = tcfg.time_budget - _final_eval_seconds(model, data, config, device, amp) if tcfg.time_budget else 0.0
    if tcfg.time_budget and training_seconds - elapsed() <= 0:
        raise ScratchGPTError(
            f"--time-budget {tcfg.time_budget:g} s is too short: start-up took {elapsed():.1f} s and the final evaluation "
            f"needs about {tcfg.time_budget - training_seconds:.1f} s; give it more time"
        )
    if tcfg.time_budget:
        say(f"time budget {tcfg.time_budget:.0f} s: {training_seconds - elapsed():.1f} s left for training after start-up "
            f"and {tcfg.time_budget - training_seconds:.1f} s set aside for the final evaluation")
    last_losses = {"train": float("nan"), "val": float("nan")}
    recent_loss, window_start, window_tokens, tokens_per_second = float("nan"), time.perf_counter(), 0, 0.0
    step = start_step
    interrupted = False
    step_seconds = 0.0  # recent duration of one step, so a budgeted run stops before overrunning
    slowdown = SlowdownWatch(say)
    bar = tqdm(total=tcfg.max_steps or None, initial=start_step, disable=not (progress and main), unit="step", dynamic_ncols=True)
    model.train()
    with _stop_on_signals() as stop:
        finished = step >= tcfg.step_limit
        while not finished:
            tick()  # the CPU thread count follows the machine's load (device.py)
            step_start = time.perf_counter()
            lr = lr_at(step, tcfg, elapsed() / training_seconds if tcfg.time_budget else None)
            set_learning_rate(optimizer, lr)
            loss_sum = accumulate_gradients(step_model, sampler, scaler, tcfg.grad_accum_steps, amp, device,
                                            ddp=dist_ctx.enabled)
            # One small collective per step: the mean loss over processes, and whether any was told to stop.
            total_loss, stop_votes = all_sum([loss_sum, float(stop["stop"])], dist_ctx, device)
            loss_sum = total_loss / dist_ctx.world_size
            if not math.isfinite(loss_sum):
                bar.close()
                raise TrainingDiverged(
                    f"the training loss became {loss_sum} at step {step}; lower --lr or raise --warmup-steps. "
                    f"The last good checkpoint is {out / 'last'}" + ("" if (out / "last").exists() else " (none saved yet)")
                )
            apply_gradients(model, optimizer, scaler, tcfg.grad_clip)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            recent_loss = loss_sum if math.isnan(recent_loss) else 0.9 * recent_loss + 0.1 * loss_sum
            if step > start_step + 1:  # the first step of a process is a warm-up, slower than the rest
                duration = time.perf_counter() - step_start
                step_seconds = duration if not step_seconds else 0.9 * step_seconds + 0.1 * duration
            finished = step >= tcfg.step_limit or bool(tcfg.time_budget and elapsed() + step_seconds >= training_seconds)
            if tcfg.time_budget and dist_ctx.enabled:  # every process must stop at the same step
                finished = all_sum([float(finished)], dist_ctx, device)[0] > 0

            if step % 10 == 0 or finished:
                now = time.perf_counter()
                tokens_per_second = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                append_metrics({"kind": "train", "step": step, "loss": loss_sum, "lr": lr, "tokens_per_second": tokens_per_second})
                if step > start_step + 10:  # the first window holds the warm-up step
                    slowdown.observe(tokens_per_second)
                bar.set_postfix(loss=f"{recent_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
            bar.update(1)

            if stop_votes > 0:
                interrupted = True
                break
            if step % tcfg.eval_interval == 0 or finished:
                # Every process evaluates the same fixed windows, so all agree on `improved`.
                try:
                    last_losses = estimate_loss(model, data, config, device, amp, step, should_stop=lambda: stop["stop"],
                                                progress=progress and main)
                except EvaluationStopped:
                    interrupted = True
                    break
                val = last_losses["val"]
                improved = val < best_val
                best_val = min(best_val, val)
                bpc, bpb = data.bits_per_char(val), data.bits_per_byte(val)  # right for tokens of many characters too
                say(f"step {step}: train loss {last_losses['train']:.4f}, val loss {val:.4f}, "
                    f"val perplexity {math.exp(val):.2f}, val bpc {bpc:.3f}" + (" (best)" if improved else ""))
                append_metrics({"kind": "eval", "step": step, "train_loss": last_losses["train"], "val_loss": val,
                                "val_perplexity": math.exp(val), "val_bpc": bpc, "val_bpb": bpb, "lr": lr,
                                "elapsed_seconds": elapsed()})
                if tcfg.sample_tokens and main:
                    text = sample_text(model, data, tcfg.sample_tokens, device)
                    say(f"--- sample at step {step} ---\n{text}\n---")
                    with open(out / "samples.txt", "a", encoding="utf-8") as f:
                        f.write(f"=== step {step} ===\n{text}\n\n")
                meta = {"train_loss": last_losses["train"], "val_loss": val}
                if improved:
                    save("best", step, meta, with_state=False)
                if not finished:
                    save("last", step, meta)
            if tcfg.save_every and step % tcfg.save_every == 0:
                save(f"step-{step:06d}", step, {"train_loss": last_losses["train"], "val_loss": last_losses["val"]})
                if main:
                    _prune_periodic(out, tcfg.keep_checkpoints)
        bar.close()
        full = None
        if not interrupted:
            try:
                full = evaluate_split(model, data.val_ids, data.val_target_chars, batch_size=32, device=device,
                                      n_bytes=data.val_target_bytes, should_stop=lambda: stop["stop"],
                                      progress=progress and main, description="full validation")
            except EvaluationStopped:
                interrupted = True
        if interrupted:
            say(f"interrupted: saving {out / 'last'} at step {step}")
            save("last", step, {"train_loss": last_losses["train"], "val_loss": last_losses["val"], "interrupted": True})
        else:
            say(f"full validation: loss {full.val_loss:.4f}, perplexity {full.val_perplexity:.2f}, "
                f"bpc {full.val_bpc:.3f} over {full.val_tokens:,} tokens")
            save("last", step, {"train_loss": last_losses["train"], "val_loss": last_losses["val"], "full_val": full.to_dict()})
        if main and metrics_path.is_file():  # an interrupted run gets its curve too
            say(f"loss curve: {plot_run(out)}")
    total_seconds = elapsed()
    return TrainResult(
        out_dir=str(out),
        steps=step,
        train_loss=last_losses["train"],
        val_loss=last_losses["val"],
        best_val_loss=best_val,
        full_val_loss=full.val_loss if full else float("nan"),
        full_val_bpc=full.val_bpc if full else float("nan"),
        n_parameters=n_params,
        tokens_per_second=tokens_seen / max(total_seconds, 1e-9),
        elapsed_seconds=total_seconds,
        interrupted=interrupted,
    )
