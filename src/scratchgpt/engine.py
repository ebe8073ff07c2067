"""The generation engine: KV-cached decoding beside its naive reference, batches, stop strings.

`decode` turns a prompt into a stream of `Step`s, one per new token. The cached path prefills
the prompt once into a `KVCache` and then feeds one token per step; the naive path (the
reference, `use_cache=False`) runs a full forward pass over the context at every step.

**The context window.** A GPT sees at most `block_size` tokens. Both paths use the same
window, so that greedy decoding gives the same text on both, at any length:

- a prompt longer than `block_size` is cut to its last `block_size` tokens;
- when the text outgrows the window, the window jumps forward to keep only the most recent
  `keep` tokens (3/4 of `block_size` by default), and grows again from there.

With learned positions every cached key belongs to one position, so a moved window must be
recomputed: the cached path re-prefills the `keep` tokens once per jump, then continues one
token per step (a jump every `block_size - keep + 1` tokens). `keep = block_size` is the textbook
sliding window (the last `block_size` tokens at every step), at the price of a re-prefill per
token.

Above the token level, `TextStream` turns one sequence's ids into text that is final: it
decodes the accumulated ids and releases the new suffix (a character may take several byte
tokens), holds back what could be the start of a stop string, and ends the text where a stop
string begins. `stream_completion` combines both for the CLI and the HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .device import tick
from .errors import ScratchGPTError
from .filters import repetition_penalty_filter, sample_next
from .kv_cache import KVCache
from .model import GPT, Bigram


class SamplingError(ScratchGPTError, ValueError):
    """A sampling setting is out of range: a negative temperature, top_p outside (0, 1], ..."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the setting at fault, as the caller spells it


