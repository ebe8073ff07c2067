"""Fast CPU kernels, swapped into a built model: each computes the same function as the layer it
replaces (tests/test_kernels.py checks them against the plain layers), only faster here.

- `RowBlockLinear`: decoding one token multiplies a single row by every weight matrix, which
  streams the weights from memory and computes little. PyTorch hands a (1, in) @ (in, out)
  product to a general matrix-multiply kernel; the same product as a batch of matrix-vector
  products over the weight's row blocks (`bmm`, which splits the batch between threads), the
  row path, ran 2.75x faster on an AMD EPYC, and 0.57x as fast on an Intel Xeon whose MKL
  reads the weights at the memory's rate (benchmarks/bench_matvec.py, BENCHMARKS.md). So a short
  probe decides once per machine and thread count (`row_path_wins`, kept in the cache
  directory, choices.py), and the row path runs only where it measured clearly faster. Only
  inference takes it (no autograd), and only for up to 4 rows, beyond which the general kernel
  catches up.
- `attention_in_float32_on_cpu`: PyTorch's CPU flash attention is far slower in bfloat16 than
  in float32 at these sizes (benchmarks/bench_attention.py), so under CPU bf16 autocast the
  fused kernel attends in float32 and returns bfloat16.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import CausalSelfAttention
from .choices import cached_choice, choice_key
from .dtype import cpu_info


class RowBlockLinear(nn.Linear):
    """nn.Linear, with the row path for the few rows of a cached decoding step on CPU, where it is the faster."""

    MAX_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiled step (inference/compiled.py) picks its own kernel
            return super().forward(x)
        rows = x.numel() // self.in_features
        if rows <= self.MAX_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            parts = row_blocks(self.out_features)
            if parts > 1 and row_path_wins(torch.get_num_threads()):
                return rows_times_weight(x, self.weight, self.bias, parts)
        return super().forward(x)


def row_blocks(out_features: int) -> int:
    """Into how many equal row blocks to cut a weight: one per thread if they divide it, else 2, else 1."""
    for parts in (torch.get_num_threads(), 2):
        if parts > 1 and out_features % parts == 0:
            return parts
    return 1


def rows_times_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """x @ weight.T + bias for a few rows x (..., in), as `parts` matrix-vector products in one bmm."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)  # (N, in)
    blocks = weight.view(parts, out_features // parts, in_features)  # (p, out/p, in), no copy
    y = torch.bmm(blocks, rows.t().expand(parts, -1, -1))  # (p, out/p, in) @ (p, in, N) -> (p, out/p, N)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)  # (N, p, out/p) -> (..., out)
    return y + bias if bias is not None else y


ROW_PATH_CHOICES = "kernel-choices.json"
CLEARLY_FASTER = 0.9  # the row path's time must be at most this share of F.linear's


@functools.cache
def row_path_wins(threads: int) -> bool:
    """Whether the row path multiplies one row clearly faster than F.linear here, at this thread count: measured
    once per machine (`probe_row_path`, about 0.1 s), then read from the cache directory."""
    cpu, flags = cpu_info()

    def measure() -> dict:
        linear_s, row_path_s = probe_row_path()
        return {"row path": row_path_s <= CLEARLY_FASTER * linear_s, "speed": round(linear_s / row_path_s, 3), "cpu": cpu}

    key = choice_key({"cpu": cpu, "flags": sorted(flags), "torch": torch.__version__, "threads": threads})
    valid = lambda entry: isinstance(entry, dict) and isinstance(entry.get("row path"), bool)  # noqa: E731
    return cached_choice(ROW_PATH_CHOICES, key, valid, measure)[0]["row path"]


def probe_row_path(n_embd: int = 384, layers: int = 6, rounds: int = 7) -> tuple[float, float]:
    """Median seconds to multiply one row by `layers` GPT blocks' matrices at width `n_embd` (at the defaults
    shakespeare-char's, 42 MB of float32, read from memory as a model's weights are): F.linear, then the row path."""
    c = n_embd
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * layers
    weights = [(torch.full(shape, 0.01), torch.zeros(shape[0])) for shape in shapes]  # each its own memory
    rows = {c: torch.ones(1, c), 4 * c: torch.ones(1, 4 * c)}

    def linear() -> None:
        for w, b in weights:
            F.linear(rows[w.size(1)], w, b)

    def row_path() -> None:
        for w, b in weights:
            rows_times_weight(rows[w.size(1)], w, b, row_blocks(w.size(0)))

    times: dict[Callable, list[float]] = {linear: [], row_path: []}
    with torch.no_grad():
        for _ in range(rounds + 1):  # alternating; the first round warms up
            for run, seconds in times.items():
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
    return statistics.median(times[linear][1:]), statistics.median(times[row_path][1:])


def attention_in_float32_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, computed in float32 when bfloat16 queries arrive on CPU."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return y.to(q.dtype)


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Swap the kernels above into `model`, in place: same parameters, same state dict, same outputs."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RowBlockLinear  # a subclass with the same fields: only forward changes
        elif isinstance(module, CausalSelfAttention):
            module.sdpa = attention_in_float32_on_cpu
    return model
