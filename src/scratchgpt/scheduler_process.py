"""The batching scheduler in a process of its own, so that the model's Python and the server's do not share a lock.

A Python process runs one thread of Python at a time (the interpreter lock). In one process the
scheduler's step (batching.py) and the server's event loop, which turns every token into text, a
JSON event and a socket write, take turns on that lock, and a server with many clients stays at
one core however many the machine has. Here the scheduler runs in a child process with its own
interpreter, and the server process only sends requests to it and reads their tokens back, each
step's tokens in one message: the two work at the same time on two cores. (vLLM separates its
engine from its API server in the same way, for the same reason.)

`SchedulerProcess` has the Scheduler's interface (decode, load, slots, close), so the server uses
either. The model reaches the child through shared memory (PyTorch's multiprocessing, "spawn"),
the requests and tokens through a pipe: a submission carries the prompt's ids, the sampling
settings and the state of the request's random generator, so the child draws exactly the tokens
the in-process scheduler would (tests/test_scheduler_process.py). The child ignores SIGINT and
SIGTERM: the server drains its requests first, then closes the pipe, and the child exits.

The server decides at once whether a request is accepted (ServerBusy, a 429, when the slots and
the waiting line are full), keeping the same count of running and waiting requests as the child.

As with any "spawn" child, the child imports the program's main module again: a script that
starts one should keep its own work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import queue
import signal
import sys
import threading

import torch
import torch.multiprocessing as mp

from . import device
from .batching import (
    DEFAULT_MAX_WAITING,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SLOTS,
    END,
    RETRY_AFTER_S,
    Scheduler,
    SchedulerStopped,
    ServerBusy,
    StepReader,
)
from .device import governed
from .engine import SamplingError, Step
from .errors import ScratchGPTError

START_TIMEOUT_S = 120.0  # the child imports PyTorch and takes the model; a slow disk may take a while


class SchedulerProcess:
    """A Scheduler running in a child process: decode() returns a StepReader as Scheduler.decode does."""

    def __init__(self, model: torch.nn.Module, slots: int = DEFAULT_SLOTS, max_waiting: int = DEFAULT_MAX_WAITING,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, threads: int | None = None):
        """Start the child with `model` (moved to shared memory) and `threads` PyTorch threads (default: this
        process's count, following the machine's load as this process's would, device.governed); return once it
        is ready to take requests."""
        self.model = model.eval()
        self.slots = slots
        self.max_waiting = max_waiting
        context = mp.get_context("spawn")  # fork would copy this process's threads' locks mid-use
        self._conn, child_end = context.Pipe()
        model.share_memory()
        governor_most = device._active.most if device._active is not None and not threads else None
        self._process = context.Process(target=_child, name="scratchgpt-scheduler", daemon=True,
                                        args=(model, slots, request_timeout, threads or torch.get_num_threads(),
                                              governor_most, child_end))
        self._process.start()
        child_end.close()
        try:
            ready = self._conn.poll(START_TIMEOUT_S) and self._conn.recv() == "ready"
        except (EOFError, OSError):  # it died while starting (say, the model could not reach it)
            self._process.join(timeout=5)
            raise ScratchGPTError(f"the scheduler's process exited while starting (exit code {self._process.exitcode})") from None
        if not ready:
            self._process.kill()
            raise ScratchGPTError(f"the scheduler's process did not start within {START_TIMEOUT_S:.0f} s")
        self._lock = threading.Lock()  # guards what follows, and sends on the pipe
        self._requests: dict[int, _RemoteRequest] = {}
        self._running: list[_RemoteRequest] = []  # admitted, as the child admits them: oldest first, when slots free
        self._waiting: collections.deque[_RemoteRequest] = collections.deque()
        self._free = slots
        self._ids = itertools.count()
        self._stopped: str | None = None  # why the child is gone, once it is
        self._receiver = threading.Thread(target=self._receive, name="scratchgpt-scheduler-reader", daemon=True)
        self._receiver.start()
        # Closed at exit before multiprocessing's own hook, which would send the child a SIGTERM it ignores and wait.
        atexit.register(self.close)

    # --- what callers use (the Scheduler's interface) -------------------------------------------

    def decode(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
               num_samples: int = 1, keep: int | None = None, cancel: threading.Event | None = None,
               with_logits: bool = True, **_ignored) -> StepReader:
        """Scheduler.decode, in the child. `with_logits=False` leaves each Step's logits out (None): they cross
        the pipe only for a request that reports log-probabilities."""
        if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
            raise SamplingError("a batched request is one prompt of at least one token")
        if num_samples > self.slots:
            raise SamplingError(f"n must be <= {self.slots} (this server's slots), got {num_samples}", "n")
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        num_samples=num_samples, keep=keep)
        # The generator's state as plain bytes: a tensor on the pipe would travel as a shared-memory handle.
        random_state = None if generator is None else (str(generator.device), generator.get_state().numpy().tobytes())
        with self._lock:
            if self._stopped is not None:
                raise SchedulerStopped(self._stopped, retry_after=5.0)
            slot_free = not self._waiting and self._free >= num_samples
            if not slot_free and len(self._waiting) >= self.max_waiting:
                raise ServerBusy(f"all {self.slots} slots are busy and {len(self._waiting)} requests wait; "
                                 "try again shortly", retry_after=RETRY_AFTER_S)
            request = _RemoteRequest(self, next(self._ids), num_samples, cancel or threading.Event())
            self._requests[request.id] = request
            self._waiting.append(request)
            self._admit()
            self._conn.send(("submit", request.id, idx[0].tolist(), max_new_tokens, settings, random_state, with_logits))
        return StepReader(request)

    @property
    def stopped(self) -> str | None:
        """Why no request can run any more (shut down, or the child died), or None while the child serves."""
        return self._stopped

    def load(self) -> dict[str, int]:
        """What /health shows: requests running and waiting, and the slots."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.slots}

    def close(self) -> None:
        """End the child: running and waiting requests end where they are."""
        atexit.unregister(self.close)
        with self._lock:
            if self._stopped is None:
                self._stopped = "the server is shutting down"
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
        self._receiver.join(timeout=10)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    # --- the pipe -------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Move waiting requests to running while their samples fit, as the child's scheduler does (lock held)."""
        while self._waiting and self._free >= self._waiting[0].n:
            request = self._waiting.popleft()
            self._free -= request.n
            self._running.append(request)

    def _leave(self, request: _RemoteRequest) -> None:
        """The reader stopped early: the child ends the request at its next step."""
        with self._lock:
            if self._stopped is None and request.id in self._requests:
                self._conn.send(("leave", request.id))

    def _receive(self) -> None:
        """Hand each step's items to their readers, until the child ends (closed, or died)."""
        while True:
            try:
                items = self._conn.recv()
            except (EOFError, OSError):
                break
            for request_id, item in items:
                request = self._requests.get(request_id)
                if request is None:
                    continue
                if item is None:  # the end of the request: its slots are free
                    self._end(request)
                else:
                    request.send(item if isinstance(item, BaseException) else _step(item))
        self._process.join(timeout=1)  # so that its exit code is known
        with self._lock:
            if self._stopped is None:
                self._stopped = f"the scheduler's process stopped unexpectedly (exit code {self._process.exitcode})"
            orphans = list(self._requests.values())
        for request in orphans:  # whatever was still running: its reader gets the error, then the end
            request.send(ScratchGPTError(self._stopped))
            self._end(request)

    def _end(self, request: _RemoteRequest) -> None:
        with self._lock:
            if self._requests.pop(request.id, None) is None:
                return
            if request in self._running:
                self._running.remove(request)
                self._free += request.n
            elif request in self._waiting:
                self._waiting.remove(request)
            self._admit()
        request.send(END)


class _RemoteRequest:
    """The server's side of a request running in the child: what StepReader reads (queue, listeners, abandoned)."""

    def __init__(self, owner: SchedulerProcess, request_id: int, n: int, cancel: threading.Event):
        self.owner, self.id, self.n, self.cancel = owner, request_id, n, cancel
        self.out: queue.Queue = queue.Queue()
        self.listeners: list = []
        self.abandoned = _Leaving(self)

    def send(self, item) -> None:
        """Hand an item to the reader (on the receiving thread); a cancelled request leaves, as in-process at a step."""
        if self.cancel.is_set():
            self.abandoned.set()
        self.out.put(item)
        for listener in self.listeners:
            listener()


class _Leaving(threading.Event):
    """A remote request's `abandoned` flag: setting it (StepReader.close) also tells the child, once."""

    def __init__(self, request: _RemoteRequest):
        super().__init__()
        self.request = request

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self.request.owner._leave(self.request)


def _step(item: tuple[list[int], tuple[int, int, bytes] | None]) -> Step:
    """A step as it crossed the pipe: the ids, and the float32 logits (n, V) if they were asked for."""
    ids, logits = item
    if logits is not None:
        n, vocab, data = logits
        logits = torch.frombuffer(bytearray(data), dtype=torch.float32).view(n, vocab)
    return Step(torch.tensor(ids, dtype=torch.long), logits)


# --- the child ------------------------------------------------------------------------------------

def _child(model: torch.nn.Module, slots: int, request_timeout: float, threads: int, governor_most: int | None,
           conn) -> None:
    """The child process: a Scheduler fed from the pipe; after each step, every reader's new items go back as one
    message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the server, which drains, then closes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    lock = threading.Lock()
    readers: dict[int, tuple[StepReader, bool]] = {}  # request id -> its reader, and whether logits go back

    def flush() -> None:  # on the scheduler's thread, after each step
        items = []
        with lock:
            live = list(readers.items())
        for request_id, (reader, with_logits) in live:
            while reader.ready():
                item = reader._request.out.get_nowait()
                if item is END:
                    with lock:
                        readers.pop(request_id, None)
                    items.append((request_id, None))
                elif isinstance(item, BaseException):
                    items.append((request_id, ScratchGPTError(f"{type(item).__name__}: {item}")))
                else:
                    items.append((request_id, (item.ids.tolist(), _logits_bytes(item.logits) if with_logits else None)))
        if items:
            conn.send(items)

    say = functools.partial(print, file=sys.stderr, flush=True)
    with governed(0 if governor_most else threads, say=say, most=governor_most):
        scheduler = Scheduler(model, slots, max_waiting=1 << 30, request_timeout=request_timeout, on_step=flush)
        conn.send("ready")
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone
                break
            if message[0] == "submit":
                request_id, ids, max_new_tokens, settings, random_state, with_logits = message[1:]
                generator = None
                if random_state is not None:
                    generator = torch.Generator(device=random_state[0])
                    generator.set_state(torch.frombuffer(bytearray(random_state[1]), dtype=torch.uint8))
                with lock:  # registered before the scheduler can hand out its first token
                    readers[request_id] = (scheduler.decode(torch.tensor([ids], dtype=torch.long), max_new_tokens,
                                                            generator=generator, **settings), with_logits)
            elif message[0] == "leave":
                with lock:
                    entry = readers.get(message[1])
                if entry is not None:
                    entry[0].close()
            elif message[0] == "close":
                break
        scheduler.close()
    conn.close()


def _logits_bytes(logits: torch.Tensor) -> tuple[int, int, bytes]:
    rows = logits.detach().float().cpu().contiguous()
    return rows.size(0), rows.size(1), rows.numpy().tobytes()
