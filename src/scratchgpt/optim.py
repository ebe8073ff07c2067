"""Optimizers: AdamW for everything, or Muon for the blocks' matrices with AdamW for the rest.

Muon (Jordan et al., 2024) replaces each 2-D update by the nearest semi-orthogonal matrix of
its momentum (a few Newton-Schulz iterations), which trains hidden matrices faster per step
than AdamW. Embeddings, the LM head, norms and biases are not hidden matrices and stay with
AdamW. Both follow the same schedule: each parameter group carries an `lr_scale` that
multiplies the scheduled learning rate.

`Muon` here computes the same update as `torch.optim.Muon` (the reference; a test checks they
agree), written out so that it works with every torch the package supports (torch.optim.Muon
only exists in recent releases) and so that a reader can see the whole algorithm. It runs the
Newton-Schulz iterations of all matrices of one shape as one batched matmul.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from .config import TrainConfig

# The quintic Newton-Schulz coefficients of torch.optim.Muon (and of Jordan et al.'s Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of a (..., rows, cols) stack, in bfloat16.

    Scaled to unit Frobenius norm (so every singular value is at most 1), X is pushed towards
    U V^T by X <- a X + (b A + c A^2) X with A = X X^T. The iteration works on the wide
    orientation, so that A is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    flat = x.reshape(-1, *x.shape[-2:])  # (n, rows, cols): baddbmm wants exactly one batch dim
    for _ in range(steps):
        gram = flat @ flat.mT  # (n, rows, rows)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        flat = torch.baddbmm(flat, poly, flat, beta=a)  # a X + (b A + c A^2) X
    x = flat.reshape(x.shape)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, orthogonalised update, decoupled weight decay.

    The update of torch.optim.Muon (default settings), with matrices of one shape stacked.
    """

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.dim() != 2:
                        raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                ortho = newton_schulz(torch.stack(updates), group["ns_steps"], group["eps"])  # (n, rows, cols)
                # Tall matrices get a larger step, so that the update's RMS does not depend on the shape.
                scaled_lr = lr * math.sqrt(max(1.0, shape[0] / shape[1]))
                if weight_decay:
                    torch._foreach_mul_(params, 1 - lr * weight_decay)
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(ortho.unbind(0), params, strict=True)],
                                    alpha=-scaled_lr)



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


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool = True):
    """AdamW with weight decay on matrices (Linear and Embedding weights) only, not on biases or
    norms; with `optimizer="muon"`, Muon takes the matrices inside the transformer blocks.

    `fused=False` leaves AdamW's implementation to PyTorch's default, which on a CPU is a
    Python loop over the tensors: the classic recipe's optimizer, that `bench train` measures
    as its baseline."""
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
    # The fused kernel takes all tensors in one call: far less optimizer time than foreach on a CPU.
    implementation = {"fused": True} if fused and device.type in ("cuda", "cpu") else {}
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **implementation)
    if not hidden:
        return adamw
    # Muon follows the same schedule, as a multiple of it; a peak of 0 (--lr 0) freezes it too.
    muon_scale = cfg.muon_lr / cfg.learning_rate if cfg.learning_rate > 0 else 0.0
    muon = Muon(
        [{"params": hidden, "lr_scale": muon_scale}],
        lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
    )
    return MultiOptimizer(adamw, muon)


MUON_MOMENTUM_START = 0.85  # where a momentum warm-up starts (modded-nanogpt: 0.85 to 0.95 over 300 steps)


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum at `step`: rising linearly from MUON_MOMENTUM_START to `muon_momentum` over the first
    `muon_momentum_warmup` steps (a short memory while the gradients change fast), then constant."""
    if not cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    done = min(1.0, step / cfg.muon_momentum_warmup)
    return MUON_MOMENTUM_START + done * (cfg.muon_momentum - MUON_MOMENTUM_START)


def set_muon_momentum(optimizer, momentum: float) -> None:
    """Set this step's momentum on Muon's groups (AdamW's betas stay as they are)."""
    for group in optimizer.param_groups:
        if "ns_steps" in group:  # a Muon group
            group["momentum"] = momentum


def set_learning_rate(optimizer, lr: float) -> None:
    """Set this step's scheduled rate on every group, scaled by the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
