"""The generation engine: the KV cache against full forward passes, cached decoding against the
naive reference, batches from one prefill, the context window, stop strings and streamed text."""

import threading

import pytest
import torch
from conftest import sharpen

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.engine import (
    SamplingError,
    SamplingSettings,
    TextStream,
    decode,
    default_keep,
    find_stop,
    partial_stop_length,
    stream_completion,
    window_start,
)
from scratchgpt.kv_cache import KVCache
from scratchgpt.model import GPT, Bigram
from scratchgpt.tokenizer import CharTokenizer

VOCAB = 13
OPTIONS = {
    "gpt2": {},
    "rope-rmsnorm-qknorm-swiglu": dict(position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu"),
    "relu2-manual-bias": dict(activation="relu2", attention="manual", bias=True),
    "rope-manual-gelu": dict(position="rope", attention="manual"),
}


def make_gpt(block_size: int = 16, seed: int = 0, **options) -> GPT:
    """A random 2-layer GPT, sharpened so that greedy text varies and its choices are far from ties."""
    torch.manual_seed(seed)
    options = {"tie_weights": False, **options}
    config = ModelConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **options)
    return sharpen(build_model(config).eval())


def greedy(model, prompt, n, **kw) -> list[int]:
    return [int(s.ids[0]) for s in decode(model, prompt, n, temperature=0, **kw)]


@pytest.mark.parametrize("options", [*OPTIONS.values(), dict(tie_weights=True)], ids=[*OPTIONS.keys(), "tied"])
def test_cached_logits_equal_a_full_forward_pass(options):
    model = make_gpt(**options)
    idx = torch.randint(VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)  # (3, 16, V)
    cache = KVCache.for_model(model, batch_size=3)
    pieces = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:8], cache=cache)[0]]  # a prefill, then a chunk of 3
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]  # then one token at a time
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(idx[:, :1], cache=cache)  # the cache is full


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_greedy_cached_equals_naive_within_and_past_block_size(options):
    model = make_gpt(**options)
    for prompt in (torch.tensor([[1, 2, 3]]), torch.randint(VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))):
        # 60 new tokens through a 16-token window: several jumps; the second prompt is longer than the window
        cached = list(decode(model, prompt, 60, temperature=0))
        naive = list(decode(model, prompt, 60, temperature=0, use_cache=False))
        assert [int(s.ids[0]) for s in cached] == [int(s.ids[0]) for s in naive]
        for a, b in zip(cached, naive, strict=True):  # not only the same choices: the same distributions
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
        assert len({int(s.ids[0]) for s in cached}) >= 3  # not a degenerate constant sequence


def textbook_sliding_window(model, prompt, n) -> list[int]:
    """The classic loop: a full forward pass over the last block_size tokens at every step."""
    tokens, out = prompt, []
    for _ in range(n):
        next_id = model(tokens[:, -model.config.block_size:])[0][:, -1].argmax(-1)
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)
        out.append(int(next_id))
    return out


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_keep_block_size_is_the_textbook_sliding_window(position):
    model = make_gpt(position=position)
    prompt = torch.tensor([[4, 5]])
    expected = textbook_sliding_window(model, prompt, 40)
    assert greedy(model, prompt, 40, keep=16) == expected
    assert greedy(model, prompt, 40, keep=16, use_cache=False) == expected


def test_window_start_by_hand():
    # block_size 8, keep 6: the window grows to 8 tokens, then jumps to the last 6
    starts, start = [], 0
    for length in range(1, 16):
        start = window_start(length, start, 8, 6)
        starts.append(start)
    assert starts == [0] * 8 + [3, 3, 3, 6, 6, 6, 9]
    assert default_keep(256) == 192 and default_keep(1) == 1


def test_cached_path_prefills_once_per_window_jump():
    model = make_gpt(block_size=8)
    seen = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    list(decode(model, torch.tensor([[1, 2, 3]]), 10, temperature=0))
    # prefill 3; one per step up to 8 tokens; at 9 the window jumps to the last 6 (keep) and is
    # prefilled again; one per step up to 8 again; at 12 the next jump
    assert seen == [(1, 3)] + [(1, 1)] * 5 + [(1, 6)] + [(1, 1)] * 2 + [(1, 6)]


def test_bigram_needs_no_cache_and_agrees_with_naive():
    torch.manual_seed(0)
    model = Bigram(ModelConfig(model_type="bigram", vocab_size=VOCAB, block_size=8)).eval()
    with torch.no_grad():
        model.logits_table.weight.mul_(100)
    prompt = torch.tensor([[0, 1]])
    assert greedy(model, prompt, 30) == greedy(model, prompt, 30, use_cache=False)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [int(s.ids[0]) for s in decode(model, prompt, 30, generator=g1)]
    assert a == [int(s.ids[0]) for s in decode(model, prompt, 30, generator=g2, use_cache=False)]


def test_sampling_with_filters_is_the_same_with_and_without_cache():
    model = make_gpt(position="rope", qk_norm=True)
    prompt = torch.tensor([[1]])

    def run(use_cache):
        g = torch.Generator().manual_seed(11)
        steps = decode(model, prompt, 50, temperature=0.9, top_k=8, top_p=0.95, repetition_penalty=1.3,
                       generator=g, use_cache=use_cache)
        return [int(s.ids[0]) for s in steps]

    assert run(True) == run(False)


