"""The loop that steps the one engine for the server, and the thread that runs it in the server's process.

`EngineLoop` takes commands (start a job, a reader left, close) and between them advances every
running request by one step of the engine (inference/engine.py); what each step made of each
request goes out as one batch of `Item`s. `ThreadRunner` runs it on a thread; process.py's
`ProcessRunner` runs the same loop in a child process. The scheduler (scheduler.py) decides
which jobs start.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..inference.engine import Engine, Request, SamplingSettings, expire, make_generator
from ..inference.text import CompletionChunk


@dataclass
class Job:
    """A request as it crosses to the engine: plain data, so that it can cross a pipe."""

    id: int
    prompt: list[int]
    settings: SamplingSettings
    seed: int  # the request's own generator starts here (a random one when the caller gave none)
    deadline_s: float  # seconds it may run


@dataclass
class Item:
    """What one step made of one request: new chunks of text, and whether it ended (or why it failed)."""

    id: int
    chunks: list[CompletionChunk]
    done: bool
    error: str | None = None  # why it failed
    its_own_fault: bool = False  # the failure came from this request's settings (a 400), not the engine (a 500)
    step_seconds: float = 0.0  # how long the engine step that made it took (the first item of a step carries it)


class EngineLoop:
    """Steps one Engine for the jobs it is handed: start, leave, step; each step's items go to `send` at once."""

    def __init__(self, model: torch.nn.Module, tokenizer, slots: int, send: Callable[[list[Item]], None],
                 compile: bool = False):
        self.engine = Engine(model, rows=slots, compile=compile)
        self.tokenizer = tokenizer
        self.send = send
        self.requests: dict[int, Request] = {}
        self.device = self.engine.device

    @property
    def busy(self) -> bool:
        return bool(self.engine.running)

    def start(self, job: Job) -> None:
        request = Request(job.prompt, job.settings, make_generator(job.seed, self.device), self.tokenizer,
                          deadline=time.monotonic() + job.deadline_s, id=job.id)
        self.requests[job.id] = request
        self._send([self.engine.start(request)])

    def leave(self, job_id: int) -> None:
        request = self.requests.get(job_id)
        if request is not None:
            self._send([self.engine.stop(request)])

    def step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = expire(self.engine) + self.engine.step()
        except Exception as exc:  # a fault of the forward pass itself: every running request gets it
            outputs = [self.engine.stop(r) for r in list(self.engine.running)]
            self._send(outputs, error=f"{type(exc).__name__}: {exc}")
            return
        self._send(outputs, step_seconds=time.perf_counter() - start)

    def _send(self, outputs, error: str | None = None, step_seconds: float = 0.0) -> None:
        items = []
        for output in outputs:
            request_id = output.request.id
            if output.done:
                self.requests.pop(request_id, None)
            failure = error or (str(output.error) if output.error is not None else None)
            items.append(Item(request_id, output.chunks, output.done, failure, error is None))
        if items:
            items[0].step_seconds = step_seconds
            self.send(items)

    def run(self, receive: Callable[[bool], tuple | None]) -> None:
        """Until told to close: take every waiting command (waiting for one while nothing runs), then step."""
        with torch.inference_mode():
            while True:
                command = receive(not self.busy)
                while command is not None:
                    if command[0] == "close":
                        return
                    getattr(self, command[0])(*command[1:])
                    command = receive(False)
                if self.busy:
                    self.step()


class ThreadRunner:
    """The engine loop on a thread of the server's own process."""

    def __init__(self, model: torch.nn.Module, tokenizer, slots: int, deliver: Callable[[list[Item]], None],
                 on_exit: Callable[[str], None], compile: bool = False):
        self._inbox: queue.Queue = queue.Queue()
        self._loop = EngineLoop(model, tokenizer, slots, deliver, compile)
        self._on_exit = on_exit
        self._thread = threading.Thread(target=self._run, name="scratchgpt-scheduler", daemon=True)
        self._thread.start()

    def _receive(self, block: bool) -> tuple | None:
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return None

    def _run(self) -> None:
        why = "the server is shutting down"
        try:
            self._loop.run(self._receive)
        except BaseException as exc:  # the loop itself failed: the scheduler is gone, and says so
            why = f"the scheduler's thread stopped unexpectedly ({type(exc).__name__}: {exc})"
        self._on_exit(why)

    def send(self, command: tuple) -> None:
        self._inbox.put(command)

    def close(self) -> None:
        self._inbox.put(("close",))
        self._thread.join(timeout=10)


