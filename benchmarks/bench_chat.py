"""Chat fine-tuning figures (#24): what `scratchgpt sft` teaches, and what LoRA saves.

    python benchmarks/bench_chat.py tasks --checkpoint runs/cpu-baby
    python benchmarks/bench_chat.py lora --steps 8

`tasks`: held-out exact match per built-in task (chat/tasks.py) of the base checkpoint (given the
chat tokens, as sft starts it) and of the same checkpoint after `sft` with its defaults, and the
sft run's wall time.

`lora`: full fine-tuning against LoRA (rank 8 on every block's linear layers) on a model of
GPT-2 124M's shape (12 layers, 12 heads, 768 wide, 50,257-token vocabulary), on the built-in
conversations cut to 64 tokens: seconds per step, peak resident memory (each in its own
process, so one's memory does not hide the other's), and the loss after the same steps from the
same randomly initialised base. AdamW, batch 8, learning rate 3e-4 for full, 1e-3 for LoRA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tasks(checkpoint: str) -> None:
    from scratchgpt.chat.data import chat_data_from_config
    from scratchgpt.chat.sft import sft, sft_config
    from scratchgpt.chat.talk import exact_match
    from scratchgpt.chat.template import chat_tokenizer
    from scratchgpt.checkpoint import load_checkpoint
    from scratchgpt.config import DataConfig
    from scratchgpt.lora import grow_vocab

    model, tokenizer, config, _ = load_checkpoint(checkpoint)
    tokenizer = chat_tokenizer(tokenizer)
    grow_vocab(model, tokenizer.vocab_size)
    held = chat_data_from_config(DataConfig(chat=True), tokenizer, config.model.block_size, log=lambda m: None).held_out
    base = exact_match(model, tokenizer, held)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = sft(sft_config(checkpoint, {}), Path(out) / "chat", progress=False, log=lambda m: None)
        seconds = time.perf_counter() - start
    print(f"sft: {result.train.steps} steps in {seconds:.0f} s (training {result.train.elapsed_seconds:.0f} s), "
          f"full val loss {result.train.full_val_loss:.3f}")
    print("| task | held-out examples | base | after sft |")
    print("|---|---|---|---|")
    for task in base:
        n = min(200, sum(e.task == task for e in held))
        print(f"| {task} | {n} | {base[task]:.1%} | {result.exact_match[task]:.1%} |")


def lora_child(mode: str, steps: int) -> dict:
    """One fine-tuning mode in this process: seconds per step (after one warm-up), peak RSS, the last loss."""
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.chat.data import chat_data_from_config
    from scratchgpt.chat.template import chat_tokenizer
    from scratchgpt.config import DataConfig, ModelConfig, TrainConfig
    from scratchgpt.lora import add_lora, count_trainable
    from scratchgpt.optim import configure_optimizer
    from scratchgpt.text import find_corpus_files, read_text
    from scratchgpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    text = read_text(find_corpus_files(None)[0][0])
    tokenizer = chat_tokenizer(CharTokenizer.from_text(text))
    data = chat_data_from_config(DataConfig(chat=True), tokenizer, 64, log=lambda m: None)
    model = build_model(ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, bias=True,
                                    tie_weights=True, attention="sdpa"))
    lr = 1e-3 if mode == "lora" else 3e-4
    if mode == "lora":
        add_lora(model, rank=8, alpha=16, vocab_size=50257)
    optimizer = configure_optimizer(model, TrainConfig(learning_rate=lr, weight_decay=0.0), torch.device("cpu"))
    sampler = data.sampler("train", 64, 8, seed=1, device=torch.device("cpu"))
    times, loss = [], float("nan")
    for _ in range(steps + 1):
        start = time.perf_counter()
        x, y = sampler.next_batch()
        _, loss_t = model(x, y)
        loss_t.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        loss = loss_t.item()
    return {"mode": mode, "trainable": count_trainable(model), "s_per_step": sum(times[1:]) / steps, "loss": loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def lora(steps: int) -> None:
    rows = []
    for mode in ("full", "lora"):
        done = subprocess.run([sys.executable, __file__, "lora-child", mode, str(steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| fine-tuning | trainable parameters | s/step | peak memory | loss after", steps, "steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:,.0f} MB | {r['loss']:.3f} |")
    full, low = rows
    print(f"LoRA / full: {low['s_per_step'] / full['s_per_step']:.2f}x the step time, "
          f"{low['peak_rss_mb'] / full['peak_rss_mb']:.2f}x the peak memory")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "lora-child":
        print(json.dumps(lora_child(sys.argv[2], int(sys.argv[3]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="what", required=True)
    commands.add_parser("tasks").add_argument("--checkpoint", default="runs/cpu-baby")
    commands.add_parser("lora").add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    tasks(args.checkpoint) if args.what == "tasks" else lora(args.steps)
