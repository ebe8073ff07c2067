"""Greedy decoding in-process against llama.cpp on the same model: tokens per second, one run, one machine.

For each preset, a model of its shape (random weights: decoding speed does not depend on them)
is saved as a checkpoint and exported to GGUF f32. Both sides then decode greedily from
"ROMEO:" for one context window (llama.cpp stops at its context): ours with `generate_text`
(the engine, eager and with `compile=True`, each after one warm-up run, which compiles), llama.cpp
through llama-cpp-python with 1 and 2 threads.
Runs alternate between the two; each figure is the best of `--repeats`.

    python benchmarks/bench_decode.py --data ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(preset: str, chars: str, repeats: int, threads: int) -> dict:
    import llama_cpp

    from scratchgpt.build import build_model
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.config import Config, config_from_preset
    from scratchgpt.interop.gguf import export_gguf
    from scratchgpt.sample import generate_text
    from scratchgpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(sorted(set(chars)))
    model_config = dataclasses.replace(config_from_preset(preset).model, vocab_size=tokenizer.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(model_config).eval()
    prompt = "ROMEO:"
    n_new = model_config.block_size - len(prompt)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "ckpt", model, tokenizer, Config(model=model_config), {"step": 0})
        gguf = export_gguf(checkpoint, Path(tmp) / "model.gguf", dtype="f32").path
        llms = {t: llama_cpp.Llama(model_path=str(gguf), n_ctx=model_config.block_size, n_threads=t, verbose=False)
                for t in sorted({1, threads})}
        prompt_ids = tokenizer.encode(prompt)

        def ours(compile: bool = False) -> str:
            return generate_text(model, tokenizer, prompt, max_new_tokens=n_new, temperature=0, compile=compile)

        def theirs(llm) -> list[int]:
            out = []
            for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == n_new:
                    break
            return out

        text = ours()  # warm-up, and the text to compare
        start = time.perf_counter()
        same_compiled = ours(compile=True) == text  # the compile happens here
        compile_s = time.perf_counter() - start
        same_text = tokenizer.decode(theirs(llms[threads])) == text
        seconds = {"scratchgpt": [], "scratchgpt compiled": [], **{f"llama.cpp {t} thread(s)": [] for t in llms}}
        for _ in range(repeats):  # alternating, so that both see the same machine
            seconds["scratchgpt"].append(best_seconds(ours, 1))
            seconds["scratchgpt compiled"].append(best_seconds(lambda: ours(compile=True), 1))
            for t, llm in llms.items():
                seconds[f"llama.cpp {t} thread(s)"].append(best_seconds(lambda llm=llm: theirs(llm), 1))
    rates = {name: n_new / min(s) for name, s in seconds.items()}
    llama_best = max(v for k, v in rates.items() if k.startswith("llama"))
    return {"preset": preset, "tokens": n_new, "tokens_per_second": {k: round(v, 1) for k, v in rates.items()},
            "ratio_to_llama_cpp": round(rates["scratchgpt"] / llama_best, 3),
            "compiled_ratio_to_llama_cpp": round(rates["scratchgpt compiled"] / llama_best, 3),
            "first_compiled_call_s": round(compile_s, 1), "same_greedy_text": same_text and same_compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Tiny Shakespeare (for its characters: the vocabulary)")
    parser.add_argument("--presets", nargs="+", default=["cpu-baby", "shakespeare-char"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads, and llama.cpp's other count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chars = Path(args.data).read_text(encoding="utf-8")
    rows = [measure(preset, chars, args.repeats, args.threads) for preset in args.presets]
    json.dump({"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
