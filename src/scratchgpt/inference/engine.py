"""The decoding engine: one object that turns prompts into tokens and text, for one caller or a whole server.

An `Engine` owns a model and a `KVCache` (cache.py) of a fixed number of rows. A `Request` is
one prompt with its `SamplingSettings` and its own `torch.Generator`; it takes `n` rows, one
per sample. `Engine.start(request)` prefills the prompt into its rows and draws the first
token; `Engine.step()` then advances every running request by one token in a single forward
pass of fixed shape (rows, 1), and returns what each request made of it (an `Output`: the new
ids, the text that became final, and whether the request is done). `generate`, `generate_text`
and `scratchgpt sample` step an engine in the caller's thread (`run`; sample.py's doors);
the server's scheduler steps one for every running request (serving/scheduler.py). The naive
reference, a full forward pass per token, is `scratchgpt.sample.generate_naive`.

**The context window.** A GPT sees at most `block_size` tokens:

- a prompt longer than `block_size` is cut to its last `block_size` tokens;
- when the text outgrows the window, the window jumps forward to keep only the most recent
  `keep` tokens (3/4 of `block_size` by default), and grows again from there.

With learned positions every cached key belongs to one position, so a moved window is
prefilled again (a jump every `block_size - keep + 1` tokens). `keep = block_size` is the
textbook sliding window, at the price of a prefill per token.

**The draw.** Every request's rows are drawn in one pass over the step's logits: penalties and
filters row by row where a request asks for them, then one softmax and one race: torch.multinomial
draws one token from `probs` as argmax(probs / e) with e ~ Exp(1) from the caller's generator, so
each request fills its rows of `e` with its own generator and one division and argmax serve every
row, bit for bit what `filters.sample_next` draws (tests/test_engine.py checks it).

**Failures stay per request.** A request whose rows go bad (a setting that overflows the
arithmetic into NaN) ends with its own `SamplingError`; every other request goes on.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device import tick
from ..errors import ScratchGPTError
from ..filters import repetition_penalty_filter, top_k_filter, top_p_filter
from .cache import KVCache
from .compiled import compiled_step_for, eager_prefill, eager_step
from .text import CompletionChunk, CompletionText


class SamplingError(ScratchGPTError, ValueError):
    """A sampling setting is out of range: a negative temperature, top_p outside (0, 1], ..."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the setting at fault, as the caller spells it


