"""Data parallelism through torchrun: one process per device, gradients averaged by DDP.

`torchrun --nproc_per_node N -m scratchgpt train ...` sets RANK, LOCAL_RANK and WORLD_SIZE
in each process's environment; `setup()` reads them and joins the process group (gloo on
CPU, NCCL on CUDA). Without them, training runs as a single process and nothing here
changes its behaviour.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_joined = False  # whether setup() joined a process group in this process


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process logs, evaluates into files and saves checkpoints."""
        return self.rank == 0


def launched_as_main() -> bool:
    """True unless this process is a non-zero rank started by torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun; return the context and this rank's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext(), device
    ctx = DistributedContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    global _joined
    _joined = True
    return ctx, device


def exit_if_joined(code: int) -> None:
    """End this process now with `code`, skipping Python's shutdown, if it joined a process group.

    gloo runs each collective on a C++ worker thread, which lets go of the collective's
    tensors a moment after the collective has returned; letting go of a tensor that Python
    also knew takes the GIL. If the main thread has begun shutting the interpreter down by
    then, that thread cannot take the GIL and the process aborts (std::terminate, SIGABRT),
    although the run finished and saved everything (now and then, more often on a loaded
    machine; docs/distributed.md has the rates seen). Ending without the shutdown
    cannot hit it. The CLI calls this last, when its files are closed; the streams are flushed here.
    """
    if not _joined:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def teardown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], ctx: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise sum of a few numbers over all processes (one collective)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every process's `obj`, in rank order (small Python objects such as RNG states)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
