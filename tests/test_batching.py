"""Continuous batching: the server's scheduler steps the one engine for every running request; a
request's text is the same alone, beside others, and from `stream_completion` in the caller's thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.inference.engine import SamplingError, SamplingSettings
from scratchgpt.sample import stream_completion
from scratchgpt.serving.scheduler import Scheduler, ServerBusy
from scratchgpt.tokenizer import CharTokenizer

VOCAB = 13
TOKENIZER = CharTokenizer(list("abcdefghijklm"))  # one character per id: the same text means the same ids
OPTIONS = {
    "gpt2": {},
    "rope-rmsnorm-qknorm-swiglu": dict(position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu"),
    "relu2-manual-bias": dict(activation="relu2", attention="manual", bias=True),
    "rope-manual-tied": dict(position="rope", attention="manual", tie_weights=True),
    "bigram-embed": dict(position="rope", norm="rmsnorm", bigram_embed=True),
}


def make_model(block_size: int = 16, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"tie_weights": False, **options}
    model = build_model(ModelConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    with torch.no_grad():  # sharper than at initialisation, so sampling is not uniform noise
        model.lm_head.weight.mul_(8)
        if "bigram" in model.transformer:  # zero at initialisation: give the pairs a say
            model.transformer.bigram.weight.normal_(0.0, 1.0)
    return model


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def settings(n_new: int, seed: int, **kw) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=n_new, seed=seed, **{"temperature": 1.0, **kw})


def texts_of(steps) -> dict[int, str]:
    """Each sample's whole text from a stream of chunk lists."""
    out: dict[int, str] = {}
    for chunks in steps:
        for c in chunks:
            out[c.index] = out.get(c.index, "") + c.text
    return out


