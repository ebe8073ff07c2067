"""How much faster a training step's matrix multiplies run in bf16 than in float32, alone.

    python benchmarks/bench_matmuls.py                          # cpu-baby's step
    python benchmarks/bench_matmuls.py --preset speedrun-30s
    python benchmarks/bench_matmuls.py --data PATH/input.txt    # also time the whole step (bench train)

Records every matrix multiply (mm, addmm, bmm) of one forward and backward pass of the preset's
model, with the shapes and memory layouts the step gives them, then times each product alone,
in float32 and in bfloat16, in alternating rounds. The ratio of the two sums is what bf16 can
give the part of the step that is matrix multiplies: on a CPU whose bf16 units do twice the
float32 work per cycle, about 2x, and less for small or transposed operands.

With --data it first runs `scratchgpt bench train` for the preset (bf16 path against its fp32
eager baseline, in one process) and then splits both steps into matmuls and the rest, which shows
how far the rest must shrink for a given speedup of the whole step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scratchgpt.config import config_from_preset
from scratchgpt.errors import ScratchGPTError
from scratchgpt.model import build_model
from scratchgpt.speed.bench import bench_train

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
Layouts = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (shape, stride) of each tensor argument


class RecordMatmuls(TorchDispatchMode):
    """Notes (op, [(shape, stride) of each tensor argument]) for every matmul dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, Layouts]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func, tuple((tuple(t.shape), tuple(t.stride())) for t in tensors)))
        return func(*args, **(kwargs or {}))


def flops(func: torch._ops.OpOverload, layouts: Layouts) -> int:
    """Multiply-adds times two: (m, k) x (k, n) is 2mkn, a batch of b of them 2bmkn."""
    a, b = (shape for shape, _ in layouts[-2:])  # addmm's first argument is the bias
    batch = a[0] if func is torch.ops.aten.bmm.default else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def step_matmuls(preset: str, vocab_size: int) -> Counter:
    """The preset's forward and backward matmuls, counted by (op, layouts)."""
    config = config_from_preset(preset)
    config.model.vocab_size = vocab_size
    model = build_model(config.model)
    B, T = config.train.batch_size, config.model.block_size
    x = torch.randint(vocab_size, (B, T))
    recorder = RecordMatmuls()
    with recorder:
        _, loss = model(x, x)
        loss.backward()
    return Counter(recorder.calls)


def time_alone(calls: Counter, dtypes: list[torch.dtype], rounds: int, repeats: int) -> dict[torch.dtype, dict]:
    """Median seconds per call of each product, per dtype, the dtypes alternating round by round."""
    operands = {dtype: {key: [torch.empty_strided(shape, stride, dtype=dtype).normal_() for shape, stride in key[1]]
                        for key in calls} for dtype in dtypes}
    samples: dict[torch.dtype, dict] = {dtype: {key: [] for key in calls} for dtype in dtypes}
    for r in range(rounds + 1):
        for dtype in dtypes:
            for key in calls:
                func, args = key[0], operands[dtype][key]
                start = time.perf_counter()
                for _ in range(repeats):
                    func(*args)
                if r > 0:  # round 0 warms up
                    samples[dtype][key].append((time.perf_counter() - start) / repeats)
    return {dtype: {key: statistics.median(s) for key, s in per_key.items()} for dtype, per_key in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-baby")
    parser.add_argument("--vocab-size", type=int, default=65, help="65: Tiny Shakespeare's characters")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--data", default="", help="also time the whole step with `bench train` on this text")
    parser.add_argument("--compile", action="store_true", help="with --data: the compiled bf16 step")
    args = parser.parse_args()

    calls = step_matmuls(args.preset, args.vocab_size)
    result = None
    if args.data:  # first, so that a wrong path ends the script before the long timing
        config = config_from_preset(args.preset, {"data": {"path": args.data}, "train": {"compile": args.compile}})
        result = bench_train(config)
    f32, bf16 = torch.float32, torch.bfloat16
    seconds = time_alone(calls, [f32, bf16], args.rounds, args.repeats)
    print(f"{args.preset}: {sum(calls.values())} matmuls a step, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op':6s} {'operands (shape:stride)':44s} {'count':>5s} {'fp32 us':>8s} {'bf16 us':>8s} {'bf16 GFLOP/s':>12s} {'ratio':>6s}")
    for (func, layouts), count in calls.items():
        described = " ".join(f"{'x'.join(map(str, shape))}:{','.join(map(str, stride))}" for shape, stride in layouts)
        a, b = seconds[f32][func, layouts], seconds[bf16][func, layouts]
        print(f"{func.__name__.split('.')[0]:6s} {described:44s} {count:5d} {1e6 * a:8.1f} {1e6 * b:8.1f} "
              f"{flops(func, layouts) / b / 1e9:12.1f} {a / b:6.2f}")

    def subtotal(label: str, keys: list) -> dict[torch.dtype, float]:
        """Seconds a step for these products, per dtype, printed with their rates."""
        if not keys:  # e.g. no bmm where attention is PyTorch's fused kernel
            print(f"{label:18s} none")
            return {f32: 0.0, bf16: 0.0}
        gflop = sum(calls[key] * flops(*key) for key in keys) / 1e9
        sums = {dtype: sum(calls[key] * seconds[dtype][key] for key in keys) for dtype in (f32, bf16)}
        print(f"{label:18s} {gflop:.2f} GFLOP: " + ", ".join(f"{name} {1e3 * sums[dtype]:6.2f} ms ({gflop / sums[dtype]:3.0f} GFLOP/s)"
              for name, dtype in (("fp32", f32), ("bf16", bf16))) + f": bf16 is {sums[f32] / sums[bf16]:.2f}x")
        return sums

    linear = subtotal("linear layers' mm", [key for key in calls if key[0] is not torch.ops.aten.bmm.default])
    subtotal("attention's bmm", [key for key in calls if key[0] is torch.ops.aten.bmm.default])
    subtotal("all matmuls", list(calls))

    if result is not None:
        fast, base = result["ms_per_step"], result["baseline_ms_per_step"]
        # The baseline attends with PyTorch's fused kernel, not bmm: attention counts as "the rest" in both.
        mm_fast, mm_base = 1e3 * linear[bf16], 1e3 * linear[f32]
        rest_fast, rest_base = fast - mm_fast, base - mm_base
        print(f"whole step: {fast:.2f} ms against {base:.2f} ms for fp32 eager: {result['speedup']:.2f}x")
        print(f"the rest (the step less its linear layers' mm, as timed alone): {rest_fast:.2f} ms against {rest_base:.2f} ms: "
              f"{rest_base / rest_fast:.2f}x")
        need = base / 2 - mm_fast
        print(f"for 2x the rest would have to take {need:.2f} ms, {rest_base / need:.2f}x less than the baseline's")

if __name__ == "__main__":
    try:
        main()
    except ScratchGPTError as error:  # a bad preset or data path: one line, not a traceback
        raise SystemExit(f"bench_matmuls.py: error: {error}") from None
