"""One decoded token's matrix-vector products: F.linear against the model's row path, float32.

    python benchmarks/bench_matvec.py                 # shakespeare-char's 24 block matrices
    python benchmarks/bench_matvec.py --n-embd 768 --n-layer 12

A cached decoding step multiplies one row (or a few: --rows) by every weight matrix. This
times those products for a model's block matrices (c_attn, attn c_proj, c_fc, mlp c_proj per
layer) two ways, in alternating rounds: `F.linear` (PyTorch's general matrix multiply) and
`model.rows_times_weight` (a bmm over row blocks of the weight, what `model.Linear` does at
inference), and prints ms per token, the implied weight-reading speed and the largest
difference between the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scratchgpt.speed.kernels import row_blocks, rows_times_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    C = args.n_embd
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for _ in range(args.n_layer) for o, i in ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C))]
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(weights)} matrices, {megabytes:.0f} MB of float32 weights")
    with torch.inference_mode():
        for rows in args.rows:
            xs = [torch.randn(rows, 1, w.size(1)) for w in weights]
            paths = {
                "F.linear": lambda xs=xs: [F.linear(x, w) for x, w in zip(xs, weights, strict=True)],
                "row path": lambda xs=xs: [rows_times_weight(x, w, None, row_blocks(w.size(0))) for x, w in zip(xs, weights, strict=True)],
            }
            times: dict[str, list[float]] = {name: [] for name in paths}
            for r in range(args.rounds + 1):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    if r > 0:  # round 0 warms up
                        times[name].append((time.perf_counter() - start) / args.calls)
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            diff = max((a - b).abs().max().item() for a, b in zip(paths["F.linear"](), paths["row path"](), strict=True))
            print(f"rows {rows:2d}: F.linear {ms['F.linear']:6.2f} ms ({megabytes / ms['F.linear']:5.1f} GB/s), "
                  f"row path {ms['row path']:6.2f} ms ({megabytes / ms['row path']:5.1f} GB/s): "
                  f"{ms['F.linear'] / ms['row path']:.2f}x, max difference {diff:.1e}")


if __name__ == "__main__":
    main()
