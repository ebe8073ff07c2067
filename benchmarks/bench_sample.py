"""Generation speed with and without the KV cache, at shakespeare-char size, measured in one run.

    python benchmarks/bench_sample.py --data ../shared/data/tinyshakespeare/input.txt
    python benchmarks/bench_sample.py --checkpoint runs/big --max-new-tokens 500

Without --checkpoint it saves a randomly initialised model of the shakespeare-char preset
(6 layers, 384 wide, context 256: speed does not depend on the weights) with the vocabulary of
--data, in a temporary directory. Then it measures, for greedy decoding of --max-new-tokens:

1. `scratchgpt bench sample --json`: tokens/s of generation alone, the cached and the naive
   path stepped in alternating blocks of 50 tokens so that both see the same machine load;
2. the whole `scratchgpt sample` command as a user runs it (process start, imports, loading,
   generation, printing), with the cache and with --no-kv-cache, alternately, --repeats times,
   and whether both printed the same text.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def random_checkpoint(data: str, out: Path) -> Path:
    """A freshly initialised shakespeare-char model with the vocabulary of `data`, saved as a checkpoint."""
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.config import config_from_preset
    from scratchgpt.tokenizer import CharTokenizer

    text = Path(data).read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    config = config_from_preset("shakespeare-char", {"data": {"path": str(Path(data).resolve())}})
    config.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(config.model)
    return save_checkpoint(out, model, tokenizer, config, {"step": 0, "note": "randomly initialised, for speed tests"})


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint to measure (default: a random shakespeare-char one)")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt",
                        help="text whose characters make the random model's vocabulary")
    parser.add_argument("--max-new-tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="timed `sample` runs per path (default 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(random_checkpoint(args.data, Path(tmp) / "shakespeare-char-random"))
        scratchgpt = [sys.executable, "-m", "scratchgpt"]
        n = str(args.max_new_tokens)
        _, out = run([*scratchgpt, "bench", "sample", "--checkpoint", checkpoint, "--max-new-tokens", n, "--json"])
        bench = json.loads(out)

        sample = [*scratchgpt, "sample", "--checkpoint", checkpoint, "--max-new-tokens", n, "--temperature", "0"]
        seconds: dict[str, list[float]] = {"cached": [], "naive": []}
        texts: dict[str, str] = {}
        for _ in range(args.repeats):
            for name, extra in (("cached", []), ("naive", ["--no-kv-cache"])):
                elapsed, texts[name] = run(sample + extra)
                seconds[name].append(elapsed)
        cached, naive = statistics.median(seconds["cached"]), statistics.median(seconds["naive"])
        print(json.dumps({
            "checkpoint": args.checkpoint or "random shakespeare-char",
            "bench_sample": bench,
            "sample_command": {
                "command": " ".join(sample[2:]),
                "cached_seconds": cached,
                "naive_seconds": naive,
                "speedup": naive / cached,
                "identical_text": texts["cached"] == texts["naive"],
                "repeats": args.repeats,
            },
        }, indent=2))


if __name__ == "__main__":
    main()