def default_keep(block_size: int) -> int:
    """How many of the most recent tokens the window keeps when it jumps: 3/4 of block_size."""
    return max(1, 3 * block_size // 4)


def window_start(length: int, start: int, block_size: int, keep: int) -> int:
    """Where the context window starts once the text holds `length` tokens, if it started at `start`.

    The window stays put while it fits in block_size, then jumps to the last `keep` tokens.
    """
    if length - start <= block_size:
        return start
    return length - keep


@dataclass
class Step:
    """One decoding step: the chosen token of each sequence and the raw logits it was drawn from."""

    ids: torch.Tensor  # (N,)
    logits: torch.Tensor  # (N, V), before penalties, temperature and filters


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
    keep: int | None = None,
    cancel: threading.Event | None = None,
    step_lock: contextlib.AbstractContextManager | None = None,
) -> Iterator[Step]:
    """Continue the prompts idx (B, T) token by token, yielding one `Step` per new token.

    With num_samples > 1, a single prompt (B = 1) is prefilled once and continued num_samples
    times in one batch. `cancel` stops the loop between steps; `step_lock` is held around
    each forward pass (a server shares one model between threads).
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise SamplingError("the prompt must hold at least one token")
    if num_samples > 1 and idx.size(0) != 1:
        raise SamplingError(f"num_samples > 1 needs a single prompt, got a batch of {idx.size(0)}")
    block_size = model.config.block_size
    keep = keep or default_keep(block_size)
    if not 1 <= keep <= block_size:
        raise SamplingError(f"keep must be in [1, block_size={block_size}], got {keep}")
    # A bigram's next-token logits depend on the last token alone: there is nothing to cache.
    last_token_only = isinstance(model, Bigram)
    cached = use_cache and isinstance(model, GPT) and not last_token_only
    lock = step_lock or contextlib.nullcontext()
    tokens = idx  # (B, T), grows by one column per step
    start = max(0, tokens.size(1) - block_size)
    cache: KVCache | None = None
    cache_start = -1  # where the cached window starts; -1: nothing cached yet
    for step in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        start = window_start(tokens.size(1), start, block_size, keep)
        with lock:
            tick()  # the CPU thread count follows the machine's load (device.py)
            if last_token_only:
                logits = model(tokens[:, -1:])[0][:, -1]  # (B, 1) -> (B, V)
            elif not cached:  # the reference: the whole window, every step
                logits = model(tokens[:, start:])[0][:, -1]  # (B, T') -> (B, V)
            elif cache_start == start:  # the window holds: one new token
                logits = model(tokens[:, -1:], cache=cache)[0][:, -1]  # (B, 1) -> (B, V)
            else:  # first step, or the window jumped: fill the cache with the window once
                if cache is None:
                    cache = KVCache.for_model(model, tokens.size(0))
                cache.reset()
                cache_start = start
                logits = model(tokens[:, start:], cache=cache)[0][:, -1]  # (B, T') -> (B, V)
        if step == 0 and num_samples > 1:  # one prefill, num_samples continuations
            tokens = tokens.expand(num_samples, -1)  # (1, T) -> (N, T)
            logits = logits.expand(num_samples, -1)  # (1, V) -> (N, V)
            if cache is not None:
                cache = cache.repeat(num_samples)
        scores = repetition_penalty_filter(logits, tokens, repetition_penalty)
        next_ids = sample_next(scores, temperature, top_k, top_p, generator)  # (N,)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        yield Step(next_ids, logits)


# ---------------------------------------------------------------------------------------------
# Text: incremental decoding and stop strings


def find_stop(text: str, stops: Sequence[str], begin: int = 0) -> int | None:
    """Index in text where the earliest stop string starts (searching from `begin`), or None."""
    found = [i for s in stops if s and (i := text.find(s, begin)) >= 0]
    return min(found) if found else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string: text that must wait."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


@dataclass
class TextChunk:
    """Text that has become final, and the indices of the tokens whose text begins in it."""

    text: str
    tokens: range


class TextStream:
    """One sequence's generated text, released as it becomes final, ended by a stop string.

    Every step decodes all the ids so far and releases the new suffix, so a character made of
    several tokens appears whole. An unfinished character (decoded as U+FFFD) and a possible
    beginning of a stop string wait; the stop string itself is never part of the text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.offsets: list[int] = []  # where each token's text begins in the generated text
        self.text = ""  # the decoded text, possibly beyond what was released
        self.released = 0  # characters of text released so far
        self.released_tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> TextChunk:
        """Add one generated token; return the text (maybe empty) that became final."""
        if self.finish_reason is not None:
            raise RuntimeError("this text has already ended")
        self.offsets.append(len(self.text))
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        longest_stop = max((len(s) for s in self.stop), default=0)
        cut = find_stop(self.text, self.stop, begin=max(0, self.released - longest_stop + 1))
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
            return self._release(cut)
        final = len(self.text) - partial_stop_length(self.text, self.stop)
        while final > self.released and self.text[final - 1] == "\ufffd":  # a character still incomplete
            final -= 1
        return self._release(final)

    def finish(self, reason: str = "length") -> TextChunk:
        """End the text (the token budget ran out): release everything still held."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._release(len(self.text), all_tokens=self.finish_reason != "stop")

    def _release(self, end: int, all_tokens: bool = False) -> TextChunk:
        text = self.text[self.released:end]
        self.released = max(self.released, end)
        first = self.released_tokens
        last = len(self.ids) if all_tokens else first
        if not all_tokens:
            while last < len(self.ids) and self.offsets[last] < self.released:
                last += 1
        self.released_tokens = last
        return TextChunk(text, range(first, last))


# ---------------------------------------------------------------------------------------------
# Completions: settings, per-token details, the stream the CLI and the server read


@dataclass
class SamplingSettings:
    """What to generate and how: the knobs of `scratchgpt sample` and of /v1/completions."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    num_samples: int = 1
    seed: int | None = None
    logprobs: int | None = None  # how many alternatives to report per token; None: no log-probabilities
    use_cache: bool = True

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise SamplingError for a value out of range; `names` spells fields as the caller does (flags, JSON)."""
        def name(field_name: str) -> str:
            return (names or {}).get(field_name, field_name)

        def check(ok: bool, field_name: str, rule: str, value: object) -> None:
            if not ok:
                raise SamplingError(f"{name(field_name)} must be {rule}, got {value!r}", name(field_name))

        check(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", ">= 0 (0 is greedy)", self.temperature)
        check(self.top_k is None or self.top_k >= 1, "top_k", ">= 1", self.top_k)
        check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1), "top_p", "in (0, 1]", self.top_p)
        check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
              "> 0 (1 is no penalty)", self.repetition_penalty)
        check(self.num_samples >= 1, "num_samples", ">= 1", self.num_samples)
        check(self.logprobs is None or self.logprobs >= 0, "logprobs", ">= 0", self.logprobs)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", list(self.stop))


@dataclass
class TokenDetail:
    """One generated token as the model saw it: its text, log-probability and the top alternatives."""

    text: str
    offset: int  # where its text begins in the generated text
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token text -> log-probability


@dataclass
class CompletionChunk:
    """New final text of one sample, the details of its tokens, and why it ended (once it has)."""

    index: int
    text: str
    tokens: list[TokenDetail]
    finish_reason: str | None = None
    generated: int = 0  # tokens this sample has generated so far


def _token_details(tokenizer, step: Step, row: int, offset: int, n_top: int) -> TokenDetail:
    """Log-probabilities of the model's own distribution (before temperature, penalties, filters)."""
    logprobs = torch.log_softmax(step.logits[row].float(), dim=-1)  # (V,)
    chosen = int(step.ids[row])
    values, ids = torch.topk(logprobs, min(n_top, logprobs.numel()))
    top = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids, strict=True)}
    top.setdefault(tokenizer.decode([chosen]), float(logprobs[chosen]))  # the chosen one is always listed
    return TokenDetail(tokenizer.decode([chosen]), offset, float(logprobs[chosen]), top)


