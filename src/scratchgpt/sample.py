"""Generation's front doors: `generate` (token ids, step by step) and `generate_text` (a string).

Both run the decoding loop of `engine.py` (KV-cached, or the naive reference). The filters
and the draw they apply to the logits are pure functions in `filters.py`, importable from
here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .engine import SamplingSettings, decode, stream_completion
from .filters import repetition_penalty_filter, sample_next, top_k_filter, top_p_filter

__all__ = ["generate", "generate_text", "repetition_penalty_filter", "sample_next", "top_k_filter", "top_p_filter"]


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

    With the KV cache by default; `use_cache=False` runs the naive reference (a full forward
    pass over the context at every step), which gives the same tokens.
    """
    for step in decode(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, generator=generator, use_cache=use_cache):
        yield step.ids


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
) -> str:
    """Convenience wrapper: the prompt's continuation as a string, ended early by a stop string."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=stop, seed=seed, use_cache=use_cache)
    return "".join(chunk.text for chunks in stream_completion(model, tokenizer, prompt, settings) for chunk in chunks)
