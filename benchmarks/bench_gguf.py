"""A checkpoint exported to GGUF, run in llama.cpp beside scratchgpt: file sizes, logit differences, speed.

    python benchmarks/bench_gguf.py --checkpoint runs/cpu-baby --data ../shared/data/tinyshakespeare/input.txt

For each of f32, f16 and q8_0 it exports the checkpoint, loads the file in llama.cpp (through
llama-cpp-python, the `llama` extra) and measures:

- the file's size;
- the logits of llama.cpp against ours over `--windows` windows of the validation text, each a
  full context: the largest and the mean absolute difference, and how often the top token differs;
- greedy text: how many of `--tokens` new tokens agree with `scratchgpt`'s greedy continuation,
  within one context window (llama.cpp cannot slide a learned-position window);
- the smallest top logit along that continuation: llama.cpp's appended end-of-text token scores 0,
  so greedy decoding there stops early only if this goes below 0;
- tokens/s of greedy generation of one context window: llama.cpp (its own sampler) and
  scratchgpt's KV-cached engine, alternately, the best of `--repeats`.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def measure(checkpoint: str, data: str, dtype: str, windows: int, tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    from scratchgpt.checkpoint import load_checkpoint
    from scratchgpt.interop.gguf import export_gguf
    from scratchgpt.sample import generate

    model, tokenizer, config, _ = load_checkpoint(checkpoint)
    block = config.model.block_size
    text = Path(data).read_text(encoding="utf-8")
    val_ids = tokenizer.encode(text[int(len(text) * 0.9):])
    with tempfile.TemporaryDirectory() as tmp:
        result = export_gguf(checkpoint, Path(tmp) / f"model-{dtype}.gguf", dtype=dtype)
        llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=block, logits_all=True, verbose=False, n_threads=threads)
        diffs, top_differs, positions = [], 0, 0
        for start in np.linspace(0, len(val_ids) - block - 1, windows).astype(int):
            window = val_ids[start:start + block]
            llm.reset()
            llm.eval(window)
            theirs = np.array(llm.scores[:block, :tokenizer.vocab_size])
            with torch.no_grad():
                ours = model(torch.tensor([window]))[0][0].numpy()
            diffs.append(np.abs(theirs - ours))
            top_differs += int((theirs.argmax(-1) != ours.argmax(-1)).sum())
            positions += block
        diff = np.concatenate([d.ravel() for d in diffs])

        prompt = tokenizer.encode("ROMEO:")
        n_new = min(tokens, block - len(prompt))
        ours_ids = [int(ids[0]) for ids in generate(model, torch.tensor([prompt]), n_new, temperature=0)]
        with torch.no_grad():  # the largest logit at each greedy step: how far from a tie the choices were
            smallest_top = float(model(torch.tensor([prompt + ours_ids[:-1]]))[0][0, len(prompt) - 1:].max(-1).values.min())
        theirs_ids = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(theirs_ids) == n_new:
                break
            theirs_ids.append(token)
        agree = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids, strict=False)) if a != b), min(len(ours_ids), len(theirs_ids)))

        ours_s, theirs_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            list(generate(model, torch.tensor([prompt]), n_new, temperature=0))
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            n = 0
            for _token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                n += 1
                if n == n_new:
                    break
            theirs_s.append(time.perf_counter() - t)
        return {
            "dtype": dtype, "file_bytes": result.n_bytes,
            "logit_max_abs_diff": float(diff.max()), "logit_mean_abs_diff": float(diff.mean()),
            "top_token_differs": f"{top_differs}/{positions}",
            "greedy_tokens_agreeing": f"{agree}/{n_new}", "smallest_top_logit": smallest_top,
            "llama_cpp_tokens_per_second": n_new / min(theirs_s), "scratchgpt_tokens_per_second": n_new / min(ours_s),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the corpus the model was trained on (its last 10% validates)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1000, help="greedy tokens (at most one context window)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args.checkpoint, args.data, dtype, args.windows, args.tokens, args.repeats, args.threads)
            for dtype in ("f32", "f16", "q8_0")]
    json.dump({"checkpoint": args.checkpoint, "torch": torch.__version__, "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