def run_together(scheduler: Scheduler, jobs: list[dict]) -> list[dict[int, str]]:
    """Submit every job at once, read them in threads; each job's texts per sample."""
    results: list = [None] * len(jobs)
    streams = [scheduler.submit(j["ids"], settings(j["n_new"], j["seed"], **j.get("kw", {}))) for j in jobs]

    def read(i):
        results[i] = texts_of(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def solo(model, ids: list[int], n_new: int, seed: int, **kw) -> dict[int, str]:
    """The same request decoded alone in the caller's thread (the CLI's and generate_text's path)."""
    return texts_of(stream_completion(model, TOKENIZER, TOKENIZER.decode(ids), settings(n_new, seed, **kw)))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("others", [1, 3, 15])
def test_a_request_gets_the_same_text_alone_and_beside_others(options, others):
    """40 tokens from a 16-token context (two window jumps), n=2, beside requests of other lengths, prompts, n."""
    model = make_model(**options)
    scheduler = Scheduler(model, TOKENIZER, slots=16, max_waiting=64)
    try:
        target = dict(ids=prompt(1, 5), n_new=40, seed=7, kw={"num_samples": 2})
        alone = run_together(scheduler, [target])[0]
        crowd = [dict(ids=prompt(100 + i, 3 + i % 11), n_new=10 + 7 * i % 45, seed=i,
                      kw=dict(top_k=3) if i % 3 == 1 else dict(repetition_penalty=1.5) if i % 3 == 2 else {})
                 for i in range(others)]
        together = run_together(scheduler, crowd[: others // 2] + [target] + crowd[others // 2:])
        assert together[others // 2] == alone == solo(model, target["ids"], 40, 7, num_samples=2)
        assert [len(alone[i]) for i in (0, 1)] == [40, 40]
    finally:
        scheduler.close()


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_greedy_batched_text_equals_the_naive_reference_through_window_jumps(options):
    from scratchgpt.sample import generate_naive

    model = make_model(**options)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # decisive: kernel differences cannot flip a choice
    ids = prompt(3, 6)
    reference = TOKENIZER.decode([int(t[0]) for t in generate_naive(model, torch.tensor([ids]), 45, temperature=0)])
    scheduler = Scheduler(model, TOKENIZER, slots=4)
    try:
        busy = scheduler.submit(prompt(4, 9), settings(45, 1))
        assert run_together(scheduler, [dict(ids=ids, n_new=45, seed=0, kw=dict(temperature=0))])[0] == {0: reference}
        list(busy)
    finally:
        scheduler.close()


def test_stop_strings_and_samples_match_a_solo_run():
    model = make_model()
    scheduler = Scheduler(model, TOKENIZER, slots=8)
    kw = dict(stop=["ab", "k"], num_samples=3)
    try:
        alone = solo(model, TOKENIZER.encode("defgh"), 30, 5, **kw)
        noise = [scheduler.submit(prompt(50 + i, 4), settings(25, i)) for i in range(5)]
        beside = run_together(scheduler, [dict(ids=TOKENIZER.encode("defgh"), n_new=30, seed=5, kw=kw)])[0]
        for stream in noise:
            list(stream)
        assert alone == beside and set(alone) == {0, 1, 2}
    finally:
        scheduler.close()


def test_a_stream_survives_neighbours_whose_arithmetic_breaks():
    """Settings that overflow into NaN (past validation) fail their own request; the others go on untouched."""
    model = make_model()
    scheduler = Scheduler(model, TOKENIZER, slots=8)
    try:
        target = dict(ids=prompt(1, 5), n_new=30, seed=7)
        alone = run_together(scheduler, [target])[0]
        broken = [scheduler.submit(prompt(9, 4), settings(30, i, repetition_penalty=1e-40, top_k=2)) for i in range(3)]
        beside = run_together(scheduler, [target])[0]
        for stream in broken:
            with pytest.raises(SamplingError, match="overflowed"):
                list(stream)
        assert beside == alone and len(alone[0]) == 30
        assert scheduler.load()["running"] == 0
    finally:
        scheduler.close()


def test_a_full_line_is_refused_and_a_reader_that_leaves_frees_its_slot():
    model = make_model()
    scheduler = Scheduler(model, TOKENIZER, slots=1, max_waiting=1)
    try:
        first = scheduler.submit(prompt(1, 3), settings(10_000, 0))
        next(first)  # running in the only slot
        second = scheduler.submit(prompt(2, 3), settings(5, 0))  # waits
        with pytest.raises(ServerBusy) as busy:
            scheduler.submit(prompt(3, 3), settings(5, 0))
        assert busy.value.retry_after >= 1
        first.close()  # the client went away
        assert len(texts_of(second)[0]) == 5  # so the waiting request got the slot
        deadline = time.monotonic() + 5
        while scheduler.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load() == {"running": 0, "waiting": 0, "slots": 1}
    finally:
        scheduler.close()


def test_a_request_past_its_time_limit_ends_with_its_text_so_far():
    model = make_model()
    scheduler = Scheduler(model, TOKENIZER, slots=2, request_timeout=0.2)
    try:
        chunks = [c for step in scheduler.submit(prompt(1, 3), settings(1_000_000, 0)) for c in step]
        assert 0 < len("".join(c.text for c in chunks)) < 1_000_000 and chunks[-1].finish_reason == "length"
    finally:
        scheduler.close()


def test_a_dead_scheduler_thread_says_so_and_ends_its_readers():
    model = make_model()
    scheduler = Scheduler(model, TOKENIZER, slots=2)
    try:
        stream = scheduler.submit(prompt(1, 3), settings(1_000_000, 0))
        next(stream)
        scheduler._runner.send(("no_such_command",))  # the loop itself fails
        with pytest.raises(Exception, match="stopped unexpectedly"):
            list(stream)
        assert "stopped unexpectedly" in scheduler.stopped
    finally:
        scheduler.close()


def test_the_server_answers_429_when_full_and_a_client_that_leaves_frees_its_slot():
    import httpx
    from serving import running_server

    from scratchgpt.serving.server import BatchingLimits, create_app

    tok = CharTokenizer(list("abcdefghijklm"))
    app = create_app(make_model(), tok, "t", max_tokens_cap=100_000, batching=BatchingLimits(slots=1, max_waiting=0))
    with running_server(app) as url:
        body = dict(prompt="abc", max_tokens=100_000, stream=True, seed=1)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)  # it holds the only slot
            refused = httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 10  # the first client went away: its slot frees at the next step
        while (answer := httpx.post(f"{url}/v1/completions", json=dict(prompt="abc", max_tokens=3), timeout=30)).status_code == 429:
            assert time.monotonic() < deadline, "the slot of a client that left was never freed"
            time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
