"""Greedy decoding in-process against llama.cpp on the same model: tokens per second, one run, one machine.

For each preset, a model of its shape (random weights: decoding speed does not depend on them)
is saved as a checkpoint and exported to GGUF f32. Both sides then decode greedily from
"ROMEO:" for one context window (llama.cpp stops at its context): ours with `generate_text`
(the engine, eager and with `compile=True`, each after one warm-up run, which compiles), llama.cpp
through llama-cpp-python with 1 and 2 threads.
Runs alternate between the two; each figure is the best of `--repeats`.

`--breakdown` also splits our token into its floors, in ms, alternating in the same process:
reading the matrices' weights once (`torch.sum` over them: the memory's rate), their
matrix-vector products alone, the compiled decoding step alone (over the window's spans), and
a token of `generate_text`.

    python benchmarks/bench_decode.py --data ../shared/data/tinyshakespeare/input.txt
    python benchmarks/bench_decode.py --data ../shared/data/tinyshakespeare/input.txt --presets shakespeare-char --breakdown
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


def breakdown(model: torch.nn.Module, ours, theirs, n_new: int, repeats: int) -> dict:
    """Milliseconds a token: the weights read once, their products alone, the compiled step alone, generate_text,
    llama.cpp."""
    from scratchgpt.inference.cache import KVCache
    from scratchgpt.inference.compiled import compiled_step_for

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flat = torch.cat([m.weight.detach().flatten() for m in linears])
    inputs = [torch.randn(1, m.in_features) for m in linears]
    step, cache = compiled_step_for(model), KVCache.for_model(model, rows=1)
    tokens, active = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.bool)

    def products() -> None:
        for m, x in zip(linears, inputs, strict=True):
            torch.nn.functional.linear(x, m.weight)

    def steps() -> None:
        cache.lengths.zero_()
        for span in range(2, n_new + 2):
            step(model, tokens, cache, active, span)

    parts = {"weights read once (torch.sum)": (flat.sum, 1), "matrix-vector products alone": (products, 1),
             "compiled step alone": (steps, n_new), "generate_text, a token": (lambda: ours(compile=True), n_new),
             "llama.cpp, a token": (theirs, n_new)}
    best = dict.fromkeys(parts, float("inf"))
    with torch.inference_mode():
        for _ in range(repeats):  # alternating
            for name, (run, per) in parts.items():  # a single read or product set: best of 50 calls
                best[name] = min(best[name], best_seconds(run, 50 if per == 1 else 1) / per)
    out = {name: round(seconds * 1e3, 3) for name, seconds in best.items()}
    out["weights MB"] = round(flat.numel() * flat.element_size() / 1e6, 1)
    return out


def measure(preset: str, chars: str, repeats: int, threads: int, split: bool = False) -> dict:
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
        row = {"preset": preset, "tokens": n_new, "tokens_per_second": {k: round(v, 1) for k, v in rates.items()},
               "ratio_to_llama_cpp": round(rates["scratchgpt"] / llama_best, 3),
               "compiled_ratio_to_llama_cpp": round(rates["scratchgpt compiled"] / llama_best, 3),
               "first_compiled_call_s": round(compile_s, 1), "same_greedy_text": same_text and same_compiled}
        if split:  # llama.cpp's better thread count, alternating with our parts
            faster = max(llms, key=lambda t: rates[f"llama.cpp {t} thread(s)"])
            row["breakdown_ms"] = breakdown(model, ours, lambda: theirs(llms[faster]), n_new, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Tiny Shakespeare (for its characters: the vocabulary)")
    parser.add_argument("--presets", nargs="+", default=["cpu-baby", "shakespeare-char"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads, and llama.cpp's other count")
    parser.add_argument("--breakdown", action="store_true", help="also split our token into its floors (ms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chars = Path(args.data).read_text(encoding="utf-8")
    rows = [measure(preset, chars, args.repeats, args.threads, args.breakdown) for preset in args.presets]
    json.dump({"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