def test_batch_of_samples_from_one_prefill():
    model = make_gpt()
    prompt = torch.tensor([[1, 2, 3, 4]])
    shapes = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    steps = list(decode(model, prompt, 10, num_samples=4, generator=torch.Generator().manual_seed(0)))
    assert shapes[0] == (1, 4) and set(shapes[1:]) == {(4, 1)}  # one prefill, then the batch of 4
    rows = torch.stack([s.ids for s in steps], dim=1)  # (4, 10)
    assert len({tuple(r.tolist()) for r in rows}) > 1  # the samples differ
    # every row's logits are those of a full forward pass over that row's own text
    texts = torch.cat([prompt.expand(4, -1), rows], dim=1)  # (4, 14)
    full, _ = model(texts[:, :-1])
    for t, step in enumerate(steps):
        torch.testing.assert_close(step.logits, full[:, 3 + t], atol=1e-5, rtol=1e-5)
    # greedy: every sample is the single greedy continuation
    batch = torch.stack([s.ids for s in decode(model, prompt, 10, temperature=0, num_samples=3)], dim=1)
    assert all(row.tolist() == greedy(model, prompt, 10) for row in batch)


def test_cancel_stops_between_steps_and_the_lock_is_held_for_each_forward():
    model = make_gpt()
    cancel = threading.Event()
    calls = []

    class Lock:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    produced = 0
    for _ in decode(model, torch.tensor([[1]]), 100, cancel=cancel, step_lock=Lock()):
        produced += 1
        if produced == 5:
            cancel.set()
    assert produced == 5 and calls == ["enter", "exit"] * 5


def test_empty_prompt_and_bad_keep_are_refused():
    model = make_gpt()
    with pytest.raises(SamplingError, match="at least one token"):
        list(decode(model, torch.zeros(1, 0, dtype=torch.long), 3))
    with pytest.raises(SamplingError, match="keep"):
        list(decode(model, torch.tensor([[1]]), 3, keep=17))


# ---------------------------------------------------------------------------------------------
# Stop strings and streamed text


def test_find_stop_and_partial_stop_by_hand():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["xyz"]) is None
    assert find_stop("abcabc", ["abc"], begin=1) == 3
    assert partial_stop_length("the end", ["endgame"]) == 3  # "end" may grow into "endgame"
    assert partial_stop_length("the en", ["\n\n", "end"]) == 2
    assert partial_stop_length("abc", ["xyz"]) == 0
    assert partial_stop_length("a\n", ["\n\n"]) == 1


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it():
    tok = CharTokenizer(list("abc\n "))
    stream = TextStream(tok, stop=["\n\n", "cab"])
    released = [stream.add(i).text for i in tok.encode("ab\nc")]
    assert released == ["a", "b", "", "\n"]  # "\n" waits (it may start "\n\n"); then "c" waits (it may start "cab")
    assert stream.text == "ab\nc"
    chunk = stream.add(tok.encode("a")[0])
    assert chunk.text == "" and stream.finish_reason is None  # "ca" may still become "cab"
    chunk = stream.add(tok.encode("b")[0])
    assert chunk.text == "" and stream.finish_reason == "stop" and stream.text == "ab\n"
    assert stream.finish().text == ""  # nothing after a stop


def test_text_stream_releases_everything_at_the_end_and_tracks_tokens():
    tok = CharTokenizer(list("xy\n"))
    stream = TextStream(tok, stop=["\n\n"])
    chunks = [stream.add(i) for i in tok.encode("xy\n")] + [stream.finish()]
    assert "".join(c.text for c in chunks) == "xy\n" and stream.finish_reason == "length"
    assert [list(c.tokens) for c in chunks] == [[0], [1], [], [2]]


class ByteTokenizer:
    """Bytes as tokens, decoded as UTF-8 with replacement, like a byte-level tokenizer."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_released_whole():
    tok = ByteTokenizer()
    stream = TextStream(tok)
    released = [stream.add(b).text for b in "aé€".encode()]
    assert released == ["a", "", "é", "", "", "€"]
    assert stream.finish().text == ""


def test_stream_completion_stops_and_reports_logprobs():
    model = make_gpt()
    tok = CharTokenizer(list("abcdefghijklm"))  # 13 characters = VOCAB
    settings = SamplingSettings(max_new_tokens=30, temperature=0, logprobs=3)
    chunks = [c for step in stream_completion(model, tok, "abc", settings) for c in step]
    text = "".join(c.text for c in chunks)
    assert len(text) == 30 and chunks[-1].finish_reason == "length"
    assert text == "".join(tok.decode([i]) for i in greedy(model, torch.tensor([tok.encode("abc")]), 30))
    details = [d for c in chunks for d in c.tokens]
    assert [d.text for d in details] == list(text) and [d.offset for d in details] == list(range(30))
    # the first token's log-probability is that of the model's own distribution after the prompt
    expected = torch.log_softmax(model(torch.tensor([tok.encode("abc")]))[0][0, -1], -1)
    assert details[0].logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert len(details[0].top) == 3 and max(details[0].top.values()) == pytest.approx(details[0].logprob)
    # a stop string found in the greedy text ends it just before
    stop = text[10:12]
    stopped = [c for step in stream_completion(model, tok, "abc", SamplingSettings(max_new_tokens=30, temperature=0,
                                                                                    stop=[stop])) for c in step]
    assert "".join(c.text for c in stopped) == text[: text.index(stop)] and stopped[-1].finish_reason == "stop"


def test_settings_are_validated_with_the_callers_names():
    for bad_length in (-1, 0):
        with pytest.raises(SamplingError, match="max_tokens must be >= 1"):
            SamplingSettings(max_new_tokens=bad_length).validate({"max_new_tokens": "max_tokens"})
    for bad in (dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(repetition_penalty=0),
                dict(num_samples=0), dict(stop=[""])):
        with pytest.raises(SamplingError):
            SamplingSettings(**bad).validate()
