"""Training and evaluation speed on a busy machine: the adaptive thread count against a fixed one.

For each kind of load (none; a busy loop on one core; another PyTorch job with PyTorch's default
threads), this starts the load, then runs `scratchgpt train` in fresh processes, alternating
today's default (`--threads 0`, the count follows the machine's load) with the fixed count
PyTorch would pick (`--threads N`, one per core: the default before the thread governor), and reads
each run's tokens/s from its metrics.jsonl (the harmonic mean of the 10-step windows after the
first, so the adaptation's first seconds count). Then it times `scratchgpt eval` (the whole
validation split) and `scratchgpt sample` (greedy, KV-cached) as whole commands the same way.
All figures of one invocation come from the same minutes of the same machine: compare ratios.

    python benchmarks/bench_busy.py                       # cpu-baby, 400 steps, 3 rounds
    python benchmarks/bench_busy.py --loads idle "PyTorch job" --steps 60 --rounds 2
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

import torch

LOADS = {
    "idle": [],
    "busy loop": [[sys.executable, "-c", "while True: pass"]],
    "PyTorch job": [[sys.executable, "-c", "import torch\na = torch.randn(768, 768)\nwhile True: a @ a"]],
}


def start_load(kind: str) -> list[subprocess.Popen]:
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in LOADS[kind]]
    time.sleep(1.0 if procs else 0.0)  # let the load get going (the PyTorch job imports torch first)
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**clean, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def train_tokens_per_second(preset: str, steps: int, threads: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "scratchgpt", "train", "--preset", preset, "--max-steps", str(steps),
           "--eval-interval", str(steps + 1), "--sample-tokens", "0", "--threads", str(threads),
           "--out", str(out), "--overwrite", "--no-progress"]
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    windows = [row["tokens_per_second"] for row in rows[1:]]  # the first window holds the warm-up step
    return statistics.harmonic_mean(windows)


def eval_seconds(checkpoint: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "scratchgpt", "eval", "--checkpoint", str(checkpoint), "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def sample_seconds(checkpoint: Path, threads: int, tokens: int) -> float:
    cmd = [sys.executable, "-m", "scratchgpt", "sample", "--checkpoint", str(checkpoint), "--threads", str(threads),
           "--prompt", "ROMEO:", "--max-new-tokens", str(tokens), "--temperature", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-baby")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting under each load (default 3)")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS), metavar="LOAD",
                        help=f"which loads, among {list(LOADS)} (default all; put idle first: the percentages need it)")
    parser.add_argument("--sample-tokens", type=int, default=1000, help="greedy tokens per sample command (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    fixed = torch.get_num_threads()  # PyTorch's default in a fresh process: one per core
    settings = {"adaptive (--threads 0, default)": 0, f"fixed (--threads {fixed}, the old default)": fixed}
    train: dict[str, dict[str, list[float]]] = {load: {name: [] for name in settings} for load in args.loads}
    evals: dict[str, dict[str, list[float]]] = {load: {name: [] for name in settings} for load in args.loads}
    samples: dict[str, dict[str, list[float]]] = {load: {name: [] for name in settings} for load in args.loads}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        for load in args.loads:
            procs = start_load(load)
            try:
                for r in range(args.rounds):
                    order = list(settings.items()) if r % 2 == 0 else list(settings.items())[::-1]
                    for name, threads in order:
                        train[load][name].append(train_tokens_per_second(args.preset, args.steps, threads, run))
                        evals[load][name].append(eval_seconds(run, threads))
                        samples[load][name].append(sample_seconds(run, threads, args.sample_tokens))
                        print(f"{load:12s} {name:36s} train {train[load][name][-1]:9,.0f} tokens/s  "
                              f"eval {evals[load][name][-1]:6.1f} s  sample {samples[load][name][-1]:6.1f} s",
                              file=sys.stderr, flush=True)
            finally:
                stop_load(procs)
    report = {"preset": args.preset, "steps": args.steps, "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "train_tokens_per_second": train, "eval_seconds": evals, "sample_seconds": samples}
    if args.json:
        print(json.dumps(report))
        return
    idle = {name: statistics.median(train["idle"][name]) for name in settings}
    print(f"{args.preset}, {args.steps} steps, median of {args.rounds} runs; % of the same setting's idle speed")
    print(f"{'load':12s} {'setting':36s} {'train tokens/s':>15s} {'% of idle':>9s} {'eval s':>7s} {'sample s':>8s}")
    for load in args.loads:
        for name in settings:
            tps = statistics.median(train[load][name])
            print(f"{load:12s} {name:36s} {tps:15,.0f} {tps / idle[name]:9.0%} {statistics.median(evals[load][name]):7.1f} "
                  f"{statistics.median(samples[load][name]):8.1f}")
    names = list(settings)
    print(f"idle: adaptive / fixed = {idle[names[0]] / idle[names[1]]:.3f}")


if __name__ == "__main__":
    main()
