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
from .errors import CheckpointError

# The quintic Newton-Schulz coefficients of torch.optim.Muon (and of Jordan et al.'s Muon), the same at every step.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al., 2025, arXiv:2505.16932): one (a, b, c) per step, each the best for the
# singular values the step before leaves; as modded-nanogpt and nanochat use them, with the input's
# norm taken 2% larger. Five steps bring singular values from 1e-3 to 1 within about 0.86-1.14, where
# Newton-Schulz's five leave 0.47-1.2.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, polar_express: bool = False) -> torch.Tensor:
    """Approximately orthogonalise each matrix of a (..., rows, cols) stack, in bfloat16.

    Scaled to unit Frobenius norm (so every singular value is at most 1), X is pushed towards
    U V^T by X <- a X + (b A + c A^2) X with A = X X^T. The iteration works on the wide
    orientation, so that A is the smaller Gram matrix. `polar_express`: each step's own
    coefficients (at most five steps) instead of one quintic for all.
    """
    if polar_express and steps > len(POLAR_EXPRESS_COEFFICIENTS):
        raise ValueError(f"Polar Express has coefficients for {len(POLAR_EXPRESS_COEFFICIENTS)} steps, not {steps}")
    schedule = POLAR_EXPRESS_COEFFICIENTS[:steps] if polar_express else (NS_COEFFICIENTS,) * steps
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1.02 if polar_express else 1.0)).clamp(min=eps)
    flat = x.reshape(-1, *x.shape[-2:])  # (n, rows, cols): baddbmm wants exactly one batch dim
    for a, b, c in schedule:
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
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, polar_express: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps, polar_express=polar_express)
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
                ortho = newton_schulz(torch.stack(updates), group["ns_steps"], group["eps"],  # (n, rows, cols)
                                      group.get("polar_express", False))  # .get: a group saved before the option
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
    groups = [g for g in adamw_groups(rest, cfg) if g["params"]]
    # The fused kernel takes all tensors in one call: far less optimizer time than foreach on a CPU.
    implementation = {"fused": True} if fused and device.type in ("cuda", "cpu") else {}
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **implementation)
    if not hidden:
        return adamw
    # Muon follows the same schedule, as a multiple of it; a peak of 0 (--lr 0) freezes it too.
    muon_scale = cfg.muon_lr / cfg.learning_rate if cfg.learning_rate > 0 else 0.0
    muon = Muon(
        [{"params": hidden, "part": "muon", "lr_scale": muon_scale}],
        lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
        polar_express=cfg.muon_polar_express,
    )
    return MultiOptimizer(adamw, muon)


def adamw_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's groups: the matrices (decayed), then biases and norms (not decayed); with `embed_lr` or
    `head_lr`, the embeddings or the head get a group of their own first. Each is named by its `part`.

    Each group's `lr_scale` is its peak rate over `learning_rate`, so all of them follow one schedule.
    Without either rate the groups are the two of earlier runs, whose saved optimizer state resumes."""
    rate_of = {"embed": cfg.embed_lr, "head": cfg.head_lr}
    own = {part for part, lr in rate_of.items() if lr and cfg.learning_rate > 0}
    members: dict[str, list[torch.nn.Parameter]] = {part: [] for part in (*sorted(own), "matrices", "vectors")}
    for name, p in named:
        if p.dim() < 2:
            part = "vectors"  # biases and norms
        elif name.startswith("lm_head.") and "head" in own:
            part = "head"
        elif name.startswith(EMBEDDINGS) and "embed" in own:
            part = "embed"
        else:
            part = "matrices"
        members[part].append(p)
    return [{"params": ps, "part": part, "weight_decay": 0.0 if part == "vectors" else cfg.weight_decay,
             "lr_scale": rate_of[part] / cfg.learning_rate if part in own else 1.0} for part, ps in members.items()]


EMBEDDINGS = ("transformer.wte.", "transformer.wpe.", "transformer.bigram.")  # what `embed_lr` sets the rate of


def load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """A resumed run's optimizer state into `optimizer` (built from the run's config now), refused by name if
    its groups are not the saved ones; the config's rates and settings then apply (`--lr` and the rest may change)."""
    saved = [g for part in state["parts"] for g in part["param_groups"]] if "parts" in state else state["param_groups"]
    now = optimizer.param_groups
    if len(saved) != len(now) or any(s.get("part", n.get("part")) != n.get("part") for s, n in zip(saved, now, strict=True)):
        raise CheckpointError(f"cannot resume: the saved optimizer has the groups {[g.get('part', '?') for g in saved]}, "
                              f"this config makes {[g.get('part') for g in now]}: resume with the --embed-lr and "
                              "--head-lr the run started with")
    settings = [{k: g[k] for k in ("lr_scale", "polar_express", "weight_decay", "momentum", "betas") if k in g} for g in now]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, settings, strict=True):
        group.update(chosen)


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
