"""Continuous batching (batching.py): a request gets the same tokens alone or beside others, token for token."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from scratchgpt.batching import Scheduler, ServerBusy
from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.engine import SamplingSettings, decode, stream_completion
from scratchgpt.kv_cache import KVCache, SlotCache
from scratchgpt.tokenizer import CharTokenizer

VOCAB = 13
OPTIONS = {
    "gpt2": {},
    "rope-rmsnorm-qknorm-swiglu": dict(position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu"),
    "relu2-manual-bias": dict(activation="relu2", attention="manual", bias=True),
    "rope-manual-tied": dict(position="rope", attention="manual", tie_weights=True),
}


def make_model(block_size: int = 16, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"tie_weights": False, **options}
    model = build_model(ModelConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    with torch.no_grad():  # sharper than at initialisation, so sampling is not uniform noise
        model.lm_head.weight.mul_(8)
    return model


def prompt(seed: int, length: int) -> torch.Tensor:
    return torch.randint(VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def run(scheduler: Scheduler, idx: torch.Tensor, n_new: int, seed: int, **kw) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    steps = scheduler.decode(idx, n_new, temperature=kw.pop("temperature", 1.0), generator=generator, **kw)
    return [step.ids.tolist() for step in steps]


def run_together(scheduler: Scheduler, jobs: list[dict]) -> list[list[list[int]]]:
    """Submit every job at once, read them in threads; each job's steps, in order."""
    results: list = [None] * len(jobs)
    iterators = [scheduler.decode(j["idx"], j["n_new"], generator=torch.Generator().manual_seed(j["seed"]),
                                  **{"temperature": 1.0, **j.get("kw", {})}) for j in jobs]

    def read(i):
        results[i] = [step.ids.tolist() for step in iterators[i]]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("others", [1, 3, 15])
def test_a_request_gets_the_same_tokens_alone_and_beside_others(options, others):
    """40 tokens from a 16-token context (two window jumps), n=2, beside requests of other lengths, prompts, n."""
    model = make_model(**options)
    scheduler = Scheduler(model, slots=16, max_waiting=64)
    try:
        target = dict(idx=prompt(1, 5), n_new=40, seed=7, kw={"num_samples": 2})
        alone = run_together(scheduler, [target])[0]
        crowd = [dict(idx=prompt(100 + i, 3 + i % 11), n_new=10 + 7 * i % 45, seed=i) for i in range(others)]
        together = run_together(scheduler, crowd[: others // 2] + [target] + crowd[others // 2:])
        assert together[others // 2] == alone
        assert len(alone) == 40 and all(len(ids) == 2 for ids in alone)
    finally:
        scheduler.close()


@pytest.mark.parametrize("n", [1, 3])
def test_plain_requests_draw_what_multinomial_draws_from_their_logits(n):
    """The batched draw (argmax(probs / Exp(1)), batching._batched_step) is torch.multinomial's, generator state and all."""
    model = make_model()
    scheduler = Scheduler(model, slots=8)
    try:
        others = [scheduler.decode(prompt(60 + i, 4), 30, temperature=0.7, generator=torch.Generator().manual_seed(i))
                  for i in range(3)]
        steps = list(scheduler.decode(prompt(2, 5), 30, temperature=0.7, num_samples=n,
                                      generator=torch.Generator().manual_seed(11)))
        for other in others:
            list(other)
        replay = torch.Generator().manual_seed(11)
        for step in steps:
            probs = torch.softmax(step.logits.float() / 0.7, dim=-1)
            assert step.ids.tolist() == torch.multinomial(probs, 1, generator=replay).squeeze(-1).tolist()
        assert len(steps) == 30
    finally:
        scheduler.close()


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_greedy_batched_text_equals_the_engines_through_window_jumps(options):
    """The scheduler's positions, masks and window jumps reproduce engine.decode's greedy text."""
    model = make_model(**options)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # decisive: kernel differences cannot flip a choice
    idx = prompt(3, 6)
    reference = [s.ids.tolist() for s in decode(model, idx, 45, temperature=0)]
    scheduler = Scheduler(model, slots=4)
    try:
        busy = scheduler.decode(prompt(4, 9), 45, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert run(scheduler, idx, 45, seed=0, temperature=0) == reference
        list(busy)
    finally:
        scheduler.close()


def test_stop_strings_and_samples_through_stream_completion_match_a_solo_run():
    tok = CharTokenizer(list("abcdefghijklm"))
    model = make_model()
    scheduler = Scheduler(model, slots=8)
    settings = SamplingSettings(max_new_tokens=30, temperature=1.0, stop=["ab", "k"], num_samples=3, seed=5)
    try:
        def texts():
            out = {}
            for chunks in stream_completion(model, tok, "defgh", settings, decoder=scheduler.decode):
                for c in chunks:
                    out[c.index] = out.get(c.index, "") + c.text
            return out

        alone = texts()
        noise = [scheduler.decode(prompt(50 + i, 4), 25, generator=torch.Generator().manual_seed(i)) for i in range(5)]
        beside = texts()
        for steps in noise:
            list(steps)
        assert alone == beside and set(alone) == {0, 1, 2}
    finally:
        scheduler.close()


def test_a_full_line_is_refused_and_a_reader_that_leaves_frees_its_slot():
    model = make_model()
    scheduler = Scheduler(model, slots=1, max_waiting=1)
    try:
        first = scheduler.decode(prompt(1, 3), 10_000, generator=torch.Generator().manual_seed(0))
        next(first)  # running in the only slot
        second = scheduler.decode(prompt(2, 3), 5, generator=torch.Generator().manual_seed(0))  # waits
        with pytest.raises(ServerBusy) as busy:
            scheduler.decode(prompt(3, 3), 5)
        assert busy.value.retry_after >= 1
        first.close()  # the client went away
        assert len(list(second)) == 5  # so the waiting request got the slot
        deadline = time.monotonic() + 5
        while scheduler.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load() == {"running": 0, "waiting": 0, "slots": 1}
    finally:
        scheduler.close()


def test_a_request_past_its_time_limit_ends():
    model = make_model()
    scheduler = Scheduler(model, slots=2, request_timeout=0.2)
    try:
        steps = list(scheduler.decode(prompt(1, 3), 1_000_000, generator=torch.Generator().manual_seed(0)))
        assert 0 < len(steps) < 1_000_000
    finally:
        scheduler.close()


def test_slot_cache_masks_each_row_by_its_own_length():
    cache = SlotCache(n_layer=1, slots=3, n_head=1, block_size=4, head_size=2)
    source = KVCache(1, 1, 1, 4, 2)
    source.keys[0, 0, 0, :2] = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    source.length = 2
    cache.load(1, source)
    cache.prepare_step(torch.tensor([False, True, True]))
    assert cache.length.flatten().tolist() == [0, 2, 0]
    mask = cache.attention_mask[:, 0, 0].tolist()
    assert mask == [[False, False, False, False, True],  # idle: its scratch position only
                    [True, True, True, False, False],  # two cached keys and the new one
                    [True, False, False, False, False]]  # an empty slot: the new key only
    keys, _ = cache.update(0, torch.full((3, 1, 1, 2), 9.0), torch.zeros(3, 1, 1, 2))
    assert keys[1, 0, :3, 0].tolist() == [1.0, 2.0, 9.0] and keys[0, 0, 4, 0] == 9.0
    cache.advance(1)
    assert cache.lengths.tolist() == [0, 3, 1]


def test_the_server_answers_429_when_full_and_a_client_that_leaves_frees_its_slot():
    import httpx
    from serving import running_server

    from scratchgpt.server import BatchingLimits, create_app

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
