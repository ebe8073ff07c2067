"""The compiled decoding step computes what the eager one does, and falls back to eager, saying so once."""

from __future__ import annotations

import pytest
import torch
from conftest import sharpen

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.inference import compiled
from scratchgpt.inference.cache import KVCache
from scratchgpt.inference.engine import Engine, Request, SamplingSettings
from scratchgpt.sample import generate_naive

VOCAB = 13


def make_model(seed: int = 0, **options):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=False, **options)
    return sharpen(build_model(config).eval())


def decode(model, compile: bool, requests: list[tuple[list[int], SamplingSettings, int]]) -> list[list[list[int]]]:
    """Several requests side by side on one engine (rows of other lengths, idle rows): each one's ids per step."""
    engine = Engine(model, rows=4, compile=compile)
    live = [Request(prompt, settings, torch.Generator().manual_seed(seed)) for prompt, settings, seed in requests]
    steps: dict[int, list[list[int]]] = {i: [] for i in range(len(live))}
    for i, request in enumerate(live):
        steps[i].append(engine.start(request).ids)
    while engine.running:
        for output in engine.step():
            steps[live.index(output.request)].append(output.ids)
    return [steps[i] for i in range(len(live))]


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(norm="rmsnorm", bigram_embed=True)], ids=["qk-norm", "bigram-embed"])
def test_the_compiled_step_gives_the_eager_steps_text_through_window_jumps(options):
    model = make_model(position="rope", **options)
    requests = [([1, 2, 3], SamplingSettings(max_new_tokens=40, temperature=0), 0),
                ([4, 5], SamplingSettings(max_new_tokens=30, temperature=0.8, top_k=5, num_samples=2), 1),
                ([6] * 9, SamplingSettings(max_new_tokens=20, temperature=1.0, repetition_penalty=1.3), 2)]
    eager = decode(model, False, requests)
    assert decode(model, True, requests) == eager
    step = compiled.compiled_step_for(model)
    assert step.ran == {"decode", "prefill"} and step.failed is None  # prompts and window jumps prefilled compiled
    assert all(m.use_sdpa for m in model.modules() if hasattr(m, "use_sdpa"))  # traced written out, left fused
    reference = [int(ids[0]) for ids in generate_naive(model, torch.tensor([[1, 2, 3]]), 40, temperature=0)]
    assert [ids[0] for ids in eager[0]] == reference


def test_the_compiled_prefill_writes_what_the_eager_one_writes_for_any_window_length():
    model = make_model(position="rope", qk_norm=True)
    step = compiled.compiled_step_for(model)
    torch.manual_seed(1)
    for length in (compiled.MIN_PREFILL, 7, 16):  # one program, its length left free up to block_size
        tokens, rows = torch.randint(0, VOCAB, (1, length)), torch.tensor([2])
        eager, built = KVCache.for_model(model, rows=4), KVCache.for_model(model, rows=4)
        with torch.inference_mode():
            torch.testing.assert_close(step.prefill(model, tokens, built, rows),
                                       compiled.eager_prefill(model, tokens, eager, rows))
        for a, b in zip(built.state(), eager.state(), strict=True):
            torch.testing.assert_close(a, b)  # keys and values of every layer, lengths, last tokens
        assert built.lengths.tolist() == [0, 0, length, 0]
    assert step.ran == {"prefill"} and step.failed is None


def test_the_first_compiled_step_after_an_eager_prefill_attends_over_what_the_cache_holds():
    model = make_model(position="rope", qk_norm=True)
    step = compiled.compiled_step_for(model)  # fresh: this engine's first compiled pass is a decoding step
    rows, active = torch.tensor([0]), torch.ones(1, dtype=torch.bool)
    eager, built = KVCache.for_model(model, rows=1), KVCache.for_model(model, rows=1)
    with torch.inference_mode():
        step.prefill(model, torch.tensor([[3]]), built, rows)  # one token: shorter than MIN_PREFILL, eager
        compiled.eager_prefill(model, torch.tensor([[3]]), eager, rows)
        for position, token in enumerate([5, 1, 8], start=2):
            torch.testing.assert_close(step(model, torch.tensor([[token]]), built, active, position),
                                       compiled.eager_step(model, torch.tensor([[token]]), eager, active, position))
    assert step.ran == {"decode"}


