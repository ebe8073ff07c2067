import pytest
from hypothesis import given
from hypothesis import strategies as st

from scratchgpt.errors import TokenizerError
from scratchgpt.inference.text import TextStream
from scratchgpt.tokenizer import CharTokenizer, load_tokenizer, save_tokenizer, tokenizer_from_dict


def test_vocabulary_is_sorted_set_of_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([7, 5, 6, 4, 1]) == "world"


def test_unknown_character_is_refused_by_name():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abz")


def test_json_round_trip(tmp_path):
    tok = CharTokenizer.from_text("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich\n")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again == tok and again.encode("über") == tok.encode("über")


def test_foreign_description_is_refused():
    with pytest.raises(TokenizerError):
        tokenizer_from_dict({"type": "wordpiece", "vocab": {}})


@given(st.text(min_size=1))
def test_round_trip_any_text_over_its_own_vocabulary(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size


def test_shakespeare_vocabulary(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert len(text) == 1_115_394
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text[:1000])) == text[:1000]


# --- byte and BPE tokenizers -------------------------------------------------------------------

import functools  # noqa: E402
import json  # noqa: E402

from hypothesis import settings  # noqa: E402

from scratchgpt.tokenizer import (  # noqa: E402
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    byte_level_alphabet,
)

TRAINING_TEXT = (
    "the cat sat on the mat. the dog sat on the log; the fox ran past them all!\n"
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.\n"
    "東京は日本の首都です。 Ceci n'est pas une pipe. 12345 + 678 = 13023\n"
) * 20


@functools.lru_cache(maxsize=1)
def small_bpe() -> BPETokenizer:
    return BPETokenizer.train([TRAINING_TEXT], vocab_size=300)


def test_byte_tokenizer_by_hand():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.to_dict() == {"type": "byte"}
    assert tok.encode("aé中") == [0x61, 0xC3, 0xA9, 0xE4, 0xB8, 0xAD]
    assert tok.decode([0x61, 0xC3, 0xA9]) == "aé"
    assert tok.decode([0x61, 0xC3]) == "a\ufffd"  # half a character is replaced, not an error
    with pytest.raises(TokenizerError, match="256"):
        tok.decode([256])


def test_every_tokenizer_shares_the_interface():
    for tok in (CharTokenizer.from_text("ab"), ByteTokenizer(), small_bpe()):
        assert isinstance(tok, Tokenizer)
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert again == tok and again.kind == tok.kind and again.vocab_size == tok.vocab_size


def test_bpe_merges_frequent_sequences_and_saves_the_hf_json(tmp_path):
    tok = small_bpe()
    assert tok.vocab_size == 300 and tok.kind == "bpe"
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat") / 2
    d = tok.to_dict()
    assert set(d) == {"type", "hf_tokenizer"} and d["type"] == "bpe"
    assert d["hf_tokenizer"]["model"]["type"] == "BPE" and d["hf_tokenizer"] == json.loads(tok.hf.to_str())
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again == tok and again.encode(TRAINING_TEXT[:300]) == tok.encode(TRAINING_TEXT[:300])


def test_bpe_from_hf_wraps_a_tokenizers_object_and_refuses_other_models():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    wrapped = BPETokenizer.from_hf(HFTokenizer.from_str(small_bpe().hf.to_str()))
    assert wrapped == small_bpe() and wrapped.hf.get_vocab_size() == 300
    word_level = HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        BPETokenizer.from_hf(word_level)
    with pytest.raises(TokenizerError, match="at least the 256"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_bpe_from_hf_keeps_added_special_tokens_as_text():
    """GPT-2's tokenizer carries <|endoftext|> as an added token: its id decodes to its text."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(small_bpe().hf.to_str())
    hf.add_special_tokens(["<|endoftext|>"])
    tok = BPETokenizer.from_hf(hf)
    eot = hf.token_to_id("<|endoftext|>")
    assert tok.vocab_size == 301 and eot == 300
    assert tok.decode(tok.encode("the cat") + [eot]) == "the cat<|endoftext|>"


def test_bpe_decode_agrees_with_the_hf_decoder():
    tok = small_bpe()
    ids = tok.encode(TRAINING_TEXT[:500])
    assert tok.decode(ids) == tok.hf.decode(ids) == TRAINING_TEXT[:500]
    for i in range(tok.vocab_size):  # every single token whose bytes are whole characters
        raw = tok.decode_bytes([i])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.hf.decode([i]) == text


def test_byte_level_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    table = byte_level_alphabet()
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"  # the well-known ones
    assert "".join(table[b] for b in "é".encode()) == "Ã©"


def streamed(tokenizer, ids) -> str:
    """The text that engine.TextStream releases, one token at a time, then at the end."""
    stream = TextStream(tokenizer)
    return "".join(stream.add(i).text for i in ids) + stream.finish().text


def test_stream_holds_back_partial_characters():
    stream = TextStream(ByteTokenizer())
    assert [stream.add(b).text for b in "é!".encode()] == ["", "é", "!"]
    stream.add(0xE4)  # the first of three bytes: nothing final yet
    assert stream.finish().text == "\ufffd"


@given(st.text())
def test_byte_round_trip_any_unicode(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200)
@given(st.text())
def test_bpe_round_trip_any_unicode(text):
    tok = small_bpe()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@given(st.lists(st.integers(0, 255)))
def test_byte_decode_never_fails_and_streams_the_same(ids):
    tok = ByteTokenizer()
    assert streamed(tok, ids) == tok.decode(ids) == bytes(ids).decode("utf-8", "replace")


@given(st.lists(st.integers(0, 299)))
def test_bpe_decode_of_any_ids_never_fails_and_streams_the_same(ids):
    tok = small_bpe()
    assert streamed(tok, ids) == tok.decode(ids)


def test_char_decode_refuses_ids_outside_the_vocabulary():
    with pytest.raises(TokenizerError, match="outside"):
        CharTokenizer.from_text("ab").decode([0, 2])
