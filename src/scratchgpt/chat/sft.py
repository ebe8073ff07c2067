"""Supervised fine-tuning: `sft(base, out)` teaches a pretrained model to answer, on the same training loop.

The run starts from the base checkpoint's weights (`init_from`), gains the chat template's
tokens, and trains on whole conversations with the loss on the assistant's tokens only
(data.py). Everything else is `train()`: the time budget, progress, checkpoints, bit-exact
resume, metrics.jsonl and loss.png. The base checkpoint is only read. With LoRA
(`lora_rank`), only the adapter is trained and saved.

On the built-in set the run ends by scoring the held-out tasks (tasks.py): the share of exact
answers per task, printed and written to metrics.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint, read_config, resolve_checkpoint
from ..config import Config
from ..distributed import launched_as_main
from ..errors import ScratchGPTError
from ..train import TrainResult, train
from .data import chat_data_from_config
from .talk import exact_match

# What fine-tuning changes from the base run's training settings: a shorter run, batches of 32
# conversations, no weight decay, and a short reply as the sample at each evaluation.
SFT_TRAIN = {"max_steps": 1200, "batch_size": 32, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 50,
             "lr_decay_steps": 0, "time_budget": 0.0, "weight_decay": 0.0, "eval_interval": 200, "eval_iters": 10,
             "sample_tokens": 60, "save_every": 0, "grad_accum_steps": 1}


@dataclass
class SFTResult:
    train: TrainResult
    exact_match: dict[str, float] = field(default_factory=dict)  # task -> share of held-out answers exactly right

    def to_dict(self) -> dict[str, Any]:
        return {**self.train.to_dict(), "exact_match": self.exact_match}


def sft_config(base: str, overrides: dict[str, dict[str, Any]]) -> Config:
    """The base run's config, with SFT_TRAIN and then `overrides` on top, reading conversations."""
    config = read_config(resolve_checkpoint(base)).to_dict()
    config["train"].update({**SFT_TRAIN, **overrides.get("train", {}), "init_from": str(base)})
    config["data"].update({"path": "", **overrides.get("data", {}), "chat": True})
    config["model"].update(overrides.get("model", {}))
    return Config.from_dict(config)


def check_out(base: str, out: Path) -> None:
    """The base checkpoint is never written: refuse an --out that holds it."""
    base_dir = resolve_checkpoint(base).resolve()
    if out.resolve() in (base_dir, base_dir.parent):
        raise ScratchGPTError(f"--out {out} is the base run itself: fine-tuning never writes over its base; choose another --out")


def sft(config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] | None = None, started_at: float | None = None) -> SFTResult:
    """Fine-tune `config.train.init_from` on conversations into `out_dir`; then score the held-out tasks."""
    say = log or print
    result = train(config, out_dir, resume=resume, progress=progress, log=log, started_at=started_at)
    if result.interrupted or not launched_as_main():  # under torchrun, rank 0 alone scores and writes
        return SFTResult(result)
    model, tokenizer, saved, _ = load_checkpoint(Path(out_dir) / "last")
    held_out = chat_data_from_config(saved.data, tokenizer, saved.model.block_size, log=lambda m: None).held_out
    if not held_out:
        return SFTResult(result)
    scores = exact_match(model, tokenizer, held_out)
    say("held-out exact match: " + ", ".join(f"{task} {share:.0%}" for task, share in scores.items()))
    with open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "exact_match", "step": result.steps, **scores}) + "\n")
    return SFTResult(result, scores)
