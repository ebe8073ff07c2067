"""The decoding engine: the KV cache against full forward passes, the engine against the naive
reference, samples from one prefill, the context window, failures that stay per request, stop
strings and incremental text."""

import pytest
import torch
from conftest import sharpen
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchgpt.build import build_model
from scratchgpt.config import ModelConfig
from scratchgpt.filters import sample_next
from scratchgpt.inference.cache import KVCache
from scratchgpt.inference.engine import (
    Engine,
    Request,
    SamplingError,
    SamplingSettings,
    default_keep,
    run,
    window_start,
)
from scratchgpt.inference.text import StopMatcher, TextStream, find_stop, partial_stop_length
from scratchgpt.model import GPT, Bigram
from scratchgpt.sample import generate, generate_naive, stream_completion
from scratchgpt.tokenizer import CharTokenizer

VOCAB = 13
OPTIONS = {
    "gpt2": {},
    "rope-rmsnorm-qknorm-swiglu": dict(position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu"),
    "relu2-manual-bias": dict(activation="relu2", attention="manual", bias=True),
    "rope-manual-gelu": dict(position="rope", attention="manual"),
    "embed-norm-softcap": dict(position="rope", norm="rmsnorm", embed_norm=True, logit_softcap=15.0),
    "bigram-embed": dict(position="rope", norm="rmsnorm", bigram_embed=True, embed_norm=True),
}


def make_gpt(block_size: int = 16, seed: int = 0, **options) -> GPT:
    """A random 2-layer GPT, sharpened so that greedy text varies and its choices are far from ties."""
    torch.manual_seed(seed)
    options = {"tie_weights": False, **options}
    config = ModelConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **options)
    return sharpen(build_model(config).eval())


def greedy(model, prompt, n, **kw) -> list[int]:
    return [int(ids[0]) for ids in generate(model, prompt, n, temperature=0, **kw)]


def naive_greedy(model, prompt, n, **kw) -> list[int]:
    return [int(ids[0]) for ids in generate_naive(model, prompt, n, temperature=0, **kw)]


def engine_tokens(model, prompt: list[int], settings: SamplingSettings, seed: int, keep=None) -> list[list[int]]:
    """Each step's ids of one request decoded alone."""
    request = Request(prompt, settings, torch.Generator().manual_seed(seed))
    return [output.ids for output in run(model, request, keep=keep)]