MIN_TEMPERATURE = 1e-4  # below this (but above 0, greedy), logits / temperature overflows float32
PENALTY_RANGE = (1e-3, 1e3)  # a repetition penalty beyond these drives logits to infinity
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingSettings:
    """What to generate and how: the knobs of `scratchgpt sample` and of /v1/completions."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()  # tokens that end a sample and add no text (a chat reply's <|end|>)
    num_samples: int = 1
    seed: int | None = None
    logprobs: int | None = None  # how many alternatives to report per token; None: no log-probabilities
    use_cache: bool = True  # False: the naive reference (sample.generate_naive), a full pass per token

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise SamplingError for a value out of range; `names` spells fields as the caller does (flags, JSON)."""
        def check(ok: bool, field_name: str, rule: str, value: object) -> None:
            if not ok:
                name = (names or {}).get(field_name, field_name)
                raise SamplingError(f"{name} must be {rule}, got {value!r}", name)

        low, high = PENALTY_RANGE
        check(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        check(math.isfinite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
              "temperature", f"0 (greedy) or >= {MIN_TEMPERATURE}", self.temperature)
        check(self.top_k is None or self.top_k >= 1, "top_k", ">= 1", self.top_k)
        check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1), "top_p", "in (0, 1]", self.top_p)
        check(math.isfinite(self.repetition_penalty) and low <= self.repetition_penalty <= high, "repetition_penalty",
              f"in [{low}, {high}] (1 is no penalty)", self.repetition_penalty)
        check(self.num_samples >= 1, "num_samples", ">= 1", self.num_samples)
        check(self.logprobs is None or self.logprobs >= 0, "logprobs", ">= 0", self.logprobs)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", list(self.stop))
        check(self.seed is None or SEED_RANGE[0] <= self.seed < SEED_RANGE[1], "seed",
              "an integer in [-2**63, 2**64) (what torch.Generator takes)", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p changes this request's rows before the softmax."""
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The request's own random generator: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return generator


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


@dataclass(eq=False)  # compared by identity
class Request:
    """One prompt being decoded: its settings, generator and samples, and the text they have made.

    With a tokenizer the request also turns its tokens into text (text.py: incremental decoding,
    stop strings, log-probabilities); without one (`generate`) it keeps ids only.
    """

    prompt: list[int]
    settings: SamplingSettings
    generator: torch.Generator | None = None
    tokenizer: Any = None
    deadline: float = math.inf  # time.monotonic() after which the request ends
    id: int = 0  # the caller's name for it (the server's scheduler numbers its requests)
    tokens: list[list[int]] = field(default_factory=list)  # each sample's prompt and generated tokens
    start: int = 0  # where the context window starts in `tokens`
    rows: torch.Tensor | None = None  # its rows of the engine's cache, one per sample
    row_list: list[int] = field(default_factory=list)  # the same rows, as Python ints
    generated: int = 0
    done: bool = False
    error: Exception | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise SamplingError("the prompt must not be empty", "prompt")
        self.tokens = [list(self.prompt)]  # one list for all samples until the first token
        self.text = CompletionText(self.tokenizer, self.settings) if self.tokenizer is not None else None

    @property
    def n(self) -> int:
        return self.settings.num_samples

    def take(self, ids: list[int], logits: torch.Tensor | None) -> list[CompletionChunk]:
        """Append each sample's new token; the text that became final (and the end, if the budget ran out)."""
        if len(self.tokens) < self.n:  # the first token: one prompt, n continuations
            self.tokens = [list(self.tokens[0]) for _ in range(self.n)]
        for sample, token in zip(self.tokens, ids, strict=True):
            sample.append(token)
        self.generated += 1
        chunks = self.text.feed(ids, logits) if self.text is not None else []
        if self.text is not None and self.text.done:  # every sample stopped at a stop string
            self.done = True
        elif self.generated >= self.settings.max_new_tokens:
            self.done = True
            chunks += self.text.finish("length") if self.text is not None else []
        return chunks

    def end(self, reason: str) -> list[CompletionChunk]:
        """End early (timeout: "length"; cancelled: no chunks): each open sample's last text."""
        self.done = True
        return self.text.finish(reason) if self.text is not None and reason else []


def _in_inference_mode(method):
    """Run an engine method in inference mode, entering it only if the caller has not: entering and leaving it
    costs about 15 us a step once a pass has flushed the CPU's caches (a tenth of a small model's token), so the
    loops that step an engine hold it."""
    @functools.wraps(method)
    def in_mode(self, *args):
        if torch.is_inference_mode_enabled():
            return method(self, *args)
        with torch.inference_mode():
            return method(self, *args)
    return in_mode


@dataclass
class Output:
    """What one step made of a request: each sample's new token, the text that became final, the end."""

    request: Request
    ids: list[int]  # (n,), empty if the request failed
    chunks: list[CompletionChunk]
    done: bool
    error: Exception | None = None


class Engine:
    """Decodes every started request over one cache: a prefill when a request starts or its window
    jumps, then one forward pass of shape (rows, 1) per step for all of them."""

    def __init__(self, model: torch.nn.Module, rows: int = 1, keep: int | None = None, compile: bool = False):
        """`compile`: run each decoding step as one compiled program (compiled.py), eager if that cannot work."""
        self.model = model.eval()
        self.block_size = model.config.block_size
        self.keep = keep or default_keep(self.block_size)
        if not 1 <= self.keep <= self.block_size:
            raise SamplingError(f"keep must be in [1, block_size={self.block_size}], got {self.keep}", "keep")
        self.cache = KVCache.for_model(model, rows)
        self.device = self.cache.lengths.device
        self.free_rows = list(range(rows))
        self.running: list[Request] = []
        self._noise = None  # (rows, V): the race's Exp(1) draws, one row per sample
        self._tokens = torch.zeros(rows, 1, dtype=torch.long)  # each row's newest token, on the host
        self._token_slots = self._tokens.numpy()  # the same memory, written without a tensor operation per token
        self._active: tuple[list[bool], torch.Tensor] = ([], torch.zeros(0))  # the last step's active rows, as a tensor
        compiled = compiled_step_for(model) if compile else None
        self._step = compiled or eager_step  # the forward pass of a decoding step
        self._prefill_pass = compiled.prefill if compiled else eager_prefill  # and of a window's prefill

    @property
    def rows(self) -> int:
        return self.cache.rows

    def can_start(self, request: Request) -> bool:
        return len(self.free_rows) >= request.n

    @_in_inference_mode
    def start(self, request: Request) -> Output:
        """Give the request its rows, prefill its prompt's window and draw its first tokens."""
        if request.n > self.rows:
            raise SamplingError(f"n must be <= {self.rows} (the rows of this engine), got {request.n}", "n")
        if not self.can_start(request):
            raise RuntimeError("no free rows for this request: check can_start first")
        rows = [self.free_rows.pop(0) for _ in range(request.n)]
        request.rows, request.row_list = torch.tensor(rows, device=self.device), rows
        request.start = max(0, len(request.prompt) - self.block_size)
        self.running.append(request)
        return self._prefill(request)

    @_in_inference_mode
    def step(self) -> list[Output]:
        """One token for every running request (a prefill for those whose window jumps); finished ones leave."""
        tick()  # the CPU thread count follows the machine's load (device.py)
        outputs, batch = [], []
        for request in list(self.running):
            new_start = window_start(len(request.tokens[0]), request.start, self.block_size, self.keep)
            if new_start != request.start:
                request.start = new_start
                outputs.append(self._prefill(request))
            else:
                batch.append(request)
        if batch:
            outputs += self._decode(batch)
        return outputs

    def stop(self, request: Request, reason: str = "") -> Output:
        """End a request before its budget ran out (its reader left: no reason; a timeout: "length")."""
        chunks = request.end(reason) if not request.done else []
        self._release(request)
        return Output(request, [], chunks, True)

    # --- inside a step ----------------------------------------------------------------------------

    def _prefill(self, request: Request) -> Output:
        """Run the request's window alone into its rows (one row for a new prompt, shared by its samples)."""
        window = torch.tensor([sample[request.start:] for sample in request.tokens], device=self.device)  # (r, T)
        rows = request.rows[:window.size(0)]
        logits = self._prefill_pass(self.model, window, self.cache, rows)  # (r, T) -> (r, V)
        if window.size(0) < request.n:  # a new prompt: its one prefilled row is copied to the other samples
            self.cache.copy_row(int(rows[0]), request.rows[1:])
            logits = logits.expand(request.n, -1)  # (1, V) -> (n, V)
        return self._draw(logits, [(request, slice(0, request.n))])[0]

    def _decode(self, batch: list[Request]) -> list[Output]:
        """One forward pass at shape (rows, 1): each running sample's newest token; idle rows wait."""
        active = [False] * self.rows
        for request in batch:
            for row, sample in zip(request.row_list, request.tokens, strict=True):
                self._token_slots[row, 0], active[row] = sample[-1], True
        tokens = self._tokens.to(self.device)  # (rows, 1): on a CPU, the same tensor every step
        if active != self._active[0]:  # the rows that take part change only when requests come and go
            self._active = active, torch.tensor(active, device=self.device)
        span = max(len(r.tokens[0]) - r.start for r in batch)  # the positions the longest row holds, and its new one
        logits = self._step(self.model, tokens, self.cache, self._active[1], span)  # (rows, V)
        return self._draw(logits, [(request, _rows_index(request)) for request in batch])

    def _draw(self, logits: torch.Tensor, groups: list[tuple[Request, Any]]) -> list[Output]:
        """Each request's next tokens from its rows of `logits` (R, V), as filters.sample_next draws them."""
        if all(r.settings.greedy and r.settings.repetition_penalty == 1.0 for r, _ in groups):  # argmax alone
            chosen = logits.argmax(dim=-1).tolist()
            return [self._output(request, rows, chosen, None, logits) for request, rows in groups]
        scores = logits.float().clone()  # its own copy: the penalties below write into it, the logits stay raw
        temperature, greedy = [1.0] * scores.size(0), [False] * scores.size(0)
        for request, rows in groups:
            s = request.settings
            if s.repetition_penalty != 1.0:
                previous = torch.tensor(_per_sample(request.tokens, request.n), device=scores.device)  # (n, T)
                scores = _apply(scores, rows, repetition_penalty_filter, previous, s.repetition_penalty)
            for i in _indices(rows):
                temperature[i], greedy[i] = (1.0, True) if s.greedy else (s.temperature, False)
        scores = scores / torch.tensor(temperature, device=scores.device).view(-1, 1)
        for request, rows in groups:
            s = request.settings
            if s.filtered and not s.greedy:
                scores = _apply(scores, rows, _top_k_then_top_p, s.top_k, s.top_p)
        probs = torch.softmax(scores, dim=-1)
        noise = self._noise_for(probs)
        for request, rows in groups:
            if not request.settings.greedy:
                _fill_exponential(noise, rows, request.generator)
        chosen = (probs / noise).argmax(dim=-1)
        if any(greedy):
            chosen = torch.where(torch.tensor(greedy, device=scores.device), scores.argmax(dim=-1), chosen)
        broken = probs.sum(dim=-1).isnan().tolist()  # a row the arithmetic broke (overflow to inf, then NaN)
        chosen = chosen.tolist()
        return [self._output(request, rows, chosen, broken, logits) for request, rows in groups]

    def _noise_for(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.size(0) != self.rows:  # a prefill's few rows
            return torch.ones_like(probs)
        if self._noise is None or self._noise.shape != probs.shape:
            self._noise = torch.ones_like(probs)
        return self._noise

    def _output(self, request: Request, rows, chosen: list[int], broken: list[bool] | None,
                logits: torch.Tensor) -> Output:
        index = _indices(rows)
        if broken is not None and any(broken[i] for i in index):
            request.error = SamplingError("the sampling arithmetic overflowed for these settings (NaN probabilities): "
                                          "use a temperature nearer 1 or a repetition_penalty nearer 1")
            request.done = True
            self._release(request)
            return Output(request, [], [], True, request.error)
        wanted = logits[rows].float().clone() if request.settings.logprobs is not None else None  # only when asked
        ids = [chosen[i] for i in index]
        chunks = request.take(ids, wanted)
        if request.done:
            self._release(request)
        return Output(request, ids, chunks, request.done)

    def _release(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.cache.free(request.rows)
            self.free_rows.extend(request.row_list)
            self.free_rows.sort()


def _apply(scores: torch.Tensor, rows, transform, *args) -> torch.Tensor:
    """`transform(rows' scores, *args)` in place of the request's rows: on the whole tensor when they are all of it."""
    if isinstance(rows, slice) and rows.start == 0 and rows.stop == scores.size(0):
        return transform(scores, *args)
    scores[rows] = transform(scores[rows], *args)
    return scores


def _top_k_then_top_p(scores: torch.Tensor, k: int | None, p: float | None) -> torch.Tensor:
    return top_p_filter(top_k_filter(scores, k), p)


def _rows_index(request: Request):
    """How to index the request's rows of a step's (rows, V) tensors: a slice where they are neighbours."""
    first, last = request.row_list[0], request.row_list[-1]
    return slice(first, last + 1) if last - first + 1 == len(request.row_list) else request.rows


def _indices(rows) -> list[int] | range:
    return range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()


def _per_sample(tokens: list[list[int]], n: int) -> list[list[int]]:
    """Each sample's tokens (n lists): before the first token one prompt stands for all n."""
    return tokens if len(tokens) == n else tokens * n


def _fill_exponential(noise: torch.Tensor, rows, generator: torch.Generator | None) -> None:
    """Fill the request's rows of `noise` with Exp(1) draws from its generator, as torch.multinomial draws them:
    one call for its (n, V) block, so the generator's stream fills the rows in order."""
    if isinstance(rows, slice):
        noise[rows].exponential_(1, generator=generator)
    elif rows.numel() == 1:
        noise[int(rows[0])].exponential_(1, generator=generator)
    else:  # rows that need not be neighbours: drawn as one block, then put in place
        block = torch.empty(rows.numel(), noise.size(1), device=noise.device).exponential_(1, generator=generator)
        noise.index_copy_(0, rows, block)


# --- in the caller's thread ------------------------------------------------------------------------

def run(model: torch.nn.Module, request: Request, keep: int | None = None, compile: bool = False) -> Iterator[Output]:
    """Decode one request alone, in the caller's thread: its Output step by step, until it is done."""
    engine = Engine(model, rows=request.n, keep=keep, compile=compile)
    output = engine.start(request)
    yield output
    while not request.done:
        for output in engine.step():
            yield output
    if request.error is not None:
        raise request.error


def expire(engine: Engine, now: float | None = None) -> list[Output]:
    """End the running requests past their deadline: their text so far, finished as "length"."""
    now = time.monotonic() if now is None else now
    return [engine.stop(r, "length") for r in list(engine.running) if r.deadline < now]
