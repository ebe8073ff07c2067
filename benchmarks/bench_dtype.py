"""`--dtype auto` against both dtypes on this machine (#26): is the default within 5% of the faster one?

    python benchmarks/bench_dtype.py                      # cpu-baby, 300 steps per run, each dtype twice
    python benchmarks/bench_dtype.py --preset shakespeare-char --steps 40

Each run is `scratchgpt train --preset P --max-steps N` with `--dtype float32`, `bfloat16` and
`auto`, alternating, in a fresh cache directory (so the first `auto` run pays for the probe and
the second finds it cached); the figure is the median tokens/s of the run's own metrics.jsonl
rows after the first (which holds the warm-up). Also printed: the probe's own cost, cold and
cached, and the CPU's model and bf16 flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, steps: int, dtype: str, cache: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "scratchgpt", "train", "--preset", preset, "--max-steps", str(steps),
                               "--eval-interval", str(steps), "--eval-iters", "1", "--sample-tokens", "0", "--dtype", dtype,
                               "--no-progress", "--out", f"{out}/run"], capture_output=True, text=True, check=True,
                              env={**os.environ, "SCRATCHGPT_CACHE": cache})
        rows = [json.loads(line) for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second"] for r in rows if r["kind"] == "train"][1:]
    announce = next(line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("scratchgpt:"))
    return statistics.median(speeds), announce.split("autocast ", 1)[1].split(", ", 1)[0]


def probe_cost(preset: str) -> tuple[float, float]:
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import config_from_preset
    from scratchgpt.speed.dtype import auto_cpu_dtype

    config = config_from_preset(preset)
    config.model.vocab_size = 65
    model = build_model(config.model)
    x = torch.randint(65, (config.train.batch_size, config.model.block_size))
    times = []
    for _ in range(2):  # cold, then cached
        start = time.perf_counter()
        auto_cpu_dtype(model, x, x)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-baby")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    from scratchgpt.speed.dtype import cpu_info

    cpu, flags = cpu_info()
    print(f"CPU: {cpu}; bf16-related flags: {' '.join(sorted(f for f in flags if 'bf16' in f or 'amx' in f)) or 'none'}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SCRATCHGPT_CACHE"] = cache
        cold, cached = probe_cost(args.preset)
    print(f"probe: {cold:.2f} s cold, {cached * 1000:.1f} ms cached")
    results: dict[str, list[float]] = {"float32": [], "bfloat16": [], "auto": []}
    chosen = ""
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            for dtype in results:
                speed, autocast = run(args.preset, args.steps, dtype, cache)
                results[dtype].append(speed)
                chosen = autocast if dtype == "auto" else chosen
    best = max(statistics.mean(results["float32"]), statistics.mean(results["bfloat16"]))
    print("| dtype | tokens/s (two runs) | vs the faster |")
    print("|---|---|---|")
    for dtype, speeds in results.items():
        print(f"| {dtype} | {' / '.join(f'{s:,.0f}' for s in speeds)} | {statistics.mean(speeds) / best:.2f}x |")
    print(f"auto chose: {chosen}")


if __name__ == "__main__":
    main()
