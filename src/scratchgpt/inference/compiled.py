"""The engine's cached passes, compiled ahead of time: a decoding step and a prefill, each one C++
program for the cache's masks, the model and the cache's advance, built once per model shape and
kept on disk.

Eager PyTorch runs a decoding step as hundreds of small operations, each dispatched from Python
(views, reshapes, a mask, a write into the cache, dropouts that do nothing at inference); at
the sizes scratchgpt trains, that overhead costs more than the arithmetic. The cache is
preallocated and positions are tensors, so `torch.export` can trace the step once, with the
rows and the span it attends over left free, and AOTInductor can compile it into a shared
library: no Python, no guards and no graph checks between one token and the next. A prefill (a
new prompt, or the window after a jump) is exported with its length left free, for one row.

Each package takes the cache's tensors and the model's weights as inputs (the cache's are
updated in place), so one package serves every checkpoint of a shape, and weights changed in
place are the ones used. It is keyed by the pass, the model's config, the dtype, the CPU, the
torch version and the source of the files that define it, and kept under the cache directory
(`decode-steps/`): the first use compiles (tens of seconds on a laptop), later processes load
it in a fraction of a second. So it is a choice: `Engine(model, compile=True)`,
`generate_text(..., compile=True)`, `scratchgpt sample --compile`, `serve --compile`. Where it
cannot work (no C++ compiler, an operation that cannot be exported) the step says why once and
runs eager; tests/test_compiled.py checks that both give the same text.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..device import cpp_compiler_missing
from ..speed.dtype import cpu_info
from ..text import cache_dir
from .cache import KVCache

_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its CompiledStep
PACKAGES_KEPT = 8  # the newest packages stay in cache_dir()/decode-steps; older ones are deleted


def eager_step(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
               span: int | None = None) -> torch.Tensor:
    """One decoding step for every row, attending over the cache's first `span` positions (cache.py): set the
    cache up, run the model, advance; last-position logits (rows, V)."""
    cache.decode(active, span)
    return _cached_pass(model, tokens, cache)


def eager_prefill(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
    """A window of tokens (r, T) into cache rows `rows` (r,), from position 0; the last position's logits (r, V)."""
    cache.prefill(rows, tokens.size(1))
    return _cached_pass(model, tokens, cache)


