"""The engine's decoding step, compiled ahead of time: one C++ program for the cache's masks, the model and the
cache's advance, built once per model shape and kept on disk.

Eager PyTorch runs a decoding step as hundreds of small operations, each dispatched from Python
(views, reshapes, a mask, a write into the cache, dropouts that do nothing at inference); at
the sizes scratchgpt trains, that overhead costs more than the arithmetic. The step's shapes
never change (the cache is preallocated, positions are tensors, every row takes part), so
`torch.export` can trace it once and AOTInductor can compile it into a shared library: no
Python, no guards and no graph checks between one token and the next. Prefills keep running
eager: their length varies.

The package takes the cache's tensors and the model's weights as inputs (the cache's are
updated in place), so one package serves every checkpoint of a shape, and weights changed in
place are the ones used. It is keyed by the model's config, the rows, the dtype, the torch
version and the source of the files that define the step, and kept under the cache directory
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
               length: int | None = None) -> torch.Tensor:
    """One decoding step for every row: set the cache up, run the model, advance; last-position logits (rows, V).

    `length`: every row takes part at this length (cache.py's eager shortcut); the compiled step never passes it.
    """
    cache.decode(active, length)
    logits = model(tokens, cache=cache)[0][:, -1]  # (rows, 1) -> (rows, V)
    cache.advance()
    return logits


class ExportedStep(nn.Module):
    """`eager_step` as a module whose inputs are all tensors: the tokens, the active rows, the cache's state
    (`KVCache.state`) and the model's weights (by `names`), so that torch.export can trace it.

    Each layer's keys and values are an input of their own, written in place by an indexed copy
    (`index_put_`), which inductor keeps in place; a write into a view of one tensor for all layers
    would be traced as a copy of the whole cache each step."""

    def __init__(self, model: nn.Module, names: list[str], cache: KVCache):
        super().__init__()
        self.model, self.names, self.layers, self.block_size = model, names, len(cache.keys), cache.block_size

    def forward(self, tokens, active, lengths, last_tokens, *tensors) -> torch.Tensor:
        keys, values, weights = tensors[:self.layers], tensors[self.layers:2 * self.layers], tensors[2 * self.layers:]
        cache = KVCache.over(keys, values, lengths, last_tokens, self.block_size)
        cache.decode(active)
        logits = torch.func.functional_call(self.model, dict(zip(self.names, weights, strict=True)), (tokens,),
                                            {"cache": cache})[0][:, -1]
        cache.advance()
        return logits


class CompiledStep:
    """The model's decoding step as an AOTInductor program, loaded (or built: that needs a C++ compiler)
    when an engine first steps; eager from then on if that fails, said once."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failed: str | None = None
        self._programs: dict[Path, Callable] = {}  # package -> its loaded program
        self._ran: set[Path] = set()  # the programs that have run: a later failure there is a real error
        self._engine_cache: Callable[[], KVCache | None] = lambda: None  # the cache the weights were read for
        self._weights: list[torch.Tensor] = []
        self._path = Path()

    @property
    def ran(self) -> bool:
        return bool(self._ran)

    def __call__(self, model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
                 length: int | None = None) -> torch.Tensor:
        """The compiled step over every row (`length`, the eager path's shortcut, changes shapes: not used)."""
        if self.failed is not None:
            return eager_step(model, tokens, cache, active)
        if cache is not self._engine_cache():  # a new engine: its shape, and the weights (a merge may replace them)
            self._engine_cache = weakref.ref(cache)
            self._weights = [p.detach() for _, p in model.named_parameters()]
            self._path = package_path(model, cache)
        try:
            program = self._programs.get(self._path)
            if program is None:
                program = self._programs[self._path] = load_program(model, tokens, cache, active, self._path, self.say)
            logits = program([tokens, active, *cache.state(), *self._weights])
        except Exception as exc:
            if self._path in self._ran:
                raise
            self._give_up(exc)
            return eager_step(model, tokens, cache, active)
        self._ran.add(self._path)
        return logits

    def _give_up(self, exc: Exception) -> None:
        """Decode eager from now on, saying why once; a package that failed to load or run is deleted."""
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        self.failed = f"{type(exc).__name__}: {first_line}"
        self.say(f"note: the decoding step could not be compiled ({self.failed}); decoding without it")
        self._programs.pop(self._path, None)
        if self._path.suffix == ".pt2":
            self._path.unlink(missing_ok=True)


def load_program(model: nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor, path: Path,
                 say: Callable[[str], None]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The step's program for this model's shape and the cache's rows: from `path`, or exported and compiled there now."""
    names = [name for name, _ in model.named_parameters()]
    if not path.exists():
        missing = cpp_compiler_missing(tokens.device)
        if missing:
            raise RuntimeError(missing)
        say(f"compiling the decoding step once for this model's shape (kept in {path.parent})")
        weights = [p.detach() for _, p in model.named_parameters()]
        with torch.inference_mode(False), torch.no_grad():  # export traces plain tensors: copies, made here
            inputs = [t.clone() for t in (tokens, active, *cache.state())]
            program = torch.export.export(ExportedStep(model, names, cache), (*inputs, *weights), strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        os.replace(partial, path)  # whole or absent: another process may be loading the same key
        _forget_old_packages(path.parent)
    else:
        os.utime(path)  # in use: the newest packages are the ones kept
    return open_package(path, cache.lengths.device)


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


def package_path(model: nn.Module, cache: KVCache) -> Path:
    """Where the package for this model's shape, the cache's rows and dtype, this torch and this code lives."""
    weight = next(model.parameters())
    described = {"class": type(model).__name__, "config": asdict(model.config), "rows": cache.rows,
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
