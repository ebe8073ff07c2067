"""Any corpus, any tokenizer: files, directories and globs; refused inputs; chunked encoding; caches."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN_FLAGS
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchgpt.data as data_module
import scratchgpt.text as text_module
from scratchgpt.cli import main
from scratchgpt.data import prepare_dataset
from scratchgpt.errors import ConfigError, DataError, TokenizerError
from scratchgpt.text import FILE_SEPARATOR, find_corpus_files, read_text
from scratchgpt.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

PROSE = "".join(f"Line {i}: the {w} went to the market, and then home again.\n"
                for i, w in enumerate(["cat", "dog", "fox", "owl", "hen", "ram"] * 12))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


@pytest.fixture
def notes(tmp_path) -> Path:
    """A folder of notes: text files at several depths, a hidden folder, a picture, a file without suffix."""
    root = tmp_path / "notes"
    write(root / "b" / "2.txt", "second file, in b/\n" + PROSE)
    write(root / "a.md", "# first file\n" + PROSE)
    write(root / "b" / "1.txt", "in b/, sorted before 2.txt\n")
    write(root / "a" / "z.txt", "in a/, after a.md? no: the folder a sorts before a.md\n")
    write(root / ".git" / "config.txt", "hidden, never read\n")
    write(root / ".hidden.txt", "hidden too\n")
    write(root / "picture.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(root / "LICENSE", "no suffix: not taken from a directory\n")
    return root


def test_directory_is_read_recursively_in_sorted_order(notes):
    files, source = find_corpus_files(str(notes))
    assert [f.relative_to(notes).as_posix() for f in files] == ["a/z.txt", "a.md", "b/1.txt", "b/2.txt"]
    assert source == str(notes)


def test_glob_selects_files_in_sorted_order(notes):
    files, _ = find_corpus_files(str(notes / "**" / "*.txt"))
    assert [f.relative_to(notes).as_posix() for f in files] == ["a/z.txt", "b/1.txt", "b/2.txt"]
    with pytest.raises(DataError, match="matches no files"):
        find_corpus_files(str(notes / "*.nothing"))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_files_are_joined_and_split_by_characters_for_every_tokenizer(notes, kind):
    files, _ = find_corpus_files(str(notes))
    text = FILE_SEPARATOR.join(f.read_text(encoding="utf-8") for f in files)
    data = prepare_dataset(str(notes), kind=kind, vocab_size=300)
    n_train = int(len(text) * 0.9)  # the last 10% of the characters of the whole corpus validate
    assert data.tokenizer.kind == kind
    assert data.tokenizer.decode(data.train_ids.tolist()) == text[:n_train]
    assert data.tokenizer.decode(data.val_ids.tolist()) == text[n_train:]
    assert (data.train_chars, data.val_chars) == (n_train, len(text) - n_train)
    assert data.val_bytes == len(text[n_train:].encode("utf-8"))
    assert data.files == [str(f) for f in files]


def test_non_utf8_file_is_refused_by_name_and_offset_with_the_ways_out(tmp_path):
    bad = write(tmp_path / "corpus" / "old.txt", "Grüße aus Köln\n".encode("latin-1") * 50)
    write(tmp_path / "corpus" / "good.txt", PROSE)
    with pytest.raises(DataError) as exc:
        prepare_dataset(str(tmp_path / "corpus"))
    message = str(exc.value)
    assert str(bad) in message and "byte 0xfc at byte offset 2" in message  # G, r, then ü in Latin-1
    assert "--encoding" in message and "--skip-bad-files" in message


def test_skip_bad_files_leaves_them_out(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "a.txt", "Grüße\n".encode("latin-1"))
    write(folder / "b.txt", PROSE)
    write(folder / "c.txt", b"\x7fELF\x02\x01\x01\x00binary")
    logged = []
    data = prepare_dataset(str(folder), skip_bad_files=True, log=logged.append)
    assert data.files == [str(folder / "b.txt")]
    assert data.tokenizer.decode(data.train_ids.tolist()) + data.tokenizer.decode(data.val_ids.tolist()) == PROSE
    assert len(data.skipped) == 2 and "a.txt" in logged[0] and "NUL byte" in logged[1] and "offset 7" in logged[1]


def test_another_encoding_is_read_when_named(tmp_path):
    path = write(tmp_path / "latin.txt", ("Grüße aus Köln\n" * 30).encode("latin-1"))
    data = prepare_dataset(str(path), encoding="latin-1")
    assert "ü" in data.tokenizer.chars and data.train_chars + data.val_chars == 15 * 30
    with pytest.raises(ConfigError, match="unknown text encoding"):
        prepare_dataset(str(path), encoding="no-such-codec")
    with pytest.raises(ConfigError, match="tokenizer must be one of"):
        prepare_dataset(str(path), kind="words")


def test_offsets_are_right_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "READ_CHUNK", 7)  # characters straddle chunk boundaries
    path = write(tmp_path / "t.txt", "aé中" * 10 + "\n" + "x" * 5)
    assert read_text(path) == "aé中" * 10 + "\n" + "x" * 5
    write(path, "aé中".encode() * 3 + b"\xff")  # 6 bytes per repetition
    with pytest.raises(DataError, match="invalid byte 0xff at byte offset 18"):
        read_text(path)
    write(path, "aé中".encode() * 3 + "中".encode()[:2])  # a file cut in the middle of a character
    with pytest.raises(DataError, match="incomplete character .* at byte offset 18"):
        read_text(path)
    write(path, b"\xef\xbb\xbf" + "aé".encode())  # a byte-order mark is not text
    assert read_text(path) == "aé"


def test_empty_and_too_small_corpora_are_refused_with_sizes(tmp_path):
    empty = write(tmp_path / "empty" / "a.txt", "")
    write(tmp_path / "empty" / "b.md", "")
    with pytest.raises(DataError, match=r"empty holds no text: 2 file\(s\), 0 bytes, 0 characters"):
        prepare_dataset(str(empty.parent))
    small = write(tmp_path / "small.txt", "x" * 100)
    with pytest.raises(DataError) as exc:
        prepare_dataset(str(small), block_size=16)
    assert str(small) in str(exc.value) and "100 characters make 90 training and 10 validation tokens" in str(exc.value)
    assert "block_size + 1 = 17" in str(exc.value)
    assert len(prepare_dataset(str(small), block_size=9).val_ids) == 10  # exactly one window fits


def test_directory_without_text_files_is_refused(tmp_path):
    write(tmp_path / "pics" / "a.png", b"\x89PNG")
    with pytest.raises(DataError, match="holds no text files"):
        prepare_dataset(str(tmp_path / "pics"))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_second_run_reuses_the_cache(tmp_path, kind, monkeypatch):
    path = write(tmp_path / "c.txt", PROSE)
    first = prepare_dataset(str(path), kind=kind, vocab_size=300)

    def fail(*args, **kwargs):
        raise AssertionError("the cached corpus was read again")

    monkeypatch.setattr(data_module, "scan_corpus", fail)
    monkeypatch.setattr(data_module, "_write_splits", fail)
    monkeypatch.setattr(BPETokenizer, "train", fail)
    second = prepare_dataset(str(path), kind=kind, vocab_size=300)
    assert second.train_ids.filename == first.train_ids.filename and second.tokenizer == first.tokenizer
    monkeypatch.undo()
    write(path, PROSE + "one more line\n")  # new content, new cache
    third = prepare_dataset(str(path), kind=kind, vocab_size=300)
    assert third.train_ids.filename != first.train_ids.filename


def test_chunked_bpe_encoding_equals_encoding_the_whole_text(tmp_path, monkeypatch):
    # Runs of spaces and blank lines everywhere: cutting inside or just before one would change the ids.
    text = "".join(f"word{i}  \n\n   the {i % 7} cats   sat \n \nend.\n" for i in range(300))
    path = write(tmp_path / "c.txt", text)
    whole = prepare_dataset(str(path), kind="bpe", vocab_size=300)
    n_train = int(len(text) * 0.9)
    assert whole.train_ids.tolist() == whole.tokenizer.encode(text[:n_train])
    monkeypatch.setattr(data_module, "BPE_PIECE_CHARS", 64)  # many pieces, cut only where lines meet
    monkeypatch.setattr(text_module, "READ_CHUNK", 50)
    monkeypatch.setattr(data_module, "_CACHE_FORMAT", -1)  # a fresh cache entry
    chunked = prepare_dataset(str(path), tokenizer=whole.tokenizer)
    assert chunked.train_ids.filename != whole.train_ids.filename
    assert chunked.train_ids.tolist() == whole.train_ids.tolist()
    assert chunked.val_ids.tolist() == whole.tokenizer.encode(text[n_train:])


def test_large_character_vocabularies_use_wider_ids(tmp_path):
    cjk = "".join(chr(0x4E00 + i) for i in range(300)) * 2
    data = prepare_dataset(str(write(tmp_path / "cjk.txt", cjk)))
    assert data.tokenizer.vocab_size == 300 and data.train_ids.dtype == np.uint16
    assert data.tokenizer.decode(data.val_ids.tolist()) == cjk[int(len(cjk) * 0.9):]
    # 70,000 distinct characters: more than uint16 can number.
    wide = "".join(chr(c) for c in range(0x20000, 0x20000 + 70_000))
    data = prepare_dataset(str(write(tmp_path / "wide.txt", wide)))
    assert data.tokenizer.vocab_size == 70_000 and data.train_ids.dtype == np.uint32
    assert data.tokenizer.decode(data.train_ids[-3:].tolist()) == wide[int(70_000 * 0.9) - 3 : int(70_000 * 0.9)]


def test_byte_ids_are_the_utf8_bytes(tmp_path):
    text = "naïve café, 東京\n" * 20
    data = prepare_dataset(str(write(tmp_path / "u.txt", text)), kind="byte")
    assert isinstance(data.tokenizer, ByteTokenizer) and data.train_ids.dtype == np.uint8
    assert bytes(data.train_ids) == text[: int(len(text) * 0.9)].encode("utf-8")


def test_checkpoint_tokenizer_refuses_unknown_characters_naming_the_corpus(tmp_path):
    path = write(tmp_path / "other.txt", PROSE + "Ω")
    with pytest.raises(TokenizerError, match=r"other\.txt.*'Ω'"):
        prepare_dataset(str(path), tokenizer=CharTokenizer.from_text(PROSE))


def test_bits_per_character_counts_the_characters_of_multi_character_tokens(tmp_path):
    text = PROSE * 2
    data = prepare_dataset(str(write(tmp_path / "c.txt", text)), kind="bpe", vocab_size=300)
    val_text = text[int(len(text) * 0.9):]
    first = data.tokenizer.decode([int(data.val_ids[0])])
    assert data.val_target_chars == len(val_text) - len(first)  # eval predicts every token but the first
    assert data.val_target_bytes == len(val_text.encode()) - len(first.encode())
    assert len(data.val_ids) < data.val_chars / 2  # BPE tokens cover several characters here
    loss = 1.5
    assert data.bits_per_char(loss) == pytest.approx(loss * (len(data.val_ids) - 1) / data.val_target_chars / math.log(2))


TINY = [*TINY_TRAIN_FLAGS, "--max-steps", "4", "--eval-interval", "2"]


def test_cli_trains_bpe_on_a_directory_and_evaluates_in_bits_per_character(notes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(notes), "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(out), *TINY]) == 0
    saved = json.loads((out / "last" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["type"] == "bpe" and saved["hf_tokenizer"]["model"]["type"] == "BPE"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files, _ = find_corpus_files(str(notes))
    text = FILE_SEPARATOR.join(f.read_text(encoding="utf-8") for f in files)
    val_text = text[int(len(text) * 0.9):]
    assert result["val_chars"] < len(val_text) and result["val_tokens"] < result["val_chars"] / 2
    assert result["val_bpc"] == pytest.approx(result["val_loss"] * result["val_tokens"] / result["val_chars"] / math.log(2))
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * result["val_tokens"] / result["val_bytes"] / math.log(2))
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] * result["val_tokens"] / result["val_chars"] / math.log(2))
    assert main(["train", "--resume", str(out), "--tokenizer", "char", "--max-steps", "6", "--no-progress"]) == 1
    assert "trained with the bpe tokenizer" in capsys.readouterr().err


def test_cli_sample_streams_whole_characters_from_a_byte_model(tmp_path, capsys):
    import scratchgpt

    path = write(tmp_path / "u.txt", "naïve café, 東京の夜。\n" * 40)
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--tokenizer", "byte", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--prompt", "東", "--max-new-tokens", "40", "--seed", "5"]) == 0
    streamed = capsys.readouterr().out
    model, tokenizer = scratchgpt.load(out)
    assert streamed == "東" + scratchgpt.generate_text(model, tokenizer, "東", max_new_tokens=40, seed=5) + "\n"


@pytest.mark.parametrize("make,message", [
    (lambda d: write(d / "x.txt", b"caf\xe9"), "offset 3"),
    (lambda d: write(d / "x.txt", ""), "holds no text"),
    (lambda d: d / "*.nothing", "matches no files"),
])
def test_cli_corpus_errors_are_one_line(tmp_path, capsys, make, message):
    target = make(tmp_path)
    assert main(["train", "--data", str(target), "--out", str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@settings(max_examples=300)
@given(st.text(alphabet="ab1 \n\t'.é", max_size=80))
def test_bpe_pieces_are_cut_only_where_the_pre_tokenizer_splits_anyway(text):
    """GPT-2's pre-tokenizer gives the same pieces for the whole text as for the text cut at every cut point."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    cuts = [0, *(m.start() for m in data_module._BPE_CUT.finditer(text)), len(text)]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    whole = [token for token, _ in pre.pre_tokenize_str(text)]
    assert [token for piece in pieces for token, _ in pre.pre_tokenize_str(piece)] == whole
