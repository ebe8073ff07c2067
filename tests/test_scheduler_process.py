"""The engine in a process of its own: the same text as on a thread of the server's process, the
same admission (decided in the server's process), and a child that dies or cannot start."""

from __future__ import annotations

import time

import pytest
from test_batching import OPTIONS, TOKENIZER, make_model, prompt, run_together, settings, texts_of

from scratchgpt.errors import ScratchGPTError
from scratchgpt.serving.loop import ThreadRunner
from scratchgpt.serving.scheduler import Scheduler, SchedulerStopped, ServerBusy

JOBS = [  # prompts of several lengths, each with its own seed and settings
    dict(ids=prompt(1, 5), n_new=40, seed=7, kw={"num_samples": 2}),
    dict(ids=prompt(2, 3), n_new=25, seed=8, kw={"temperature": 0.7}),
    dict(ids=prompt(3, 9), n_new=30, seed=9, kw={"top_k": 4, "repetition_penalty": 1.3}),
    dict(ids=prompt(4, 1), n_new=20, seed=10, kw={"top_p": 0.8, "num_samples": 3, "logprobs": 2}),
    dict(ids=prompt(5, 4), n_new=15, seed=11, kw={"temperature": 0, "stop": ["ab"]}),
]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_child_makes_the_text_a_thread_makes(options):
    model = make_model(**options)
    here, there = Scheduler(model, TOKENIZER, slots=8), Scheduler(model, TOKENIZER, slots=8, own_process=True)
    try:
        assert not isinstance(there._runner, ThreadRunner)
        expected = run_together(here, JOBS)
        assert run_together(there, JOBS) == expected
        assert len(expected[0][0]) == 40 and set(expected[3]) == {0, 1, 2}
    finally:
        here.close()
        there.close()


@pytest.fixture(scope="module")
def child():
    scheduler = Scheduler(make_model(), TOKENIZER, slots=2, max_waiting=1, own_process=True)
    yield scheduler
    scheduler.close()


def test_log_probabilities_cross_the_pipe(child):
    chunks = [c for step in child.submit(prompt(1, 4), settings(6, 3, logprobs=2)) for c in step]
    details = [d for c in chunks for d in c.tokens]
    assert len(details) == 6 and all(len(d.top) >= 2 and d.logprob <= 0 for d in details)


def test_a_full_line_is_refused_and_a_reader_that_leaves_frees_its_slots(child):
    first = child.submit(prompt(1, 3), settings(1_000_000, 0, num_samples=2))
    next(first)  # it holds both slots
    second = child.submit(prompt(2, 3), settings(5, 0))  # waits
    assert child.load() == {"running": 1, "waiting": 1, "slots": 2}
    with pytest.raises(ServerBusy):
        child.submit(prompt(3, 3), settings(5, 0))
    first.close()  # the client went away
    assert len(texts_of(second)[0]) == 5
    wait_until(lambda: child.load() == {"running": 0, "waiting": 0, "slots": 2})


def test_a_child_that_dies_ends_its_readers_with_an_error():
    scheduler = Scheduler(make_model(), TOKENIZER, slots=2, own_process=True)
    try:
        stream = scheduler.submit(prompt(1, 3), settings(1_000_000, 0))
        next(stream)
        scheduler._runner._process.kill()
        with pytest.raises(ScratchGPTError, match="stopped unexpectedly"):
            list(stream)
        with pytest.raises(SchedulerStopped, match="stopped unexpectedly"):
            scheduler.submit(prompt(1, 3), settings(5, 0))
    finally:
        scheduler.close()


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the engine's process did not get there in time"
        time.sleep(0.01)


def test_the_server_answers_503_once_its_engine_process_is_gone():
    httpx = pytest.importorskip("httpx")
    from serving import running_server

    from scratchgpt.serving.server import BatchingLimits, create_app

    app = create_app(make_model(), TOKENIZER, "t", batching=BatchingLimits(own_process=True))
    with running_server(app) as url:
        assert httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30).status_code == 200
        scheduler = app.state.server.scheduler
        scheduler._runner._process.kill()
        wait_until(lambda: scheduler.stopped is not None)
        answer = httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30)
        assert answer.status_code == 503 and "stopped unexpectedly" in answer.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"].startswith("unavailable: the engine's process stopped")


def test_a_scheduler_whose_process_cannot_start_runs_the_engine_on_a_thread(monkeypatch, capsys):
    from scratchgpt.serving import scheduler as scheduler_module

    def no_shared_memory(*args, **kwargs):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(scheduler_module, "ProcessRunner", no_shared_memory)
    scheduler = Scheduler(make_model(), TOKENIZER, slots=2, own_process=True)
    try:
        assert isinstance(scheduler._runner, ThreadRunner)
        assert "No space left on device" in capsys.readouterr().err
        assert len(texts_of(scheduler.submit(prompt(1, 3), settings(4, 0)))[0]) == 4
    finally:
        scheduler.close()


def test_a_program_that_never_closes_its_engine_process_still_exits(tmp_path):
    """At exit the child is closed through its pipe (it ignores SIGTERM, which multiprocessing would send, then wait)."""
    import subprocess
    import sys

    script = tmp_path / "leave_it_open.py"
    script.write_text(
        "from scratchgpt.build import build_model\n"
        "from scratchgpt.config import ModelConfig\n"
        "from scratchgpt.inference.engine import SamplingSettings\n"
        "from scratchgpt.serving.scheduler import Scheduler\n"
        "from scratchgpt.tokenizer import CharTokenizer\n"
        "if __name__ == '__main__':\n"
        "    model = build_model(ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))\n"
        "    scheduler = Scheduler(model, CharTokenizer(list('abcde')), slots=2, own_process=True)\n"
        "    stream = scheduler.submit([1, 2], SamplingSettings(max_new_tokens=3, seed=0))\n"
        "    print(len(''.join(c.text for step in stream for c in step)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr


def test_a_child_that_dies_while_starting_is_a_clear_error(monkeypatch):
    from scratchgpt.serving import process

    monkeypatch.setattr(process, "_child", _die_at_once)
    with pytest.raises(ScratchGPTError, match=r"exited while starting \(exit code 3\)"):
        process.ProcessRunner(make_model(), TOKENIZER, 2, lambda items: None, lambda why: None)


def _die_at_once(*args) -> None:
    raise SystemExit(3)