def stream_completion(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    settings: SamplingSettings,
    *,
    cancel: threading.Event | None = None,
    step_lock: contextlib.AbstractContextManager | None = None,
    on_token=None,
    decoder=None,
) -> Iterator[list[CompletionChunk]]:
    """Yield, step by step, the chunks of new text of the samples that have some, then each sample's last chunk.

    The prompt is encoded and the decoding submitted now (an unknown character raises
    TokenizerError, a full server ServerBusy); the chunks come as the result is iterated.
    `decoder` has engine.decode's signature without the model (default: engine.decode on
    `model`; the server passes its batching Scheduler's). `on_token(n)` is called after each
    decoding step with the number of tokens it produced.
    """
    settings.validate()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed) if settings.seed is not None else generator.seed()
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, T)
    if idx.size(1) == 0:
        raise SamplingError("the prompt must not be empty")
    decoder = decoder or functools.partial(decode, model)
    steps = decoder(idx, settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                    top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, generator=generator,
                    num_samples=settings.num_samples, use_cache=settings.use_cache, cancel=cancel, step_lock=step_lock)
    return _completion_chunks(tokenizer, settings, steps, cancel, on_token)


class CompletionText:
    """The samples' text as decoding steps arrive: each step's new final text, cut at stop strings."""

    def __init__(self, tokenizer, settings: SamplingSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.streams = [TextStream(tokenizer, settings.stop) for _ in range(settings.num_samples)]
        self.details: list[list[TokenDetail]] = [[] for _ in self.streams]

    @property
    def done(self) -> bool:
        """Every sample has ended at a stop string."""
        return all(s.finish_reason is not None for s in self.streams)

    def feed(self, step: Step) -> list[CompletionChunk]:
        """The chunks of new text (and token details) this step makes final, one per sample that has some."""
        chunks = []
        for i, stream in enumerate(self.streams):
            if stream.finish_reason is not None:  # ended at a stop string; its batch row runs on unused
                continue
            if self.settings.logprobs is not None:
                self.details[i].append(_token_details(self.tokenizer, step, i, len(stream.text), self.settings.logprobs))
            chunk = stream.add(int(step.ids[i]))
            if chunk.text or chunk.tokens or stream.finish_reason:
                chunks.append(_completion_chunk(i, chunk, self.details[i], stream))
        return chunks

    def finish(self) -> list[CompletionChunk]:
        """The last chunk of each sample that has not ended at a stop string: the token budget ran out."""
        return [_completion_chunk(i, s.finish(), self.details[i], s) for i, s in enumerate(self.streams)
                if s.finish_reason is None]


def _completion_chunks(tokenizer, settings: SamplingSettings, steps: Iterator[Step], cancel: threading.Event | None,
                       on_token) -> Iterator[list[CompletionChunk]]:
    """The text of each decoding step, per sample, cut at stop strings; then each sample's last chunk."""
    text = CompletionText(tokenizer, settings)
    try:
        for step in steps:
            chunks = text.feed(step)
            if on_token is not None:
                on_token(settings.num_samples)
            if chunks:
                yield chunks
            if text.done:
                return
    finally:
        steps.close()
    if cancel is not None and cancel.is_set():
        return
    yield text.finish()


def _completion_chunk(index: int, chunk: TextChunk, details: list[TokenDetail], stream: TextStream) -> CompletionChunk:
    tokens = [details[t] for t in chunk.tokens if t < len(details)]  # no details unless logprobs were asked for
    return CompletionChunk(index, chunk.text, tokens, stream.finish_reason, len(stream.ids))
