"""LoRA (Hu et al., 2021), written out: fine-tune a big model by training two thin matrices per layer.

A frozen linear layer `W` (out x in) gets a low-rank update beside it:

    y = W x + (alpha / r) * B (A x)          A: (r, in), B: (out, r), r much smaller than in and out

A starts random and B at zero, so at step 0 the model is exactly the base model; training moves
only A and B (r * (in + out) numbers instead of in * out). Once trained, `merge` folds the
update into the weight, W + (alpha / r) * B A, and the model is a plain GPT again (what the
exports write).

When fine-tuning adds tokens (the chat template's role tokens), the frozen embedding and head
get trainable rows for just those tokens (`NewRowsEmbedding`, `NewRowsHead`): the old rows stay
frozen, the new ones learn what the tokens mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer inside the blocks


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update, (alpha / r) * B @ A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r): zero, so the update starts at zero
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale  # (B, T, in) -> (B, T, out)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


class NewRowsEmbedding(nn.Module):
    """A frozen embedding of `base_vocab` rows, and trainable rows for the ids after them."""

    def __init__(self, base: nn.Embedding, rows: nn.Parameter):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = rows  # (n_new, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n_old = self.base.num_embeddings
        old = self.base(idx.clamp(max=n_old - 1))
        new = F.embedding((idx - n_old).clamp(min=0), self.rows)
        return torch.where((idx >= n_old).unsqueeze(-1), new, old)  # (B, T, C)


class NewRowsHead(nn.Module):
    """A frozen LM head, and trainable rows that score the new tokens: logits (B, T, V_old + n_new)."""

    def __init__(self, base: nn.Linear, rows: nn.Parameter):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = rows  # (n_new, C); the embedding's own rows when the model ties its weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(x), F.linear(x, self.rows)], dim=-1)


def new_rows_like(matrix: torch.Tensor, n_new: int) -> torch.Tensor:
    """Rows for new tokens: each the mean of the existing rows. A new token then starts as an
    average token, neither an outlier that disturbs the network nor one the head can never
    pick; fine-tuning gives it its meaning."""
    return matrix.detach().mean(dim=0, keepdim=True).repeat(n_new, 1)


def refuse_pair_table(model: nn.Module) -> None:
    """A pair embedding (bigram_embed) indexes its rows by the vocabulary's size: it cannot take new tokens."""
    if getattr(model.config, "bigram_embed", False):
        raise ConfigError("this model has bigram_embed, whose table cannot grow for new tokens (the chat role tokens): "
                          "train the base model with its final vocabulary, or without --bigram-embed")


def grow_vocab(model: nn.Module, vocab_size: int) -> None:
    """Give a plain model's embedding and head rows up to `vocab_size`, started as `new_rows_like` (full fine-tuning)."""
    wte, head = model.transformer.wte, model.lm_head
    n_new = vocab_size - wte.num_embeddings
    if n_new <= 0:
        return
    refuse_pair_table(model)
    tied = head.weight is wte.weight
    with torch.no_grad():
        wte.weight = nn.Parameter(torch.cat([wte.weight, new_rows_like(wte.weight, n_new)]))
        wte.num_embeddings = vocab_size
        head.weight = wte.weight if tied else nn.Parameter(torch.cat([head.weight, new_rows_like(head.weight, n_new)]))
        head.out_features = vocab_size
    model.config.vocab_size = vocab_size


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS,
             vocab_size: int | None = None) -> nn.Module:
    """Freeze `model` and give every linear layer whose name ends in one of `targets` a LoRA update;
    with a larger `vocab_size`, trainable rows for the new tokens. In place; returns the model."""
    if rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1, got {rank}")
    if (vocab_size or 0) > model.transformer.wte.num_embeddings:
        refuse_pair_table(model)
    model.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.split(".")[-1] in targets and name != "lm_head"]
    if not chosen:
        raise ConfigError(f"--lora-targets {','.join(targets)} names no linear layer of this model; "
                          f"use some of {', '.join(DEFAULT_TARGETS)}")
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha))
    n_new = (vocab_size or 0) - model.transformer.wte.num_embeddings
    if n_new > 0:
        _add_new_rows(model, n_new)
    return model


def _add_new_rows(model: nn.Module, n_new: int) -> None:
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    in_rows = nn.Parameter(new_rows_like(wte.weight, n_new))
    out_rows = in_rows if tied else nn.Parameter(new_rows_like(head.weight, n_new))
    model.transformer.wte = NewRowsEmbedding(wte, in_rows)
    model.lm_head = NewRowsHead(head, out_rows)
    model.config.vocab_size = wte.num_embeddings + n_new


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only: what a LoRA checkpoint holds (the base's weights stay in the base)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update and new row into plain layers, in place: a model with no LoRA left."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base
            with torch.no_grad():
                base.weight = nn.Parameter(module.merged_weight())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    if isinstance(model.transformer.wte, NewRowsEmbedding):
        _merge_new_rows(model)
    return model.requires_grad_(True)


def _merge_new_rows(model: nn.Module) -> None:
    emb, head = model.transformer.wte, model.lm_head
    tied = head.rows is emb.rows
    with torch.no_grad():
        wte = emb.base
        wte.weight = nn.Parameter(torch.cat([wte.weight, emb.rows]))
        wte.num_embeddings = wte.weight.size(0)
        plain_head = head.base
        plain_head.weight = wte.weight if tied else nn.Parameter(torch.cat([plain_head.weight, head.rows]))
        plain_head.out_features = plain_head.weight.size(0)
    model.transformer.wte, model.lm_head = wte, plain_head


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
