"""Continuous batching for the server: the one decoding engine, stepped for every running request.

On a CPU a decoding step is bound by reading the weights, so sixteen sequences in one pass cost
little more than one. The `Scheduler` decides which requests run: a request takes one slot (an
engine row) per sample; beyond the free slots it waits, up to `max_waiting`; beyond that
`submit` raises `ServerBusy` (the server answers 429). Admission is decided here, in the
server's process, whether the engine runs in a thread of this process (loop.py's `ThreadRunner`)
or in a process of its own (process.py's `ProcessRunner`).

Both runners run the same `EngineLoop` (loop.py): between steps it starts the admitted requests (a
prefill each, which draws their first tokens), ends those whose reader left or whose time ran
out, and then advances all of them by one token in one forward pass (inference/engine.py).
Because that pass has one fixed shape and rows do not mix, a request's arithmetic is the same
alone or beside fifteen others: the same seed gives the same text. What each step made of each
request (its new final text, its end, or its own error) reaches the request's `Stream`, which
the HTTP layer reads.
"""

from __future__ import annotations

import collections
import itertools
import math
import queue
import secrets
import sys
import threading
from collections.abc import Callable

import torch

from ..errors import ScratchGPTError
from ..inference.engine import SamplingError, SamplingSettings
from ..inference.text import CompletionChunk
from .loop import Item, Job, ThreadRunner
from .process import ProcessRunner

DEFAULT_SLOTS = 16
DEFAULT_MAX_WAITING = 32
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds a request may run before it is ended
RETRY_AFTER_S = 1.0  # what a 429 asks a client to wait: a slot frees within a second at these sizes
MAX_BEHIND = 4096  # steps a reader may leave unread before its request is ended: a stalled client pins no memory


