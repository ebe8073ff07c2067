"""Fast CPU kernels, swapped into a built model: each computes the same function as the layer it
replaces (tests/test_kernels.py checks them against the plain layers), only faster here.

- `RowBlockLinear`: decoding one token multiplies a single row by every weight matrix, which
  streams the weights from memory and computes little. PyTorch hands a (1, in) @ (in, out)
  product to a general matrix-multiply kernel; the same product as a batch of matrix-vector
  products over the weight's row blocks (`bmm`, which splits the batch between threads) ran
  several times faster (benchmarks/bench_matvec.py, BENCHMARKS.md). Only inference takes the
  path (no autograd), and only for up to 4 rows, beyond which the general kernel catches up.
- `attention_in_float32_on_cpu`: PyTorch's CPU flash attention is far slower in bfloat16 than
  in float32 at these sizes (benchmarks/bench_attention.py), so under CPU bf16 autocast the
  fused kernel attends in float32 and returns bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import CausalSelfAttention


class RowBlockLinear(nn.Linear):
    """nn.Linear, with a faster path for the few rows of a cached decoding step on CPU."""

    MAX_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiled step (inference/compiled.py) picks its own kernel
            return super().forward(x)
        rows = x.numel() // self.in_features
        if rows <= self.MAX_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            parts = row_blocks(self.out_features)
            if parts > 1:
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
