"""The scheduler in a process of its own (scheduler_process.py): the tokens the in-process scheduler draws,
the logits when asked, a full line refused, a leaving or cancelled reader ending its request, a dead child."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_batching import OPTIONS, make_model, prompt, run_together

from scratchgpt.batching import Scheduler, SchedulerStopped, ServerBusy
from scratchgpt.errors import ScratchGPTError
from scratchgpt.scheduler_process import SchedulerProcess

JOBS = [  # prompts of several lengths, each with its own seed and settings
    dict(idx=prompt(1, 5), n_new=40, seed=7, kw={"num_samples": 2}),
    dict(idx=prompt(2, 3), n_new=25, seed=8, kw={"temperature": 0.7}),
    dict(idx=prompt(3, 9), n_new=30, seed=9, kw={"top_k": 4, "repetition_penalty": 1.3}),
    dict(idx=prompt(4, 1), n_new=20, seed=10, kw={"top_p": 0.8, "num_samples": 3}),
    dict(idx=prompt(5, 4), n_new=15, seed=11, kw={"temperature": 0}),
]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_child_draws_the_tokens_the_in_process_scheduler_draws(options):
    model = make_model(**options)
    here, there = Scheduler(model, slots=8), SchedulerProcess(model, slots=8)
    try:
        expected = run_together(here, JOBS)
        assert run_together(there, JOBS) == expected
        assert [len(steps) for steps in expected] == [job["n_new"] for job in JOBS]
    finally:
        here.close()
        there.close()


@pytest.fixture(scope="module")
def child():
    model = make_model()
    scheduler = SchedulerProcess(model, slots=2, max_waiting=1)
    yield model, scheduler
    scheduler.close()


def test_logits_cross_the_pipe_only_when_asked(child):
    model, scheduler = child
    here = Scheduler(model, slots=2)
    try:
        expected = list(here.decode(prompt(1, 4), 6, generator=torch.Generator().manual_seed(3)))
    finally:
        here.close()
    with_logits = list(scheduler.decode(prompt(1, 4), 6, generator=torch.Generator().manual_seed(3)))
    without = list(scheduler.decode(prompt(1, 4), 6, generator=torch.Generator().manual_seed(3), with_logits=False))
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(with_logits, expected, strict=True))
    assert all(step.logits is None for step in without)
    assert [s.ids.tolist() for s in without] == [s.ids.tolist() for s in expected]


def test_a_full_line_is_refused_and_a_reader_that_leaves_frees_its_slots(child):
    _, scheduler = child
    first = scheduler.decode(prompt(1, 3), 1_000_000, num_samples=2, generator=torch.Generator().manual_seed(0))
    next(first)  # it holds both slots
    second = scheduler.decode(prompt(2, 3), 5, generator=torch.Generator().manual_seed(0))  # waits
    assert scheduler.load() == {"running": 1, "waiting": 1, "slots": 2}
    with pytest.raises(ServerBusy):
        scheduler.decode(prompt(3, 3), 5)
    first.close()  # the client went away
    assert len(list(second)) == 5
    wait_until(lambda: scheduler.load() == {"running": 0, "waiting": 0, "slots": 2})


def test_a_cancelled_request_ends_at_a_step(child):
    _, scheduler = child
    cancel = threading.Event()
    steps = scheduler.decode(prompt(1, 3), 1_000_000, cancel=cancel, generator=torch.Generator().manual_seed(0))
    next(steps)
    cancel.set()
    assert 0 < len(list(steps)) < 1_000_000
    wait_until(lambda: scheduler.load()["running"] == 0)


def test_a_child_that_dies_ends_its_readers_with_an_error():
    scheduler = SchedulerProcess(make_model(), slots=2)
    try:
        steps = scheduler.decode(prompt(1, 3), 1_000_000, generator=torch.Generator().manual_seed(0))
        next(steps)
        scheduler._process.kill()
        with pytest.raises(ScratchGPTError, match="stopped unexpectedly"):
            list(steps)
        with pytest.raises(SchedulerStopped, match="stopped unexpectedly"):
            scheduler.decode(prompt(1, 3), 5)
    finally:
        scheduler.close()


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the scheduler's process did not get there in time"
        time.sleep(0.01)


def test_the_server_answers_503_once_its_scheduler_process_is_gone():
    httpx = pytest.importorskip("httpx")
    from serving import running_server

    from scratchgpt.server import BatchingLimits, create_app
    from scratchgpt.tokenizer import CharTokenizer

    app = create_app(make_model(), CharTokenizer(list("abcdefghijklm")), "t", batching=BatchingLimits(own_process=True))
    with running_server(app) as url:
        assert httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30).status_code == 200
        scheduler = app.state.server.scheduler
        scheduler._process.kill()
        wait_until(lambda: scheduler._stopped is not None)
        answer = httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30)
        assert answer.status_code == 503 and "stopped unexpectedly" in answer.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"].startswith("unavailable: the scheduler's process stopped")


def test_a_server_whose_scheduler_process_cannot_start_runs_it_in_its_own(monkeypatch, capsys):
    from scratchgpt import server
    from scratchgpt.tokenizer import CharTokenizer

    def no_shared_memory(*args, **kwargs):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(server, "SchedulerProcess", no_shared_memory)
    app = server.create_app(make_model(), CharTokenizer(list("abcdefghijklm")), "t",
                            batching=server.BatchingLimits(own_process=True))
    try:
        assert isinstance(app.state.server.scheduler, Scheduler)
        assert "No space left on device" in capsys.readouterr().err
    finally:
        app.state.server.close()


def test_a_program_that_never_closes_its_scheduler_process_still_exits(tmp_path):
    """At exit the child is closed through its pipe (it ignores SIGTERM, which multiprocessing would send, then wait)."""
    import subprocess
    import sys

    script = tmp_path / "leave_it_open.py"
    script.write_text(
        "import torch\n"
        "from scratchgpt.build import build_model\n"
        "from scratchgpt.config import ModelConfig\n"
        "from scratchgpt.scheduler_process import SchedulerProcess\n"
        "if __name__ == '__main__':\n"
        "    model = build_model(ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))\n"
        "    scheduler = SchedulerProcess(model, slots=2)\n"
        "    print(len(list(scheduler.decode(torch.tensor([[1, 2]]), 3))))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr


def test_a_child_that_dies_while_starting_is_a_clear_error(monkeypatch):
    from scratchgpt import scheduler_process

    monkeypatch.setattr(scheduler_process, "_child", _die_at_once)
    with pytest.raises(ScratchGPTError, match=r"exited while starting \(exit code 3\)"):
        SchedulerProcess(make_model(), slots=2)


def _die_at_once(*args) -> None:
    raise SystemExit(3)
