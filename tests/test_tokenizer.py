import pytest
from hypothesis import given
from hypothesis import strategies as st

from scratchgpt.errors import TokenizerError
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