@pytest.mark.parametrize("options", [*OPTIONS.values(), dict(tie_weights=True)], ids=[*OPTIONS.keys(), "tied"])
def test_cached_logits_equal_a_full_forward_pass(options):
    model = make_gpt(**options)
    idx = torch.randint(VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)  # (3, 16, V)
    cache = KVCache.for_model(model, rows=3)
    rows = torch.arange(3)
    with torch.no_grad():
        cache.prefill(rows, 5)
        pieces = [model(idx[:, :5], cache=cache)[0]]  # a prefill of 5 positions
        cache.advance()
        for t in range(5, 16):  # then one token at a time, every row at its own position
            cache.decode(torch.ones(3, dtype=torch.bool))
            pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
            cache.advance()
    assert cache.lengths.tolist() == [16, 16, 16]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_and_idle_rows_do_not_mix():
    model = make_gpt(position="rope")
    a, b = [1, 2, 3, 4, 5, 6], [7, 8]
    cache = KVCache.for_model(model, rows=3)  # row 2 stays idle throughout
    with torch.no_grad():
        for row, ids in ((0, a[:-1]), (1, b[:-1])):
            cache.prefill(torch.tensor([row]), len(ids))
            model(torch.tensor([ids]), cache=cache)
            cache.advance()
        cache.decode(torch.tensor([True, True, False]))
        logits = model(torch.tensor([[a[-1]], [b[-1]], [0]]), cache=cache)[0][:, -1]
        cache.advance()
    assert cache.lengths.tolist() == [6, 2, 0]
    torch.testing.assert_close(logits[0], model(torch.tensor([a]))[0][0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(torch.tensor([b]))[0][0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_greedy_engine_equals_the_naive_reference_within_and_past_block_size(options):
    model = make_gpt(**options)
    for prompt in (torch.tensor([[1, 2, 3]]), torch.randint(VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))):
        # 60 new tokens through a 16-token window: several jumps; the second prompt is longer than the window
        engine = greedy(model, prompt, 60)
        assert engine == naive_greedy(model, prompt, 60)
        assert len(set(engine)) >= 3  # not a degenerate constant sequence


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
    prompt = [4, 5]
    expected = textbook_sliding_window(model, torch.tensor([prompt]), 40)
    steps = engine_tokens(model, prompt, SamplingSettings(max_new_tokens=40, temperature=0), seed=0, keep=16)
    assert [ids[0] for ids in steps] == expected
    assert naive_greedy(model, torch.tensor([prompt]), 40, keep=16) == expected


def test_window_start_by_hand():
    # block_size 8, keep 6: the window grows to 8 tokens, then jumps to the last 6
    starts, start = [], 0
    for length in range(1, 16):
        start = window_start(length, start, 8, 6)
        starts.append(start)
    assert starts == [0] * 8 + [3, 3, 3, 6, 6, 6, 9]
    assert default_keep(256) == 192 and default_keep(1) == 1


def test_the_engine_prefills_once_per_window_jump():
    model = make_gpt(block_size=8)
    seen = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    greedy(model, torch.tensor([[1, 2, 3]]), 10)
    # prefill 3; one per step up to 8 tokens; at 9 the window jumps to the last 6 (keep) and is
    # prefilled again; one per step up to 8 again; at 12 the next jump
    assert seen == [(1, 3)] + [(1, 1)] * 5 + [(1, 6)] + [(1, 1)] * 2 + [(1, 6)]


def test_every_pass_runs_in_inference_mode_whether_or_not_the_caller_holds_it():
    model = make_gpt()
    modes = []
    model.transformer.wte.register_forward_hook(lambda *args: modes.append(torch.is_inference_mode_enabled()))
    for held in (False, True):
        engine = Engine(model, rows=1)
        request = Request([1, 2, 3], SamplingSettings(max_new_tokens=3, temperature=0), None)
        with torch.inference_mode(held):
            engine.start(request)
            while engine.running:
                engine.step()
            assert torch.is_inference_mode_enabled() == held  # the caller's mode, as it was
    assert modes == [True] * 6  # a prefill and two steps, twice


def test_the_bigram_takes_the_same_path_and_agrees_with_the_reference():
    torch.manual_seed(0)
    model = Bigram(ModelConfig(model_type="bigram", vocab_size=VOCAB, block_size=8)).eval()
    with torch.no_grad():
        model.logits_table.weight.mul_(100)
    prompt = torch.tensor([[0, 1]])
    assert greedy(model, prompt, 30) == naive_greedy(model, prompt, 30)  # 30 tokens: window jumps too
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [int(ids[0]) for ids in generate(model, prompt, 30, generator=g1)]
    assert a == [int(ids[0]) for ids in generate_naive(model, prompt, 30, generator=g2)]


@pytest.mark.parametrize("settings", [dict(temperature=0.9, top_k=8, top_p=0.95, repetition_penalty=1.3),
                                      dict(temperature=0.7), dict(temperature=1.3, top_p=0.5)],
                         ids=["filters", "plain", "top-p"])
def test_the_engines_draw_is_the_references_bit_for_bit(settings):
    model = make_gpt(position="rope", qk_norm=True)
    prompt = torch.tensor([[1]]).expand(3, -1)  # three samples: the race fills their rows from one generator
    ours = [ids.tolist() for ids in generate(model, prompt, 50, generator=torch.Generator().manual_seed(11), **settings)]
    reference = [ids.tolist() for ids in generate_naive(model, prompt, 50, generator=torch.Generator().manual_seed(11),
                                                        **settings)]
    assert ours == reference


def test_the_race_is_multinomial():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = sample_next(logits, 0.8, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits / 0.8, dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(1))
    assert torch.equal((probs / noise).argmax(-1), expected)


def test_samples_from_one_prefill():
    model = make_gpt()
    prompt = [1, 2, 3, 4]
    shapes = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    steps = engine_tokens(model, prompt, SamplingSettings(max_new_tokens=10, num_samples=4), seed=0)
    assert shapes[0] == (1, 4) and set(shapes[1:]) == {(4, 1)}  # one prefill, then the batch of 4
    rows = torch.tensor(steps).T  # (4, 10)
    assert len({tuple(r.tolist()) for r in rows}) > 1  # the samples differ
    # the same as the reference drawing 4 samples of the same prompt from the same seed
    reference = generate_naive(model, torch.tensor([prompt]).expand(4, -1), 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack(list(reference), dim=1), rows)
    greedy_rows = engine_tokens(model, prompt, SamplingSettings(max_new_tokens=10, temperature=0, num_samples=3), seed=0)
    assert all(list(row) == greedy(model, torch.tensor([prompt]), 10) for row in zip(*greedy_rows, strict=True))


def test_a_request_whose_arithmetic_breaks_fails_alone():
    model = make_gpt()
    engine = Engine(model, rows=3)
    normal = Request([1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0.8), torch.Generator().manual_seed(4))
    # past validation (which refuses these): a penalty that drives every seen logit to infinity, and its NaN
    broken = Request([1, 2, 3], SamplingSettings(max_new_tokens=20, repetition_penalty=1e-40, top_k=3),
                     torch.Generator().manual_seed(5))
    outputs = [engine.start(normal), engine.start(broken)]
    while engine.running:
        outputs += engine.step()
    assert broken.error is not None and isinstance(broken.error, SamplingError) and broken.done
    assert [o.ids for o in outputs if o.request is broken] == [[]]
    alone = engine_tokens(model, [1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0.8), seed=4)
    assert [o.ids for o in outputs if o.request is normal] == alone
    assert engine.free_rows == [0, 1, 2]  # both gave their rows back


def test_empty_prompt_bad_keep_and_too_many_samples_are_refused():
    model = make_gpt()
    with pytest.raises(SamplingError, match="empty"):
        Request([], SamplingSettings())
    with pytest.raises(SamplingError, match="keep"):
        Engine(model, keep=17)
    with pytest.raises(SamplingError, match="n must be"):
        Engine(model, rows=2).start(Request([1], SamplingSettings(num_samples=3)))


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


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab\n", max_size=6), max_size=12),
       stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=5), max_size=4))
