"""Sampling: pure functions of logits and an explicit generator, and the generation loop.

Each filter takes logits (..., V) and returns logits with the excluded tokens set to -inf,
so they compose in any order and can be tested on their own. `sample_next` applies
temperature, then top-k, then top-p, and draws with the caller's `torch.Generator`: the same
seed gives the same text.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row; k of None or 0 (or >= V) keeps everything."""
    if not k or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    # A token is dropped once the tokens above it already reach p; the top token always stays.
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). Temperature 0 means argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing the prompts `idx` (B, T).

    This is the plain path: a full forward pass over the (cropped) context at every step.
    """
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]  # the model sees at most block_size tokens
        logits, _ = model(context)
        next_ids = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
        idx = torch.cat([idx, next_ids[:, None]], dim=1)
        yield next_ids


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Convenience wrapper: the prompt's continuation as a string."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    ids = [int(t[0]) for t in generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator)]
    return tokenizer.decode(ids)
