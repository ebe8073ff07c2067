"""The engine's decoding step, compiled: one fused program for the cache's masks, the model and the cache's advance.

Eager PyTorch runs a decoding step as hundreds of small operations, each dispatched from Python
(views, reshapes, a mask, a write into the cache, dropouts that do nothing at inference); at
the sizes scratchgpt trains, that overhead costs more than the arithmetic. The step's shapes
never change (the cache is preallocated, positions are tensors, every row takes part), so
`torch.compile(fullgraph=True, dynamic=False)` can trace it once and inductor can emit it as one
C++ program (`cpp_wrapper`: no Python between its kernels). Prefills keep running eager: their
length varies.

Compiling costs tens of seconds on a laptop the first time (inductor keeps the result in its
on-disk cache, so a later process takes a few seconds), so it is a choice: `Engine(model,
compile=True)`, `generate_text(..., compile=True)`, `scratchgpt sample --compile`. Where it
cannot work (no C++ compiler, an operation inductor cannot trace) the step says why once and
runs eager; tests/test_compiled.py checks that both give the same text.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch

from ..device import cpp_compiler_missing
from .cache import KVCache

_compiled: Callable | None = None  # one compiled function per process; dynamo keeps a graph per model and shape
_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its CompiledStep


def eager_step(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
               length: int | None = None) -> torch.Tensor:
    """One decoding step for every row: set the cache up, run the model, advance; last-position logits (rows, V).

    `length`: every row takes part at this length (cache.py's eager shortcut); the compiled step never passes it.
    """
    cache.decode(active, length)
    logits = model(tokens, cache=cache)[0][:, -1]  # (rows, 1) -> (rows, V)
    cache.advance()
    return logits


class CompiledStep:
    """`eager_step`, compiled on its first call; eager from then on if compiling fails, said once."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failed: str | None = None
        self.ran = False

    def __call__(self, model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
                 length: int | None = None) -> torch.Tensor:
        """The compiled step over every row (`length`, the eager path's shortcut, changes shapes: not used)."""
        if self.failed is None and not self.ran:
            self.failed = cpp_compiler_missing(tokens.device)
            if self.failed:
                self.say(f"note: {self.failed}; decoding without torch.compile")
        if self.failed is not None:
            return eager_step(model, tokens, cache, active)
        try:
            # Outside inference mode: inductor traces with plain tensors; no_grad keeps autograd out.
            with torch.inference_mode(False), torch.no_grad(), torch._inductor.config.patch(cpp_wrapper=True):
                logits = _compiled_function()(model, tokens, cache, active)
        except Exception as exc:
            if self.ran:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            self.failed = f"{type(exc).__name__}: {first_line}"
            self.say(f"note: torch.compile could not compile the decoding step ({self.failed}); decoding without it")
            return eager_step(model, tokens, cache, active)
        self.ran = True
        return logits


def _compiled_function() -> Callable:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_step, fullgraph=True, dynamic=False)
    return _compiled


def compiled_step_for(model: torch.nn.Module) -> CompiledStep:
    """The model's compiled step, kept while the model lives, so that its engines share one compile and one note."""
    if model not in _steps:
        _steps[model] = CompiledStep()
    return _steps[model]