def test_the_stop_matcher_agrees_with_the_plain_search(pieces, stops):
    matcher, text = StopMatcher(stops), ""
    for piece in pieces:
        text += piece
        found = matcher.feed(piece)
        assert found == find_stop(text, stops)  # the earliest stop in the text so far, found in the piece it ends in
        if found is not None:
            return
        assert matcher.waiting == partial_stop_length(text, stops)


class CountedStr(str):
    """A string that counts how often a character of it is read."""

    reads = 0

    def __getitem__(self, index):
        CountedStr.reads += 1
        return str.__getitem__(self, index)


def test_the_stop_matcher_is_linear_in_the_text():
    """A hostile stop (256 characters of one letter, then another) and text that keeps almost matching it."""
    matcher = StopMatcher([CountedStr("a" * 255 + "b")])
    CountedStr.reads = 0
    assert matcher.feed("a" * 2000) is None and matcher.waiting == 255
    first = CountedStr.reads
    CountedStr.reads = 0
    assert matcher.feed("a" * 8000) is None
    assert first < 6 * 2000 and CountedStr.reads < 6 * 8000  # a few reads per character, not one per stop character


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


class CountingTokenizer(ByteTokenizer):
    """Counts the ids it is asked to decode."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def test_text_is_decoded_incrementally_not_again_from_the_start():
    tok = CountingTokenizer()
    stream = TextStream(tok, stop=["zz"])
    text = "héllo wörld, " * 40  # 520 characters, some of two bytes
    for b in text.encode():
        stream.add(b)
    assert stream.finish().text == "" and stream.text == text
    assert tok.decoded < 6 * len(text.encode())  # a few ids per token; decoding from the start: ~150,000


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
    for bad in (dict(temperature=-0.5), dict(temperature=1e-30), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                dict(repetition_penalty=0), dict(repetition_penalty=1e-30), dict(repetition_penalty=1e9),
                dict(num_samples=0), dict(stop=[""])):
        with pytest.raises(SamplingError):
            SamplingSettings(**bad).validate()
