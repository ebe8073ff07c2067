"""Speed, measured the way it matters: complete steps, against a baseline in the same run.

A step is everything `train` does per optimizer step: batch fetch, forward and backward under
the run's autocast, gradient clipping, the AdamW step. `bench_train` times the config's own
path and the plain path of the same model (float32, eager, PyTorch's fused attention and its
default AdamW: the classic recipe) in alternating blocks of steps, so
that both see the same machine load, and reports medians. Machines here are noisy; a ratio
from one run is worth more than two absolute figures from two runs.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from ..batches import BatchSampler
from ..build import build_model
from ..config import Config
from ..data import dataset_from_config
from ..device import compile_model, governed, resolve_device, threads_now
from ..optim import configure_optimizer
from ..train import accumulate_gradients, apply_gradients
from .dtype import autocast_for


@dataclass
class _Runner:
    """One model with its optimizer and batches, stepped the way `train` steps it."""

    name: str
    config: Config
    device: torch.device
    fused_adamw: bool = True

    def __post_init__(self) -> None:
        torch.manual_seed(self.config.train.seed)
        tcfg = self.config.train
        self.data = dataset_from_config(self.config.data, block_size=self.config.model.block_size)
        self.config.model.vocab_size = self.data.tokenizer.vocab_size
        self.model = build_model(self.config.model).to(self.device)
        self.optimizer = configure_optimizer(self.model, tcfg, self.device, fused=self.fused_adamw)
        self.sampler = BatchSampler(self.data.train_ids, self.config.model.block_size, tcfg.batch_size, tcfg.seed, self.device)
        probe_batch = BatchSampler(self.data.train_ids, self.config.model.block_size, tcfg.batch_size, 0, self.device).next_batch
        self.amp, self.dtype_reason = autocast_for(tcfg.dtype, self.device, self.model, probe_batch)  # as `train` chooses
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step_model = compile_model(self.model, self.device, lambda msg: print(msg, file=sys.stderr)) if tcfg.compile else self.model
        self.times: list[float] = []

    def describe(self) -> dict:
        """The settings that make this path fast or plain."""
        tcfg = self.config.train
        fused = self.optimizer.param_groups[0].get("fused")  # AdamW's groups come first, also beside Muon
        return {"dtype": tcfg.dtype, "compile": tcfg.compile, "attention": self.config.model.attention,
                "adamw": "fused" if fused else "pytorch default"}

    def step(self) -> float:
        start = time.perf_counter()
        accumulate_gradients(self.step_model, self.sampler, self.scaler, self.config.train.grad_accum_steps, self.amp, self.device)
        apply_gradients(self.model, self.optimizer, self.scaler, self.config.train.grad_clip)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def baseline_config(config: Config) -> Config:
    """The same model and batch, trained the plain way: float32, eager, no compiler, and
    PyTorch's fused attention kernel (the written-out attention is one of the CPU presets'
    speed choices, and in float32 it is the slower of the two). The baseline's runner also
    takes PyTorch's default AdamW rather than the fused kernel (`configure_optimizer(...,
    fused=False)`), as the classic recipe does on a CPU."""
    plain = copy.deepcopy(config)
    plain.train.dtype = "float32"
    plain.train.compile = False
    plain.model.attention = "sdpa"
    return plain


def bench_train(config: Config, steps: int = 40, warmup: int = 5, block: int = 5) -> dict:
    """Median tokens/s of `config`'s training step and of its plain baseline (`baseline_config`), interleaved.

    Both run with the same CPU thread count, a setting of the machine rather than of the
    training path: the config's `threads`, or, for 0, what the machine's load allows at the
    start, held fixed so that the two paths compare."""
    with governed(threads_now(config.train.threads)):
        return _bench_train(config, steps, warmup, block)


def _bench_train(config: Config, steps: int, warmup: int, block: int) -> dict:
    device = resolve_device(config.train.device)
    runners = [_Runner("config", copy.deepcopy(config), device),
               _Runner("baseline", baseline_config(config), device, fused_adamw=False)]
    for runner in runners:
        for _ in range(warmup):  # compilation, allocator and autotuning happen here
            runner.step()
    while len(runners[0].times) < steps:
        for runner in runners:
            runner.times.extend(runner.step() for _ in range(block))
    tokens_per_step = config.train.batch_size * config.model.block_size * config.train.grad_accum_steps
    fast, base = (statistics.median(r.times[:steps]) for r in runners)
    amp = runners[0].amp
    return {
        "tokens_per_second": tokens_per_step / fast,
        "ms_per_step": 1000 * fast,
        "baseline_tokens_per_second": tokens_per_step / base,
        "baseline_ms_per_step": 1000 * base,
        "speedup": base / fast,
        "settings": {
            "device": device.type,
            "autocast": str(amp).replace("torch.", "") if amp else "off",
            "dtype_choice": runners[0].dtype_reason or f"--dtype {config.train.dtype}",
            "compile": config.train.compile and getattr(runners[0].step_model, "compiled", None) is not None,
            "threads": torch.get_num_threads(),
            "batch_size": config.train.batch_size,
            "block_size": config.model.block_size,
            "grad_accum_steps": config.train.grad_accum_steps,
            "tokens_per_step": tokens_per_step,
            "baseline": runners[1].describe(),
            "steps_timed": steps,
            "warmup_steps": warmup,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
    }


def bench_sample(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int = 1000, block: int = 50) -> dict:
    """Greedy tokens/s with the KV cache and on the naive path, stepped in alternating blocks of tokens.

    Both generations advance `block` tokens at a time in turn, so that both see the same
    machine load; each path's time is the sum of its blocks, prefills and window jumps included.
    """
    from ..inference.engine import default_keep
    from ..sample import generate

    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for use_cache in (True, False):  # warm-up: allocator, kernels, lazy initialisation
        for _ in generate(model, idx, 4, temperature=0, use_cache=use_cache):
            pass
    paths = {name: generate(model, idx, max_new_tokens, temperature=0, use_cache=name == "cached")
             for name in ("cached", "naive")}
    seconds = {name: 0.0 for name in paths}
    tokens: dict[str, list[int]] = {name: [] for name in paths}
    while any(len(t) < max_new_tokens for t in tokens.values()):
        for name, steps in paths.items():
            start = time.perf_counter()
            ids = [int(step[0]) for _, step in zip(range(block), steps, strict=False)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            tokens[name].extend(ids)
    config = model.config
    return {
        "cached_tokens_per_second": max_new_tokens / seconds["cached"],
        "naive_tokens_per_second": max_new_tokens / seconds["naive"],
        "speedup": seconds["naive"] / seconds["cached"],
        "cached_seconds": seconds["cached"],
        "naive_seconds": seconds["naive"],
        "identical_text": tokens["cached"] == tokens["naive"],
        "settings": {
            "max_new_tokens": max_new_tokens,
            "prompt_tokens": len(prompt_ids),
            "model_type": config.model_type,
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "block_size": config.block_size,
            "window_keep": default_keep(config.block_size),
            "device": device.type,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
