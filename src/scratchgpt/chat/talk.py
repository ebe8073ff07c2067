"""Replies from a chat model, on the one decoding engine: a conversation in, the assistant's next turn out.

The prompt is the conversation rendered by the template with `<|assistant|>` at the end; the
reply ends at the model's `<|end|>` (a stop token: it adds no text) or at the token budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from ..inference.engine import Engine, Request, SamplingSettings, make_generator, run
from ..inference.text import CompletionChunk
from ..tokenizer import Tokenizer
from .tasks import Example, is_correct
from .template import CHAT_TOKENS, ChatError, Message, render


def reply_settings(tokenizer: Tokenizer, settings: SamplingSettings) -> SamplingSettings:
    """`settings`, ending each sample at the end-of-turn token (or at a role token: the model starting another turn)."""
    return dataclasses.replace(settings, stop_ids=(*settings.stop_ids, *(tokenizer.special_id(t) for t in CHAT_TOKENS)))


def prompt_ids(messages: Sequence[Message], tokenizer: Tokenizer, block_size: int, room: int,
               trim: bool = False) -> list[int]:
    """The rendered conversation, asking for a reply, leaving `room` tokens of the context for it (or a quarter
    of the context, if less: the reply then ends where the context does).

    Too long: with `trim`, the oldest turns after any system message are dropped until it fits
    (a terminal chat's history); without, ChatError (the server's 400).
    """
    messages = list(messages)
    budget = block_size - min(room, max(1, block_size // 4))  # at least a quarter of the context is kept for the reply
    ids = render(messages, tokenizer, add_generation_prompt=True).ids
    while trim and len(ids) > budget:
        first = 1 if messages and messages[0].role == "system" else 0
        if len(messages) - first <= 1:
            break
        del messages[first]
        ids = render(messages, tokenizer, add_generation_prompt=True).ids
    if len(ids) > budget:
        raise ChatError(f"the conversation is {len(ids)} tokens long with the template, but this model's context of "
                        f"{block_size} tokens leaves at most {budget} for it (the rest is for the reply); "
                        "send a shorter conversation or fewer turns")
    return ids


def reply_request(messages: Sequence[Message], tokenizer: Tokenizer, block_size: int, settings: SamplingSettings,
                  trim: bool = False) -> tuple[list[int], SamplingSettings]:
    """The prompt's ids, and `settings` ending at <|end|> with the reply kept inside the context: a reply never
    pushes the start of its conversation out of the window."""
    settings = reply_settings(tokenizer, settings)
    ids = prompt_ids(messages, tokenizer, block_size, settings.max_new_tokens, trim)
    return ids, dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, block_size - len(ids)))


def stream_reply(model: torch.nn.Module, tokenizer: Tokenizer, messages: Sequence[Message], settings: SamplingSettings,
                 trim: bool = False) -> Iterator[list[CompletionChunk]]:
    """The assistant's reply as the chunks of each step, in the caller's thread (`scratchgpt chat`)."""
    settings.validate()
    ids, settings = reply_request(messages, tokenizer, model.config.block_size, settings, trim)
    device = next(model.parameters()).device
    request = Request(ids, settings, make_generator(settings.seed, device), tokenizer)
    return (output.chunks for output in run(model, request) if output.chunks)


@torch.inference_mode()
def greedy_replies(model: torch.nn.Module, tokenizer: Tokenizer, conversations: list[list[Message]],
                   max_new_tokens: int = 24, rows: int = 32) -> list[str]:
    """Each conversation's greedy reply, `rows` of them decoded together."""
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    parts = [reply_request(c, tokenizer, model.config.block_size, greedy, trim=True) for c in conversations]
    requests = [Request(ids, settings, None, tokenizer) for ids, settings in parts]
    texts = {id(r): [] for r in requests}
    engine, waiting = Engine(model, rows=min(rows, max(1, len(requests)))), list(requests)
    while waiting or engine.running:
        while waiting and engine.can_start(waiting[0]):
            outputs = [engine.start(waiting.pop(0))]
            _collect(outputs, texts)
        _collect(engine.step() if engine.running else [], texts)
    return ["".join(texts[id(r)]) for r in requests]


def _collect(outputs, texts: dict[int, list[str]]) -> None:
    for output in outputs:
        texts[id(output.request)] += [chunk.text for chunk in output.chunks]


def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, examples: list[Example], per_task: int = 200) -> dict[str, float]:
    """Per task, the share of up to `per_task` held-out examples whose greedy reply is the answer."""
    scores = {}
    for task in sorted({e.task for e in examples}):
        chosen = [e for e in examples if e.task == task]
        chosen = chosen[:: max(1, len(chosen) // per_task)][:per_task]  # spread over the alphabet
        replies = greedy_replies(model, tokenizer, [[Message("user", e.prompt)] for e in chosen])
        scores[task] = sum(is_correct(r, e.answer) for r, e in zip(replies, chosen, strict=True)) / len(chosen)
    return scores
