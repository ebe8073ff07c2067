"""Optimizers: AdamW for everything, or Muon for the blocks' matrices with AdamW for the rest.

Muon (Jordan et al., 2024; `torch.optim.Muon`) replaces each 2-D update by the nearest
semi-orthogonal matrix of its momentum (a few Newton-Schulz iterations), which trains hidden
matrices faster per step than AdamW. Embeddings, the LM head, norms and biases are not hidden
matrices and stay with AdamW. Both follow the same schedule: each parameter group carries an
`lr_scale` that multiplies the scheduled learning rate.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig


class MultiOptimizer:
    """Several torch optimizers stepped as one, so the training loop and checkpoints see one object."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for opt, part in zip(self.optimizers, state_dict["parts"], strict=True):
            opt.load_state_dict(part)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (Linear and Embedding weights) only, not on biases or
    norms; with `optimizer="muon"`, Muon takes the matrices inside the transformer blocks."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    use_muon = cfg.optimizer == "muon"
    hidden = [p for n, p in named if use_muon and p.dim() == 2 and n.startswith("transformer.h.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(
        [{"params": hidden, "lr_scale": cfg.muon_lr / cfg.learning_rate}],
        lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
    )
    return MultiOptimizer(adamw, muon)


def set_learning_rate(optimizer, lr: float) -> None:
    """Set this step's scheduled rate on every group, scaled by the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