def test_the_bigram_takes_the_same_compiled_path():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_type="bigram", vocab_size=VOCAB, block_size=16)).eval()
    with torch.no_grad():
        model.logits_table.weight.mul_(100)  # far from ties
    requests = [([1, 2, 3], SamplingSettings(max_new_tokens=30, temperature=0.9), 4),
                ([5], SamplingSettings(max_new_tokens=25, temperature=0), 5)]
    assert decode(model, True, requests) == decode(model, False, requests)
    assert compiled.compiled_step_for(model).ran == {"decode", "prefill"}


def test_a_step_that_cannot_compile_runs_eager_and_says_so_once(monkeypatch):
    model = make_model()
    said = []
    step = compiled.CompiledStep(say=said.append)

    def broken(*args):
        raise RuntimeError("InductorError: no C++ compiler here\nmore lines")

    monkeypatch.setattr(compiled, "load_program", broken)
    monkeypatch.setattr(compiled, "_steps", {model: step})
    requests = [([1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0), 0)]
    assert decode(model, True, requests) == decode(model, False, requests)
    assert len(said) == 1 and "could not be compiled" in said[0] and "no C++ compiler here" in said[0]


def test_a_model_of_the_same_shape_loads_the_built_program_and_runs_its_own_weights(monkeypatch):
    first = make_model(position="rope", qk_norm=True)
    requests = [([1, 2, 3], SamplingSettings(max_new_tokens=25, temperature=0), 0),
                ([4, 5], SamplingSettings(max_new_tokens=20, temperature=0.9, top_k=4), 3)]
    decode(first, True, requests)  # built now, or already by an earlier test
    other = make_model(seed=7, position="rope", qk_norm=True)  # the same shape, other weights
    built = []
    monkeypatch.setattr(torch.export, "export", lambda *args, **kw: built.append(1) or 1 / 0)
    eager = decode(other, False, requests)
    assert decode(other, True, requests) == eager != decode(first, False, requests)
    assert not built and compiled.compiled_step_for(other).failed is None  # loaded from disk, never exported
    assert len(list(compiled.package_path(other).parent.glob("*.pt2"))) >= 1

    one_row = Engine(other, rows=1, compile=True)  # any number of rows: the same programs, nothing built
    greedy = SamplingSettings(max_new_tokens=20, temperature=0)
    request = Request([4, 5, 6], greedy, None)
    ids = [one_row.start(request).ids]
    while one_row.running:
        ids += [output.ids for output in one_row.step()]
    assert ids == decode(other, False, [([4, 5, 6], greedy, 0)])[0]
    assert not built and compiled.compiled_step_for(other).failed is None


def test_a_second_dtype_that_cannot_be_built_runs_eager_and_says_so_once(monkeypatch):
    model = make_model(position="rope", qk_norm=True)
    requests = [([1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0), 0)]
    decode(model, True, requests)  # built, or loaded from an earlier test's build
    step = compiled.compiled_step_for(model)
    assert step.ran == {"decode", "prefill"}
    said = []
    monkeypatch.setattr(step, "say", said.append)
    monkeypatch.setattr(compiled, "load_program", lambda *args: 1 / 0)
    model.double()  # another dtype: other programs, which now fail to build
    engine = Engine(model, rows=2, compile=True)
    request = Request([1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0), torch.Generator().manual_seed(0))
    ids = [engine.start(request).ids]
    while engine.running:
        ids += [output.ids for output in engine.step()]
    assert ids == decode(model, False, requests)[0]
    assert len(said) == 1 and "ZeroDivisionError" in said[0] and step.failed
