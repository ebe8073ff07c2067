"""Generation's front doors: `generate` (token ids, step by step) and `generate_text` (a string),
and the naive reference they are checked against.

Both doors run the one decoding engine (inference/engine.py: a KV cache, every sample of a
prompt in one batch), the engine the server runs too. `generate_naive` is the textbook loop
written out: a full forward pass over the context for every new token, no cache. It is the
oracle the tests hold the engine to, and what `use_cache=False` (`sample --no-kv-cache`) runs.
The filters and the draw are pure functions in `filters.py`, importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .filters import repetition_penalty_filter, sample_next, top_k_filter, top_p_filter
from .inference.engine import (
    Request,
    SamplingSettings,
    default_keep,
    make_generator,
    run,
    window_start,
)
from .inference.text import CompletionChunk

__all__ = ["generate", "generate_naive", "generate_text", "repetition_penalty_filter", "sample_next", "stream_completion",
           "top_k_filter", "top_p_filter"]


@torch.inference_mode()
def generate_naive(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                   *, repetition_penalty: float = 1.0, keep: int | None = None) -> Iterator[torch.Tensor]:
    """The reference: yield the next token ids (B,) one step at a time, a full forward pass per token.

    The context window is the engine's: all tokens while they fit in block_size, then the
    last `keep` of them, growing again from there.
    """
    block_size = model.config.block_size
    keep = keep or default_keep(block_size)
    start = max(0, idx.size(1) - block_size)
    for _ in range(max_new_tokens):
        start = window_start(idx.size(1), start, block_size, keep)
        logits, _ = model(idx[:, start:])  # (B, T') -> (B, T', V)
        scores = repetition_penalty_filter(logits[:, -1], idx, repetition_penalty)  # the last position: (B, V)
        next_ids = sample_next(scores, temperature, top_k, top_p, generator)  # (B,)
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        yield next_ids


def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing the prompts `idx` (B, T).

    With the engine's KV cache by default; `use_cache=False` runs the naive reference, which
    gives the same tokens.
    """
    if not use_cache:
        yield from generate_naive(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                  repetition_penalty=repetition_penalty)
        return
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, num_samples=idx.size(0))
    settings.validate()
    # B prompts of one length decode as one request of B samples whose first prefill is per row.
    request = Request(idx[0].tolist(), settings, generator)
    request.tokens = idx.tolist()
    for output in run(model, request):
        yield torch.tensor(output.ids, device=idx.device)


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    *,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    compile: bool = False,
) -> str:
    """Convenience wrapper: the prompt's continuation as a string, ended early by a stop string.

    `compile=True` runs each decoding step as one compiled program (inference/compiled.py): tens of
    seconds the first time for a model's shape, then loaded from the cache directory in under a second.
    """
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=stop, seed=seed, use_cache=use_cache)
    chunks = stream_completion(model, tokenizer, prompt, settings, compile=compile)
    with torch.inference_mode():  # held for the whole loop, so that no step enters it again (engine.py)
        return "".join(chunk.text for step in chunks for chunk in step)


def stream_completion(model: torch.nn.Module, tokenizer, prompt: str, settings: SamplingSettings,
                      keep: int | None = None, compile: bool = False) -> Iterator[list[CompletionChunk]]:
    """The prompt's completion as the chunks of each step, in the caller's thread (CLI, generate_text).

    The prompt is encoded and the settings checked now (TokenizerError, SamplingError); the
    chunks come as the result is iterated. `settings.use_cache=False` runs the naive reference.
    """
    settings.validate()
    device = next(model.parameters()).device
    request = Request(tokenizer.encode(prompt), settings, make_generator(settings.seed, device), tokenizer)
    if not settings.use_cache:
        return completion_naive(model, request, keep)
    return (output.chunks for output in run(model, request, keep, compile) if output.chunks)


def completion_naive(model: torch.nn.Module, request: Request, keep: int | None = None):
    """A request decoded by the naive reference: its chunks of text, step by step (stream_completion's
    `use_cache=False`)."""
    s = request.settings
    idx = torch.tensor([request.prompt], device=next(model.parameters()).device).expand(s.num_samples, -1)
    steps = generate_naive(model, idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p, request.generator,
                           repetition_penalty=s.repetition_penalty, keep=keep)
    for ids in steps:
        chunks = request.take(ids.tolist(), None)
        if chunks:
            yield chunks
        if request.done:
            return