class ServerBusy(ScratchGPTError):
    """Every slot is taken and the waiting line is full: the caller should retry later (HTTP 429)."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStopped(ServerBusy):
    """The scheduler is gone (shut down, or its engine died): no request can run (HTTP 503)."""

    status = 503


END = object()  # put on a stream when its request has no more output


class Stream:
    """One request's output as the scheduler hands it out: lists of chunks, then the end (or an error)."""

    def __init__(self, scheduler: Scheduler, job: Job):
        self._scheduler, self.job = scheduler, job
        self._items: queue.Queue = queue.Queue()
        self._listeners: list[Callable[[], None]] = []
        self._ended = False

    def put(self, item) -> None:
        """Hand a list of chunks (or END, or an exception) to the reader; wake whoever listens."""
        self._items.put(item)
        for listener in self._listeners:
            listener()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> list[CompletionChunk]:
        if self._ended:
            raise StopIteration
        item = self._items.get()
        if item is END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def ready(self) -> int:
        """Items decoded and not yet read: reading that many more will not wait."""
        return self._items.qsize()

    def on_step(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from the scheduler's thread) whenever an item arrives."""
        self._listeners.append(callback)

    def close(self) -> None:
        """Stop reading: if the request still runs, its slots free up at the next step."""
        if not self._ended:
            self._ended = True
            self._scheduler.leave(self.job.id)


class Scheduler:
    """Admits requests to one engine (slots, a waiting line, 429s) and routes each step's output to its Stream."""

    def __init__(self, model: torch.nn.Module, tokenizer, slots: int = DEFAULT_SLOTS,
                 max_waiting: int = DEFAULT_MAX_WAITING, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 own_process: bool = False, compile: bool = False,
                 on_step: Callable[[float], None] | None = None):
        """`own_process`: run the engine in a child process (process.py); if it cannot start, say so once and
        run it on a thread here. `compile`: the engine's steps compiled (inference/compiled.py). `on_step(seconds)`
        hears how long each engine step took (the server's metrics)."""
        self.on_step = on_step
        self.slots, self.max_waiting, self.request_timeout = slots, max_waiting, request_timeout
        self.compile = compile
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: collections.deque[Job] = collections.deque()
        self._streams: dict[int, Stream] = {}
        self._running: dict[int, int] = {}  # job id -> the slots it holds
        self._ids = itertools.count()
        self._stopped: str | None = None
        self._runner = self._start_runner(model.eval(), tokenizer, own_process)

    def _start_runner(self, model, tokenizer, own_process: bool):
        if own_process:
            try:
                return ProcessRunner(model, tokenizer, self.slots, self._deliver, self._runner_exited,
                                     compile=self.compile)
            except (OSError, RuntimeError, ScratchGPTError) as exc:  # e.g. too little shared memory in a container
                print(f"scratchgpt serve: note: the model's own process did not start ({exc}); running it in the "
                      "server's process instead (slower with many clients)", file=sys.stderr, flush=True)
        return ThreadRunner(model, tokenizer, self.slots, self._deliver, self._runner_exited, self.compile)

    # --- what the server calls ------------------------------------------------------------------

    def submit(self, prompt: list[int], settings: SamplingSettings) -> Stream:
        """Queue a completion of `prompt` (ids): it runs now or waits for slots; ServerBusy if the line is full."""
        if not prompt:
            raise SamplingError("the prompt must not be empty", "prompt")
        if settings.num_samples > self.slots:
            raise SamplingError(f"n must be <= {self.slots} (this server's slots), got {settings.num_samples}", "n")
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        with self._lock:
            if self._stopped is not None:
                raise SchedulerStopped(self._stopped, retry_after=5.0)
            runs_now = not self._waiting and self._free >= settings.num_samples
            if not runs_now and len(self._waiting) >= self.max_waiting:
                raise ServerBusy(f"all {self.slots} slots are busy and {len(self._waiting)} requests wait; "
                                 "try again shortly", retry_after=RETRY_AFTER_S)
            job = Job(next(self._ids), list(prompt), settings, seed, self.request_timeout)
            stream = self._streams[job.id] = Stream(self, job)
            self._waiting.append(job)
            self._admit()
        return stream

    @property
    def stopped(self) -> str | None:
        """Why no request can run any more (shut down, or the engine died), or None while it serves."""
        return self._stopped

    def load(self) -> dict[str, int]:
        """What /health shows: requests running and waiting, and the slots."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.slots}

    def leave(self, job_id: int) -> None:
        """The reader stopped early: a waiting request is dropped, a running one ends at the next step."""
        with self._lock:
            waiting = next((job for job in self._waiting if job.id == job_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                self._streams.pop(job_id, None)
            elif job_id in self._running and self._stopped is None:
                self._runner.send(("leave", job_id))

    def close(self) -> None:
        """Stop the engine: running and waiting requests end where they are."""
        with self._lock:
            if self._stopped is None:
                self._stopped = "the server is shutting down"
        self._runner.close()
        self._runner_exited(self._stopped)

    # --- inside ------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while their samples fit (the lock is held)."""
        while self._waiting and self._free >= self._waiting[0].settings.num_samples:
            job = self._waiting.popleft()
            self._free -= job.settings.num_samples
            self._running[job.id] = job.settings.num_samples
            self._runner.send(("start", job))

    def _deliver(self, items: list[Item]) -> None:
        """Hand each item to its stream (on the runner's thread); an ended request frees its slots."""
        if items and items[0].step_seconds and self.on_step is not None:
            self.on_step(items[0].step_seconds)
        for item in items:
            stream = self._streams.get(item.id)
            if stream is not None and not item.done and stream.ready() >= MAX_BEHIND:
                stream.put(ScratchGPTError(f"the client fell {MAX_BEHIND} steps behind the model; the request was ended"))
                self.leave(item.id)
                stream = None
            if item.chunks and stream is not None:
                stream.put(item.chunks)
            if item.error is not None and stream is not None:
                stream.put(SamplingError(item.error) if item.its_own_fault else ScratchGPTError(item.error))
            if item.done:
                self._finish(item.id)

    def _finish(self, job_id: int) -> None:
        with self._lock:
            stream = self._streams.pop(job_id, None)
            self._free += self._running.pop(job_id, 0)
            self._admit()
        if stream is not None:
            stream.put(END)

    def _runner_exited(self, why: str) -> None:
        """The engine is gone: whatever was running or waiting gets the reason, then its end."""
        with self._lock:
            if self._stopped is None:
                self._stopped = why
            orphans = list(self._streams.values())
            self._streams.clear()
            self._waiting.clear()
            self._running.clear()
        for stream in orphans:
            if why != "the server is shutting down":
                stream.put(ScratchGPTError(why))
            stream.put(END)


def retry_after_header(exc: ServerBusy) -> str:
    """The Retry-After value for a refusal: whole seconds, at least 1."""
    return str(max(1, math.ceil(exc.retry_after)) if math.isfinite(exc.retry_after) else 1)
