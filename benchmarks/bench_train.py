"""Training speed of presets against the plain fp32 eager path, measured in the same run.

    python benchmarks/bench_train.py --data PATH/input.txt --presets cpu-baby speedrun
    python benchmarks/bench_train.py --data PATH/input.txt --processes 4 --compile

Prints, per preset, `scratchgpt bench train`'s JSON: median tokens/s of complete training
steps (batch, forward, backward, clipping, optimizer) and the same for fp32 eager, timed in
alternating blocks so that both see the same machine load. Other options (`--compile`,
`--threads`...) go to `bench train` as they are.

A process on a shared machine can run every step about a third slower than the next one
(BENCHMARKS.md), so one process's ratio is one sample: `--processes N` runs each preset in N
fresh processes and ends with the median and range of their speedups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="")
    parser.add_argument("--presets", nargs="+", default=["cpu-baby"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--processes", type=int, default=1, help="fresh processes per preset")
    args, extra = parser.parse_known_args()
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    for preset in args.presets:
        cmd = [sys.executable, "-m", "scratchgpt", "bench", "train", "--preset", preset, "--steps", str(args.steps), "--json", *extra]
        if args.data:
            cmd += ["--data", args.data]
        speedups = []
        for _ in range(args.processes):
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            result = json.loads(out.stdout)
            speedups.append(result["speedup"])
            print(json.dumps({"preset": preset, **result}), flush=True)
        if args.processes > 1:
            print(f"{preset}: speedup {statistics.median(speedups):.2f}x, median of {len(speedups)} processes "
                  f"({min(speedups):.2f}-{max(speedups):.2f})", flush=True)


if __name__ == "__main__":
    main()
