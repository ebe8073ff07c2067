"""Continuous batching for the server: one forward pass advances every running sequence.

On a CPU a decoding step is bound by reading the weights, so sixteen sequences in one pass
cost little more than one. A `Scheduler` thread owns the model and a `SlotCache` of a fixed
number of slots. Between steps it retires finished, cancelled and timed-out requests at once,
and admits waiting ones: each is prefilled alone (its prompt window, batch of its `n`
samples) into free slots, and its first token is drawn from that prefill. Every step then runs
the model once at the fixed shape (slots, 1), idle slots padded, and each request draws its
next tokens from its own rows with its own generator, penalties and filters, exactly as
`engine.decode` does. When a sequence outgrows block_size its window jumps as in
`engine.decode`: its last `keep` tokens are prefilled again.

Because the step's shape never changes and rows do not mix, a request's arithmetic is the same
whether it runs alone or beside fifteen others: the same seed gives the same text
(tests/test_batching.py checks it token for token).

Requests beyond the free slots wait, up to `max_waiting`; beyond that `decode` raises
`ServerBusy` (the server answers 429).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .device import tick
from .engine import SamplingError, Step, default_keep, window_start
from .errors import ScratchGPTError
from .filters import repetition_penalty_filter, sample_next
from .kv_cache import KVCache, SlotCache

DEFAULT_SLOTS = 16
DEFAULT_MAX_WAITING = 32
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds a request may run before it is ended
RETRY_AFTER_S = 1.0  # what a 429 asks a client to wait: a slot frees within a second at these sizes


class ServerBusy(ScratchGPTError):
    """Every slot is taken and the waiting line is full: the caller should retry later (HTTP 429)."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStopped(ServerBusy):
    """The scheduler is gone (shut down, or its process died): no request can run (HTTP 503)."""

    status = 503


END = object()  # put on a request's queue when it has no more steps


