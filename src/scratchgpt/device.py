"""Where the model runs: the device, autocast's dtype, torch.compile, and the CPU thread count.

Every command that runs a model (train, eval, sample, serve, bench) takes these choices from
here, so the server and the sampler need not import the training loop.

CPU threads are fitted to the cores that other programs leave free. PyTorch runs each operation on one OpenMP thread per core, and the threads wait for each
other at the end of every operation. When another program holds a core, one of our threads
keeps losing it, and the others spin at every barrier until it comes back: beside a busy
loop, two threads on two cores train less than half as fast as one (BENCHMARKS.md, "A busy
machine"). So a `ThreadGovernor` reads, about once a second, how much
CPU the rest of the machine used (the machine's busy time minus this process's own), and sets
PyTorch's thread count to the cores left free. An idle machine keeps PyTorch's default.

One governor is active per process (`governed`); the loops that run the model call `tick()`
between steps, which costs a clock read until a second has passed. With `--threads N`, or
`OMP_NUM_THREADS` set, the count is the user's and nothing adapts.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import torch
import torch.nn as nn

from .errors import ScratchGPTError

# ---------------------------------------------------------------------------------------------
# Device, autocast and compile


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScratchGPTError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ScratchGPTError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


# How far an accelerator's float32 loss and gradient norm may stray from the CPU's on one batch. Correct
# kernels differ in the last digits (summation order); a broken backend is off by tens of percent or more
# (the losses of 19.9 against 3.8 reported for Apple's MPS in LLMs-from-scratch #791).
DEVICE_TOLERANCE = 1e-2


def _pass_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(loss, gradient norm) of one float32 forward and backward pass of a copy of `model` on `device`."""
    twin = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()  # eval: no dropout, the same pass twice
    _, loss = twin(x.to(device), y.to(device))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in twin.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def verify_device(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """Refuse a device whose float32 forward and backward pass on (x, y) disagrees with the CPU's."""
    cpu_loss, cpu_norm = _pass_on(model, x, y, torch.device("cpu"))
    loss, norm = _pass_on(model, x, y, device)
    if all(math.isfinite(v) for v in (loss, norm)) and \
            abs(loss - cpu_loss) <= DEVICE_TOLERANCE * abs(cpu_loss) and abs(norm - cpu_norm) <= DEVICE_TOLERANCE * cpu_norm:
        return
    raise ScratchGPTError(
        f"{device.type} computes differently from the CPU: one float32 pass over a fixed batch gives loss {loss:.4f} and "
        f"gradient norm {norm:.4g} there, {cpu_loss:.4f} and {cpu_norm:.4g} on the CPU (more than {DEVICE_TOLERANCE:.0%} apart), "
        f"so training there would go silently wrong; train with --device cpu, or update torch (and the {device.type} "
        "driver), or pass --trust-device to train on it anyway")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an explicit `dtype` names (or CUDA's choice for auto), or None for plain float32."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float16":
        if device.type == "cpu":
            raise ScratchGPTError("--dtype float16 needs a GPU; on CPU use --dtype bfloat16 or float32")
        return torch.float16
    # auto; on a CPU it is measured instead (speed/dtype.py: autocast_for), so here it means float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def cpp_compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot work on this CPU machine (no C++ compiler), or None if it may."""
    if device.type != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error type when no compiler is found
        return f"no C++ compiler for torch.compile ({type(exc).__name__}); install g++ or set CXX"
    return None


class CompiledOrEager(nn.Module):
    """`torch.compile(model)`, falling back to `model` itself if compiling fails on the first call.

    torch.compile is lazy: a missing compiler or an unsupported operation shows up only when
    the first batch runs, in the forward pass or, for the backward graph, in the first
    backward pass. Rather than lose the run, the fallback warns once and trains eager, which
    computes the same function. Errors after a successful first call are raised as usual.
    The training step runs the backward pass through `backward`, which watches for the latter.
    """

    def __init__(self, model: nn.Module, warn: Callable[[str], None]):
        super().__init__()
        self.model = model
        self.warn = warn
        self.compiled: Callable | None = torch.compile(model)
        self.compiled_once = False
        self.backward_once = False

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                out = self.compiled(*args, **kwargs)
                self.compiled_once = True
                return out
            except Exception as exc:
                if self.compiled_once:
                    raise
                self._fall_back(exc)
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> bool:
        """`loss.backward()`; False if the compiled model's first backward pass failed, in which
        case the model has gone eager and the caller runs the batch again. Later errors are raised."""
        try:
            loss.backward()
        except Exception as exc:
            if self.compiled is None or self.backward_once:
                raise
            self._fall_back(exc)
            for param in self.model.parameters():  # no gradient has been kept before the first backward
                param.grad = None
            return False
        self.backward_once = True
        return True

    def _fall_back(self, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        self.warn(f"warning: torch.compile failed ({type(exc).__name__}: {first_line}); training without it")
        self.compiled = None


def compile_model(model: nn.Module, device: torch.device, warn: Callable[[str], None]) -> nn.Module:
    """The model to step: compiled where a compiler exists, else the eager model with a warning."""
    missing = cpp_compiler_missing(device)
    if missing:
        warn(f"warning: {missing}; training without it")
        return model
    return CompiledOrEager(model, warn)


# ---------------------------------------------------------------------------------------------
# CPU threads

INTERVAL_SECONDS = 1.0  # how often the machine's load is read
FIRST_READING_SECONDS = 0.5  # the first reading comes sooner: a short `sample` should not run half of it collapsed
FREE_SHARE = 0.6  # a core counts as free when others left at least this share of it idle


def _our_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API, every CPU
        return list(range(psutil.cpu_count() or 1))


def _busy_seconds(cpus: list[int]) -> float:
    """CPU seconds spent not idle, summed over `cpus`, since boot (every process's, ours included)."""
    per_cpu = psutil.cpu_times(percpu=True)
    total = 0.0
    for i in cpus:
        if i < len(per_cpu):
            t = per_cpu[i]
            # guest time is already inside user time on Linux; steal is a core taken by the hypervisor
            total += t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + \
                getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
    return total


def threads_for(free_cores: float, most: int) -> int:
    """How many threads `free_cores` idle cores carry: each core free for at least FREE_SHARE of its time."""
    return max(1, min(most, math.floor(free_cores + 1.0 - FREE_SHARE)))


class ThreadGovernor:
    """Keeps `torch.get_num_threads()` at the number of cores other processes leave free."""

    def __init__(self, say: Callable[[str], None] | None = None, most: int | None = None):
        self.cpus = _our_cpus()
        self.most = most or torch.get_num_threads()  # PyTorch's choice, one per core, or the caller's cap
        self.say = say or (lambda message: None)
        self.threads = self.most
        self.others = 0.0  # cores the rest of the machine used in the last reading
        self._pending_raise = 0  # readings in a row that allowed more threads
        self._noted = False
        self._last = self._reading()
        self._next = self._last[0] + FIRST_READING_SECONDS

    def _reading(self) -> tuple[float, float, float]:
        return time.monotonic(), _busy_seconds(self.cpus), time.process_time()

    def measure(self) -> float:
        """Cores the other processes used since the last reading."""
        now = self._reading()
        wall, busy, ours = (b - a for a, b in zip(self._last, now, strict=True))
        self._last = now
        return max(0.0, (busy - ours) / wall) if wall > 0 else 0.0

    def tick(self) -> None:
        """Between two steps: re-read the load once INTERVAL_SECONDS have passed, and apply the count."""
        if time.monotonic() >= self._next:
            self.adjust(self.measure())
            self._next = time.monotonic() + INTERVAL_SECONDS
        if torch.get_num_threads() != self.threads:  # the count is per thread: a server worker may not have it yet
            torch.set_num_threads(self.threads)

    def adjust(self, others: float) -> None:
        """Set the count for a machine where other processes use `others` cores.

        Fewer threads at once (each second at too many costs most of it); more threads only
        after two readings agree, so that a short lull does not bring the collapse back.
        """
        self.others = others
        target = threads_for(len(self.cpus) - others, self.most)
        if target < self.threads:
            self._pending_raise = 0
            self._set(target)
        elif target > self.threads:
            self._pending_raise += 1
            if self._pending_raise >= 2:
                self._pending_raise = 0
                self._set(target)
        else:
            self._pending_raise = 0

    def _set(self, threads: int) -> None:
        if not self._noted:
            self._noted = True
            self.say(f"note: other programs are using about {self.others:.1f} of this machine's {len(self.cpus)} cores; "
                     f"running on {threads} thread{'s' if threads > 1 else ''} instead of {self.threads} to keep pace "
                     "(the count follows the load; --threads N fixes it)")
        self.threads = threads
        torch.set_num_threads(threads)


_active: ThreadGovernor | None = None


def tick() -> None:
    """Called between steps by every loop that runs the model; does nothing unless a governor is active."""
    if _active is not None:
        _active.tick()


def governor_ceiling() -> int | None:
    """The most threads the active governor may use, or None when no governor runs (a fixed thread count)."""
    return _active.most if _active is not None else None


def adaptive(requested: int) -> bool:
    """Whether the thread count adapts: only when neither `--threads` nor OMP_NUM_THREADS chose it."""
    return requested == 0 and not os.environ.get("OMP_NUM_THREADS")


@contextmanager
def governed(requested: int = 0, say: Callable[[str], None] | None = None,
             most: int | None = None) -> Iterator[ThreadGovernor | None]:
    """Run the block with `requested` CPU threads, or, for 0, with a governor that follows the load (up to `most`).

    PyTorch's thread count is restored afterwards, so a library caller's setting survives.
    """
    global _active
    before = torch.get_num_threads()
    previous = _active
    try:
        if requested:
            torch.set_num_threads(requested)
        if adaptive(requested) and most:
            torch.set_num_threads(min(most, torch.get_num_threads()))
        _active = ThreadGovernor(say, most) if adaptive(requested) else None
        yield _active
    finally:
        _active = previous
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class SlowdownWatch:
    """Says once when a run falls far below the speed it reached earlier: the user should know why."""

    def __init__(self, say: Callable[[str], None], ratio: float = 0.5, windows: int = 3):
        self.say, self.ratio, self.windows = say, ratio, windows
        self.best = 0.0
        self.slow_windows = 0
        self.said = False

    def observe(self, tokens_per_second: float) -> None:
        """One measurement window's speed; `windows` slow ones in a row (not one evaluation's pause) warn."""
        self.best = max(self.best, tokens_per_second)
        self.slow_windows = self.slow_windows + 1 if tokens_per_second < self.ratio * self.best else 0
        if self.slow_windows >= self.windows and not self.said:
            self.said = True
            load = f" (about {_active.others:.1f} of {len(_active.cpus)} cores)" if _active else ""
            self.say(f"warning: training slowed to {tokens_per_second:,.0f} tokens/s, {tokens_per_second / self.best:.0%} of "
                     f"the {self.best:,.0f} it reached earlier: other programs are using the CPU{load}; close them if you "
                     "can, or set --threads N to the cores you know are free")


def threads_now(requested: int = 0, seconds: float = 0.5) -> int:
    """A fixed thread count for a measurement (`bench`): `requested`, or what the load allows now."""
    if not adaptive(requested):
        return requested or torch.get_num_threads()
    governor = ThreadGovernor()
    time.sleep(seconds)
    return threads_for(len(governor.cpus) - governor.measure(), governor.most)
