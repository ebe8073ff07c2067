"""Run the speedrun presets at a few time budgets and print the full validation loss at each.

    python benchmarks/speedrun.py --data PATH/input.txt --budgets 30 60 600

Budgets up to two minutes use the `speedrun-30s` preset (a small model that learns fast),
longer ones the `speedrun` preset (a wider model with a longer context); `--preset NAME`
uses one preset for every budget.

Each budget is a separate `scratchgpt train --preset speedrun --time-budget B` process, timed
from its start as a stopwatch would, so import time, data loading, training, the final
evaluation and saving all count. Each process gets an empty `TORCHINDUCTOR_CACHE_DIR`, so a
compiled preset pays for compiling as on a user's first run (`--warm-cache` keeps PyTorch's
usual cache instead). Run it on an otherwise idle machine: the figures are wall-clock figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(budget: float, data: str, preset: str, out: Path, extra: list[str], warm_cache: bool) -> dict:
    cmd = [sys.executable, "-m", "scratchgpt", "train", "--preset", preset, "--time-budget", str(budget),
           "--out", str(out), "--overwrite", "--no-progress", "--json", *extra]
    if data:
        cmd += ["--data", data]
    env = dict(os.environ)
    if not warm_cache:  # compiled kernels from an earlier run would make this run faster than a first one
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out.with_name(out.name + "-inductor-cache"))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"budget {budget}: training failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"budget_seconds": budget, "wall_seconds": round(wall, 1), "full_val_loss": round(result["full_val_loss"], 4),
            "full_val_bpc": round(result["full_val_bpc"], 4), "steps": result["steps"],
            "tokens_per_second": round(result["tokens_per_second"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="Tiny Shakespeare's input.txt (default: the cached download)")
    parser.add_argument("--preset", default="", help="one preset for every budget (default: by budget)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 600])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--warm-cache", action="store_true", help="keep PyTorch's compile cache (default: empty per run)")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, budget in enumerate(args.budgets):
            preset = args.preset or ("speedrun-30s" if budget <= 120 else "speedrun")
            row = {"preset": preset, **run(budget, args.data, preset, Path(tmp) / f"run-{i}-{budget:g}", extra, args.warm_cache)}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{preset} budget {budget:>5g} s: full val loss {row['full_val_loss']:.4f} ({row['full_val_bpc']:.3f} bits/char), "
                      f"{row['steps']} steps, {row['tokens_per_second']:,} tokens/s, {row['wall_seconds']} s wall", flush=True)


if __name__ == "__main__":
    main()