@dataclass(eq=False)  # compared by identity
class _Request:
    """One submitted completion: its tokens so far, its sampling settings, where its steps go."""

    tokens: list[list[int]]  # prompt and generated tokens of each sample (one list for all until the first token)
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    generator: torch.Generator | None
    keep: int
    cancel: threading.Event
    deadline: float
    n: int = 1
    start: int = 0  # where the context window starts in `tokens`
    slots: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None  # the slots as an index tensor
    generated: int = 0
    out: queue.Queue = field(default_factory=queue.Queue)
    abandoned: threading.Event = field(default_factory=threading.Event)  # its reader stopped before the end
    listeners: list = field(default_factory=list)  # called (from the scheduler's thread) after each item sent

    def send(self, item) -> None:
        """Hand a step (or the end, or an error) to the reader."""
        self.out.put(item)
        for listener in self.listeners:
            listener()

    def window(self, device: torch.device) -> torch.Tensor:
        """The tokens of the context window, (rows, T'): one row before the first token, n after."""
        return torch.tensor([sample[self.start:] for sample in self.tokens], dtype=torch.long, device=device)

    def emit(self, logits: torch.Tensor) -> None:
        """Draw each sample's next token from its logits (n, V) exactly as engine.decode does, and hand the step out."""
        previous = None
        if self.repetition_penalty != 1.0:  # before the first token one prompt stands for the n samples
            previous = torch.tensor(self.tokens * (logits.size(0) // len(self.tokens)), device=logits.device)  # (n, T)
        scores = repetition_penalty_filter(logits, previous, self.repetition_penalty)
        self.take(sample_next(scores, self.temperature, self.top_k, self.top_p, self.generator), logits)

    def take(self, next_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Append the drawn tokens (n,) to the samples and hand the step out."""
        if len(self.tokens) < self.n:  # the first token: one prompt, n continuations
            self.tokens = [list(self.tokens[0]) for _ in range(self.n)]
        for sample, token in zip(self.tokens, next_ids.tolist(), strict=True):
            sample.append(token)
        self.generated += 1
        self.send(Step(next_ids, logits))

    @property
    def plain(self) -> bool:
        """Sampling at a temperature and nothing else: no penalty, top-k or top-p to apply row by row."""
        return (self.temperature > 0 and self.repetition_penalty == 1.0 and self.top_k is None
                and (self.top_p is None or self.top_p >= 1.0))

    @property
    def done(self) -> bool:
        return (self.generated >= self.max_new_tokens or self.cancel.is_set() or self.abandoned.is_set()
                or time.monotonic() > self.deadline)


class Scheduler:
    """Runs every submitted completion of one model in shared forward passes, on its own thread."""

    def __init__(self, model: torch.nn.Module, slots: int = DEFAULT_SLOTS, max_waiting: int = DEFAULT_MAX_WAITING,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, on_step: Callable[[], None] | None = None):
        """`on_step()`, if given, is called on the scheduler's thread after each step has handed out its tokens."""
        self.model = model.eval()
        self.on_step = on_step
        self.cache = SlotCache.for_model(model, slots)
        self._prefill_caches: dict[int, KVCache] = {}  # by rows: a window jump's prefill reuses one
        self._race: torch.Tensor | None = None  # (slots, V): the plain requests' exponential draws (_batched_step)
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self.free = list(range(slots))
        self.running: list[_Request] = []
        self.waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scratchgpt-scheduler", daemon=True)
        self._thread.start()

    # --- what callers use ---------------------------------------------------------------------

    def decode(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
               num_samples: int = 1, keep: int | None = None, cancel: threading.Event | None = None,
               **_ignored) -> StepReader:
        """Like engine.decode, for one prompt (1, T): queue it now (ServerBusy if the line is full), yield its steps."""
        if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
            raise SamplingError("a batched request is one prompt of at least one token")
        if num_samples > self.cache.slots:
            raise SamplingError(f"n must be <= {self.cache.slots} (this server's slots), got {num_samples}", "n")
        block_size = self.model.config.block_size
        request = _Request(idx.tolist(), max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                           generator, keep or default_keep(block_size), cancel or threading.Event(),
                           time.monotonic() + self.request_timeout, n=num_samples,
                           start=max(0, idx.size(1) - block_size))
        with self._wake:
            if self._closed:
                raise SchedulerStopped("the server is shutting down", retry_after=5.0)
            slot_free = not self.waiting and len(self.free) >= num_samples  # it will run at the next step
            if not slot_free and len(self.waiting) >= self.max_waiting:
                raise ServerBusy(f"all {self.cache.slots} slots are busy and {len(self.waiting)} requests wait; "
                                 "try again shortly", retry_after=RETRY_AFTER_S)
            self.waiting.append(request)
            self._wake.notify()
        return StepReader(request)

    @property
    def slots(self) -> int:
        """How many samples run at once: the rows of every step."""
        return self.cache.slots

    @property
    def stopped(self) -> str | None:
        """Why no request can run any more, or None while the scheduler serves."""
        return "the server is shutting down" if self._closed else None

    def load(self) -> dict[str, int]:
        """What /health shows of the scheduler: requests running and waiting, and the slots."""
        with self._wake:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.cache.slots}

    def close(self) -> None:
        """Stop the thread: running and waiting requests end where they are."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self.running and not self.waiting:
                        self._wake.wait()
                    if self._closed:
                        break
                tick()  # the CPU thread count follows the machine's load (device.py)
                try:
                    self._step()
                except Exception as exc:  # a bug must not leave readers waiting forever
                    for request in self.running:
                        request.send(exc)
                    self._retire(list(self.running))
                if self.on_step is not None:
                    self.on_step()
        self._retire(list(self.running) + list(self.waiting))
        if self.on_step is not None:
            self.on_step()

    def _step(self) -> None:
        """Retire, admit, then one forward pass for every running sequence whose window holds."""
        self._retire([r for r in self.running if r.done])
        admitted = self._admit()
        batch = []
        for request in self.running:
            if request in admitted or request.done:
                continue
            if self._window_jumps(request):
                request.emit(self._prefill(request))
            else:
                batch.append(request)
        if batch:
            self._batched_step(batch)

    def _retire(self, requests: list[_Request]) -> None:
        for request in requests:
            if request in self.running:
                self.running.remove(request)
            self.free.extend(request.slots)
            request.slots = []
            request.send(END)

    def _admit(self) -> list[_Request]:
        """Prefill waiting requests into free slots, oldest first, and draw their first tokens."""
        admitted = []
        while True:
            with self._wake:
                if not self.waiting or len(self.free) < self.waiting[0].n:
                    break
                request = self.waiting.popleft()
            if request.cancel.is_set() or request.abandoned.is_set():
                request.send(END)
                continue
            request.slots = [self.free.pop(0) for _ in range(request.n)]
            request.rows = torch.tensor(request.slots, device=self.cache.lengths.device)
            self.running.append(request)
            request.emit(self._prefill(request))
            admitted.append(request)
        return admitted

    def _window_jumps(self, request: _Request) -> bool:
        """Whether the request's next token no longer fits in its window (engine.window_start's rule)."""
        new_start = window_start(len(request.tokens[0]), request.start, self.model.config.block_size, request.keep)
        jumped = new_start != request.start
        request.start = new_start
        return jumped

    def _prefill(self, request: _Request) -> torch.Tensor:
        """Run the request's window alone, put its keys and values in its slots; its last logits, (n, V)."""
        window = request.window(self.cache.keys.device)  # (rows, T')
        cache = self._prefill_cache(window.size(0))
        logits = self.model(window, cache=cache)[0][:, -1]  # (rows, T') -> (rows, V)
        for i, slot in enumerate(request.slots):
            self.cache.load(slot, cache, row=min(i, window.size(0) - 1))  # a new prompt: one row for all samples
        if request.generated == 0 and request.n > 1:  # one prefill, n continuations (as engine.decode)
            logits = logits.expand(request.n, -1)
        return logits

    def _prefill_cache(self, rows: int) -> KVCache:
        """An empty KVCache of `rows` sequences, kept from one prefill to the next."""
        cache = self._prefill_caches.get(rows)
        if cache is None:
            cache = self._prefill_caches[rows] = KVCache.for_model(self.model, rows)
        cache.reset()
        return cache

    def _batched_step(self, batch: list[_Request]) -> None:
        """One forward pass at shape (slots, 1): each running sample's newest token, idle slots padded.

        Plain requests draw their tokens together: torch.multinomial draws one token from probs as
        argmax(probs / e) with e ~ Exp(1) from the caller's generator (the Gumbel-max trick, in
        PyTorch's own implementation), so each plain request fills its rows of `race` with its own
        generator and one division and argmax serve every row, bit for bit what multinomial gives.
        """
        slots = self.cache.slots
        stepping, last, temperature = [False] * slots, [0] * slots, [1.0] * slots
        for request in batch:
            for slot, sample in zip(request.slots, request.tokens, strict=True):
                stepping[slot], last[slot] = True, sample[-1]
                if request.plain:
                    temperature[slot] = request.temperature
        device = self.cache.lengths.device
        self.cache.prepare_step(torch.tensor(stepping, device=device))
        logits = self.model(torch.tensor(last, device=device).view(slots, 1), cache=self.cache)[0][:, -1]  # (slots, V)
        # One softmax over every row, at one fixed shape; then each plain request's race.
        probs = torch.softmax(logits.float() / torch.tensor(temperature, device=device).view(slots, 1), dim=-1)
        plain = [request for request in batch if request.plain]
        if self._race is None:
            self._race = torch.ones_like(probs)
        for request in plain:
            if request.n == 1:
                self._race[request.slots[0]].exponential_(1, generator=request.generator)
            else:  # rows that need not be neighbours: drawn as one (n, V) block, as multinomial would
                self._race.index_copy_(0, request.rows, torch.empty_like(probs[:request.n]).exponential_(
                    1, generator=request.generator))
        chosen = (probs / self._race).argmax(dim=-1) if plain else None  # (slots,)
        for request in batch:
            rows = request.rows if request.n > 1 else slice(request.slots[0], request.slots[0] + 1)
            if request.plain:
                request.take(chosen[rows], logits[rows])
            else:
                request.emit(logits[rows])


class StepReader:
    """A request's steps as the scheduler hands them out: an iterator that also says how many are ready."""

    def __init__(self, request: _Request):
        self._request = request
        self._ended = False

    def __iter__(self) -> StepReader:
        return self

    def __next__(self) -> Step:
        if self._ended:
            raise StopIteration
        item = self._request.out.get()
        if item is END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def ready(self) -> int:
        """Steps decoded and not yet read: reading that many more will not wait."""
        return self._request.out.qsize()

    def on_step(self, callback) -> None:
        """Call `callback()` (from the scheduler's thread) whenever a step, the end or an error arrives."""
        self._request.listeners.append(callback)

    def close(self) -> None:
        """Stop reading: if the request is still running, its slots free up at the next step."""
        if not self._ended:
            self._ended = True
            self._request.abandoned.set()

    def __del__(self) -> None:
        self.close()
