"""Training speed of presets against the plain fp32 eager path, measured in the same run.

    python benchmarks/bench_train.py --data PATH/input.txt --presets cpu-baby speedrun

Prints, per preset, `scratchgpt bench train`'s JSON: median tokens/s of complete training
steps (batch, forward, backward, clipping, optimizer) and the same for fp32 eager, timed in
alternating blocks so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="")
    parser.add_argument("--presets", nargs="+", default=["cpu-baby"])
    parser.add_argument("--steps", type=int, default=40)
    args, extra = parser.parse_known_args()
    for preset in args.presets:
        cmd = [sys.executable, "-m", "scratchgpt", "bench", "train", "--preset", preset, "--steps", str(args.steps), "--json", *extra]
        if args.data:
            cmd += ["--data", args.data]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        result = json.loads(out.stdout)
        print(json.dumps({"preset": preset, **result}), flush=True)


if __name__ == "__main__":
    main()