def _cached_pass(model: Callable, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    logits = model(tokens, cache=cache)[0][:, -1]  # (r, T, V) -> (r, V)
    cache.advance()
    return logits


KINDS = ("decode", "prefill")
MIN_PREFILL = 3  # shorter windows prefill eager: export's shapes start at 3 tokens (a pair embedding needs T - 1 > 1)


class ExportedPass(nn.Module):
    """A cached pass as a module whose inputs are all tensors, so that torch.export can trace it:

    - "decode" (`eager_step`): tokens (rows, 1), the active rows, and a tensor whose size is the span;
    - "prefill" (`eager_prefill`): tokens (1, T) and the row they fill;

    then the cache's state (`KVCache.state`) and the model's weights. Each layer's keys and values
    are an input of their own, written in place by an indexed copy (`index_put_`), which inductor
    keeps in place; a write into a view of one tensor for all layers would be traced as a copy of
    the whole cache each step."""

    def __init__(self, model: nn.Module, kind: str, cache: KVCache):
        super().__init__()
        self.model, self.kind, self.block_size = model, kind, cache.block_size
        self.names = [name for name, _ in model.named_parameters()]
        self.lead, self.state_size = (3 if kind == "decode" else 2), len(cache.state())

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        lead, state = tensors[:self.lead], tensors[self.lead:self.lead + self.state_size]
        cache = KVCache.over(state, self.block_size)
        parameters = dict(zip(self.names, tensors[self.lead + self.state_size:], strict=True))

        def model(idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
            return torch.func.functional_call(self.model, parameters, (idx,), {"cache": cache})

        if self.kind == "decode":
            tokens, active, span = lead
            return eager_step(model, tokens, cache, active, span.size(0))
        tokens, rows = lead
        return eager_prefill(model, tokens, cache, rows)

    def dynamic_shapes(self) -> tuple:
        """The sizes left free: the cache's rows, a decoding step's span (2 to block_size: a row holds fewer than
        block_size positions), a prefill's length (MIN_PREFILL up). A free row count also lays a single row out
        as a matrix product can read it: a fixed size of 1 gets a stride of 0, which it copies first."""
        rows = torch.export.Dim("rows", min=1)
        if self.kind == "decode":
            lead = ({0: rows}, {0: rows}, {0: torch.export.Dim("span", min=2, max=self.block_size)})
        else:
            lead = ({1: torch.export.Dim("T", min=MIN_PREFILL, max=self.block_size)}, None)
        return (lead + ({0: rows},) * self.state_size + (None,) * len(self.names),)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """What to trace on: a cache of two rows (a size of 1 would be taken for a constant), a span of 2 or a
        window of MIN_PREFILL tokens, and the model's weights."""
        cache = KVCache.for_model(self.model, rows=2)
        device = cache.lengths.device
        if self.kind == "decode":
            lead = (torch.zeros(2, 1, dtype=torch.long, device=device), torch.ones(2, dtype=torch.bool, device=device),
                    torch.arange(2, device=device))
        else:
            lead = (torch.zeros(1, MIN_PREFILL, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
        return (*lead, *cache.state(), *(p.detach() for _, p in self.model.named_parameters()))


class CompiledStep:
    """The model's cached passes (a decoding step, a prefill) as AOTInductor programs, loaded (or built: that
    needs a C++ compiler) when an engine first uses them; eager from then on if that fails, said once."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failed: str | None = None
        self._programs: dict[Path, Callable] = {}  # package -> its loaded program
        self._ran: dict[Path, str] = {}  # the programs that have run, and their kind: a later failure there is a real error
        self._engine_cache: Callable[[], KVCache | None] = lambda: None  # the cache the weights were read for
        self._weights: list[torch.Tensor] = []
        self._paths: dict[str, Path] = {}  # the engine's package of each kind
        self._running: dict[str, Callable] = {}  # the engine's programs that have run, by kind

    @property
    def ran(self) -> set[str]:
        """The kinds of pass that have run compiled."""
        return set(self._ran.values())

    def __call__(self, model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
                 span: int | None = None) -> torch.Tensor:
        """The compiled decoding step over every row; eager for a span the program was not built for (the
        program does not check its inputs' sizes)."""
        span = cache.block_size if span is None else span  # an active row holds at most block_size - 1 positions
        eager = lambda: eager_step(model, tokens, cache, active, span)  # noqa: E731
        if not 2 <= span <= cache.block_size:
            return eager()
        span_tensor = cache.span_positions(span)  # the program reads only its size
        return self._run("decode", model, cache, [tokens, active, span_tensor], eager)

    def prefill(self, model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """The compiled prefill of one row's window of MIN_PREFILL tokens or more; eager for other shapes."""
        eager = lambda: eager_prefill(model, tokens, cache, rows)  # noqa: E731
        if rows.numel() != 1 or tokens.size(1) < MIN_PREFILL:
            return eager()
        return self._run("prefill", model, cache, [tokens, rows], eager)

    def _run(self, kind: str, model: nn.Module, cache: KVCache, lead: list[torch.Tensor],
             eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The `kind` program on these leading inputs (then the cache's state and the weights), or `eager`."""
        if self.failed is not None:
            return eager()
        if cache is not self._engine_cache():  # a new engine: its shape, and the weights (a merge may replace them)
            self._engine_cache = weakref.ref(cache)
            self._weights = [p.detach() for _, p in model.named_parameters()]
            self._paths = {name: package_path(model, name) for name in KINDS}
            self._running = {}
        program = self._running.get(kind)
        if program is not None:  # it has run for this engine: a failure now is a real error
            return program([*lead, *cache.state(), *self._weights])
        return self._first_run(kind, model, cache, lead, eager)

    def _first_run(self, kind: str, model: nn.Module, cache: KVCache, lead: list[torch.Tensor],
                   eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Load (or build) the program and run it; eager from now on if that fails where it never ran before."""
        path = self._paths[kind]
        try:
            program = self._programs.get(path)
            if program is None:
                program = self._programs[path] = load_program(ExportedPass(model, kind, cache), path, self.say)
            logits = program([*lead, *cache.state(), *self._weights])
        except Exception as exc:
            if path in self._ran:
                raise
            self._give_up(exc, path)
            return eager()
        self._ran[path] = kind
        self._running[kind] = program
        return logits

    def _give_up(self, exc: Exception, path: Path) -> None:
        """Run eager from now on, saying why once; a package that failed to load or run is deleted."""
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        self.failed = f"{type(exc).__name__}: {first_line}"
        self.say(f"note: the decoding step could not be compiled ({self.failed}); decoding without it")
        self._programs.pop(path, None)
        if path.suffix == ".pt2":
            path.unlink(missing_ok=True)


def load_program(exported: ExportedPass, path: Path, say: Callable[[str], None]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The pass's program for this model's shape: from `path`, or exported and compiled there now, its free sizes
    left free."""
    device = next(exported.model.parameters()).device
    if not path.exists():
        missing = cpp_compiler_missing(device)
        if missing:
            raise RuntimeError(missing)
        say(f"compiling the {exported.kind} step once for this model's shape (kept in {path.parent})")
        with torch.inference_mode(False), torch.no_grad():  # export traces plain tensors, made here
            inputs = exported.example_inputs()
            with _attention_written_out(exported.model) if exported.kind == "decode" else nullcontext():
                program = torch.export.export(exported, inputs, dynamic_shapes=exported.dynamic_shapes(), strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        os.replace(partial, path)  # whole or absent: another process may be loading the same key
        _forget_old_packages(path.parent)
    else:
        os.utime(path)  # in use: the newest packages are the ones kept
    return open_package(path, device)


@contextmanager
def _attention_written_out(model: nn.Module):
    """Attention as its formula (`manual_attention`) while a decoding step is traced: for one query over
    the cached keys inductor compiles it into a few loops, faster than calling the fused kernel
    (shakespeare-char: 801 against 757 tokens/s). The model is left as it was."""
    layers = [m for m in model.modules() if hasattr(m, "use_sdpa")]
    chosen = [m.use_sdpa for m in layers]
    try:
        for m in layers:
            m.use_sdpa = False
        yield
    finally:
        for m, use_sdpa in zip(layers, chosen, strict=True):
            m.use_sdpa = use_sdpa


def open_package(path: Path, device: torch.device) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The package's program, called with a flat list of tensors.

    PyTorch's C++ loader directly where this torch has it: `aoti_load_package` would first import
    inductor and test-compile the CPU's vector instructions (4 s on a 2-core laptop; the package
    key already names the CPU's flags), and its call flattens pytrees (0.15 ms a token)."""
    aoti = getattr(torch._C, "_aoti", None)
    if aoti is not None and hasattr(aoti, "AOTIModelPackageLoader"):
        index = -1 if device.type == "cpu" else (device.index or 0)
        try:
            loader = aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
            return lambda inputs: loader.run(inputs)[0]
        except TypeError:  # an older torch's loader takes other arguments: the public way
            pass
    package = torch._inductor.aoti_load_package(str(path))
    return lambda inputs: package(*inputs)


def package_path(model: nn.Module, kind: str = "decode") -> Path:
    """Where the `kind` pass's package for this model's shape and dtype (any number of rows), this torch and this
    code lives."""
    weight = next(model.parameters())
    described = {"kind": kind, "class": type(model).__name__, "config": asdict(model.config),
                 "dtype": str(weight.dtype), "device": weight.device.type, "torch": torch.__version__,
                 "code": _code_digest(), "cpu": _cpu(),
                 "gpu": torch.cuda.get_device_capability(weight.device) if weight.device.type == "cuda" else None}
    described["config"].pop("dropout", None)  # no dropout at inference
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache_dir() / "decode-steps" / f"{digest}.pt2"


@functools.cache
def _cpu() -> list:
    """The CPU's model and flags: a package built for other vector instructions must not load."""
    name, flags = cpu_info()
    return [name, sorted(flags)]


@functools.cache
def _code_digest() -> str:
    """A digest of the files whose code the step runs: a change to any of them builds a new package."""
    here = Path(__file__).resolve().parent.parent
    files = ("model.py", "modern.py", "inference/cache.py", "inference/compiled.py", "speed/kernels.py")
    digest = hashlib.sha256()
    for name in files:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def _forget_old_packages(folder: Path) -> None:
    finished = [p for p in folder.glob("*.pt2") if ".partial." not in p.name]  # another process's build stays
    packages = sorted(finished, key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[PACKAGES_KEPT:]:
        old.unlink(missing_ok=True)


def compiled_step_for(model: torch.nn.Module) -> CompiledStep:
    """The model's compiled step, kept while the model lives, so that its engines share one build and one note."""
    if model not in _steps:
        _steps[model] = CompiledStep()
    return _steps[model]
