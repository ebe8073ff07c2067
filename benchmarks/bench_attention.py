"""Causal attention forward + backward on CPU: SDPA and the written-out path, float32 and bfloat16.

    python benchmarks/bench_attention.py            # the presets' shapes
    python benchmarks/bench_attention.py --shape 12 4 64 32

Why it exists: PyTorch's CPU flash-attention kernel was measured several times slower in
bfloat16 than in float32 at small-GPT sizes on a CPU without AMX, so the model attends in
float32 under CPU bf16 autocast (model.CausalSelfAttention). Re-run it after a PyTorch upgrade
or on a new CPU: if the bf16 row wins there, that rule should change. Each variant is timed in
alternating rounds so that all see the same machine load; the figure is the median per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scratchgpt.model import manual_attention

# (batch, heads, context, head size) of the presets that train with bf16 autocast
SHAPES = {"cpu-baby": (12, 4, 64, 32), "speedrun-30s": (16, 4, 64, 32), "speedrun": (12, 4, 256, 48)}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_in_fp32(q, k, v):
    """What the model does under CPU bf16 autocast: upcast, attend, cast back."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)


VARIANTS = {
    "sdpa float32": (sdpa, torch.float32),
    "sdpa bfloat16": (sdpa, torch.bfloat16),
    "sdpa bf16 in, float32 inside": (sdpa_in_fp32, torch.bfloat16),
    "manual float32": (manual_attention, torch.float32),
    "manual bfloat16": (manual_attention, torch.bfloat16),
}


def time_shape(shape: tuple[int, int, int, int], rounds: int, calls: int) -> dict[str, float]:
    inputs = {name: [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)] for name, (_, dtype) in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds + 1):
        for name, (fn, _) in VARIANTS.items():
            q, k, v = inputs[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn(q, k, v).sum().backward()
            if r > 0:  # round 0 warms up
                times[name].append((time.perf_counter() - start) / calls)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, metavar=("B", "NH", "T", "HS"), help="one shape instead of the presets'")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    shapes = {"custom": tuple(args.shape)} if args.shape else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward (median)")
    for preset, shape in shapes.items():
        result = time_shape(shape, args.rounds, args.calls)
        base = result["sdpa float32"]
        print(f"\n{preset} {shape}:")
        for name, ms in result.items():
            print(f"  {name:30s} {ms:7.3f} ms  {base / ms:5.2f}x sdpa float32")


if __name__ == "__main__":
    main()
