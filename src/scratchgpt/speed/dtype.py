"""`--dtype auto` on a CPU: bfloat16 only where it measures clearly faster, decided once per machine.

A CPU's bf16 speed cannot be told from what PyTorch reports: oneDNN says bf16 is supported
wherever it can run it at all, emulated included, and even native AVX-512 BF16 loses to float32
on some machines (0.77x on a 2-core Intel Xeon whose VM lists AMX without enabling it; 1.57x
faster on an AMD EPYC: BENCHMARKS.md). So:

1. no native bf16 instructions in the CPU's flags (`avx512_bf16` or `amx_bf16`): float32;
2. otherwise a short probe times the run's own model and batch, forward and backward, in both
   dtypes, alternating, and bf16 wins only at or under `CLEARLY_FASTER` of float32's time;
3. the decision is cached under the cache directory (choices.py), keyed by the CPU's model and flags, the
   torch version, the model's shape, the batch and the thread count, so that a 30-second run
   pays for the probe once per machine.

The probe leaves the model, its gradients and every random generator as it found them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..device import autocast_dtype
from .choices import cached_choice, choice_key, choices_file

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CLEARLY_FASTER = 0.9  # bf16's step time must be at most this share of float32's
PROBE_SECONDS = 0.6  # the timing budget after the warm-up steps
LONGEST_PROBE_STEP = 0.1  # seconds: a slower warm-up step shrinks the probe's batch


def autocast_for(dtype: str, device: torch.device, model: nn.Module,
                 batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.dtype | None, str]:
    """The run's autocast dtype and why: `--dtype auto` on a CPU measures (`auto_cpu_dtype`, on `batch()`);
    an explicit dtype, or another device, is device.autocast_dtype's."""
    if dtype != "auto" or device.type != "cpu":
        return autocast_dtype(dtype, device), ""
    x, y = batch()
    return auto_cpu_dtype(model, x, y)


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags (empty off Linux, where native bf16 is then not assumed)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown", frozenset()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", "unknown"), frozenset(fields.get("flags", "").split())


def has_native_bf16(flags: frozenset[str]) -> bool:
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def choose(float32_s: float, bfloat16_s: float) -> str:
    """The faster dtype, with bf16 only where clearly faster (a tie keeps float32's exact arithmetic)."""
    return "bfloat16" if bfloat16_s <= CLEARLY_FASTER * float32_s else "float32"


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
        _, loss = model(x, y)
    loss.backward()
    return time.perf_counter() - start


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Median seconds of a forward and backward pass in float32 and in bf16, alternating."""
    was_training = model.training
    saved_grads = [p.grad for p in model.parameters()]
    model.eval()  # no dropout: nothing random is drawn
    try:
        with torch.random.fork_rng(devices=[]):
            warm = max(_step(model, x, y, None), _step(model, x, y, torch.bfloat16))
            if warm > LONGEST_PROBE_STEP:  # a big model: fewer rows, the same ratio
                rows = max(1, int(x.size(0) * LONGEST_PROBE_STEP / warm))
                x, y = x[:rows], y[:rows]
                _step(model, x, y, None), _step(model, x, y, torch.bfloat16)
            times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
            deadline = time.perf_counter() + PROBE_SECONDS
            while len(times["float32"]) < 3 or time.perf_counter() < deadline:
                times["float32"].append(_step(model, x, y, None))
                times["bfloat16"].append(_step(model, x, y, torch.bfloat16))
                if len(times["float32"]) >= 30:
                    break
    finally:
        for p, g in zip(model.parameters(), saved_grads, strict=True):
            p.grad = g
        model.train(was_training)
    return statistics.median(times["float32"]), statistics.median(times["bfloat16"])


def _key(cpu: str, flags: frozenset[str], model: nn.Module, x: torch.Tensor) -> str:
    config = getattr(model, "config", None)
    shape = {k: v for k, v in asdict(config).items() if k != "dropout"} if config is not None else type(model).__name__
    return choice_key({"cpu": cpu, "flags": sorted(flags), "torch": torch.__version__, "model": shape,
                       "batch": list(x.shape), "threads": torch.get_num_threads()})


CHOICES = "dtype-choices.json"


def cache_file() -> Path:
    return choices_file(CHOICES)


def auto_cpu_dtype(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: tuple[str, frozenset[str]] | None = None
                   ) -> tuple[torch.dtype | None, str]:
    """`--dtype auto` on the CPU: (bfloat16 or None for float32, the reason in a few words)."""
    cpu, flags = info or cpu_info()
    if not has_native_bf16(flags):
        return None, "float32: this CPU has no native bf16 instructions (no avx512_bf16 or amx_bf16 flag)"

    def measure() -> dict:
        float32_s, bfloat16_s = probe(model, x, y)
        return {"dtype": choose(float32_s, bfloat16_s), "speed": round(float32_s / bfloat16_s, 3), "cpu": cpu}

    valid = lambda entry: isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16")  # noqa: E731
    entry, measured_now = cached_choice(CHOICES, _key(cpu, flags, model, x), valid, measure)
    how = "measured just now" if measured_now else f"measured earlier on this machine, cached in {cache_file()}"
    reason = f"{entry['dtype']}: bf16 runs this model at {entry['speed']:.2f}x float32's speed here ({how})"
    return (torch.bfloat16 if entry["dtype"] == "bfloat16" else None), reason
