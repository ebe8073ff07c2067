"""Peak memory (RSS) of training on a large corpus, first run and cached run, per tokenizer.

    python benchmarks/bench_corpus.py --source ../shared/data/tinyshakespeare/input.txt --size-mb 200

Writes a corpus of `--size-mb` megabytes to a temporary folder (the source's lines, shuffled
again for every copy, so that it is not one text repeated), then for each tokenizer runs
`scratchgpt train` on it twice in a fresh process each time: first with an empty token cache
(read, count, train BPE, encode), then again (the cache is reused). The peak resident memory
of each process comes from the kernel's rusage of that child (`os.wait4`), torch included;
a process that only imports the training code gives the floor. The corpus and the caches
are deleted at the end. Prints one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The bigram model: the figure of interest is the data pipeline's memory (torch, the optimizer
# and the training loop included), and a model this cheap keeps the end-of-run evaluation over
# the whole validation split (8 to 20 million tokens here) to a minute or two on a small CPU.
MODEL = ["--preset", "bigram", "--block-size", "256"]


def write_corpus(source: Path, target: Path, size_bytes: int, seed: int = 0) -> int:
    """Copies of `source`'s lines, each copy shuffled anew, until `size_bytes` are written."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    rng = random.Random(seed)
    written = 0
    with open(target, "w", encoding="utf-8") as f:
        while written < size_bytes:
            rng.shuffle(lines)
            block = "".join(lines)
            f.write(block)
            written += len(block.encode("utf-8"))
    return written


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run `cmd`; return (exit status, peak RSS in MiB, wall seconds, stderr tail)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the sum of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", errors="replace")[-2000:]
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start, tail  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/tinyshakespeare/input.txt", help="text whose lines make the corpus")
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--workdir", default=None, help="where the corpus and caches go (default: a new folder in /tmp)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="scratchgpt-corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus.txt"
        size = write_corpus(Path(args.source), corpus, int(args.size_mb * 1e6))
        print(json.dumps({"corpus_bytes": size, "corpus": str(corpus)}), flush=True)
        # The floor: a process that only imports scratchgpt's training code (torch, numpy, tokenizers).
        code, rss_mib, _, tail = run_measured([sys.executable, "-c", "import scratchgpt.train, tokenizers"], dict(os.environ))
        if code != 0:
            raise SystemExit(tail)
        print(json.dumps({"run": "import only", "peak_rss_mib": round(rss_mib, 1)}), flush=True)
        for kind in args.tokenizers:
            env = {**os.environ, "SCRATCHGPT_CACHE": str(work / f"cache-{kind}")}
            for attempt in ("first", "cached"):
                cmd = [sys.executable, "-m", "scratchgpt", "train", *MODEL, "--data", str(corpus), "--tokenizer", kind,
                       "--vocab-size", str(args.vocab_size), "--max-steps", str(args.steps), "--eval-interval",
                       str(args.steps), "--eval-iters", "2", "--sample-tokens", "0", "--no-progress",
                       "--out", str(work / f"run-{kind}"), "--overwrite"]
                code, rss_mib, seconds, tail = run_measured(cmd, env)
                if code != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{tail}")
                print(json.dumps({"tokenizer": kind, "run": attempt, "peak_rss_mib": round(rss_mib, 1),
                                  "wall_seconds": round(seconds, 1)}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
