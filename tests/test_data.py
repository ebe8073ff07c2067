import hashlib

import numpy as np
import pytest
import torch

from scratchgpt.batches import BatchSampler
from scratchgpt.data import prepare_dataset
from scratchgpt.errors import DataError
from scratchgpt.text import TINY_SHAKESPEARE_SHA256, tiny_shakespeare_path


def test_split_is_first_90_percent_by_characters(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(103))  # 103 characters: the split is at int(103 * 0.9) = 92
    path = tmp_path / "letters.txt"
    path.write_text(text, encoding="utf-8")
    data = prepare_dataset(str(path))
    assert data.train_chars == 92
    assert data.tokenizer.decode(data.train_ids.tolist()) == text[:92]
    assert data.tokenizer.decode(data.val_ids.tolist()) == text[92:]


def test_shakespeare_split_matches_the_reference_projects(shakespeare_path):
    assert hashlib.sha256(shakespeare_path.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    data = prepare_dataset(str(shakespeare_path))
    # nanoGPT's shakespeare_char: n = 1,115,394; train = data[:int(n * 0.9)]
    assert data.train_chars == int(1_115_394 * 0.9) == 1_003_854
    assert len(data.train_ids) == 1_003_854 and len(data.val_ids) == 111_540
    assert data.train_ids.dtype == np.uint8
    text = shakespeare_path.read_text(encoding="utf-8")
    assert data.tokenizer.decode(data.val_ids[:50].tolist()) == text[1_003_854:1_003_904]


def test_token_cache_is_reused(small_corpus):
    first = prepare_dataset(str(small_corpus))
    second = prepare_dataset(str(small_corpus))
    assert first.train_ids.filename == second.train_ids.filename
    assert np.array_equal(first.train_ids, second.train_ids)


def test_batches_are_shifted_windows_and_seeded(small_corpus):
    data = prepare_dataset(str(small_corpus))
    a = BatchSampler(data.train_ids, block_size=8, batch_size=4, seed=3)
    b = BatchSampler(data.train_ids, block_size=8, batch_size=4, seed=3)
    x, y = a.next_batch()
    x2, y2 = b.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x moved one token ahead
    assert torch.equal(x, x2) and torch.equal(y, y2)
    ids = torch.from_numpy(data.train_ids.astype(np.int64))
    for row_x, row_y in zip(x, y, strict=True):  # every window is a real slice of the split
        starts = [i for i in range(len(ids) - 8) if torch.equal(ids[i : i + 8], row_x)]
        assert any(torch.equal(ids[i + 1 : i + 9], row_y) for i in starts)


def test_sampler_state_round_trip(small_corpus):
    data = prepare_dataset(str(small_corpus))
    a = BatchSampler(data.train_ids, block_size=8, batch_size=4, seed=3)
    a.next_batch()
    state = a.state()
    expected = a.next_batch()
    b = BatchSampler(data.train_ids, block_size=8, batch_size=4, seed=99)
    b.set_state(state)
    assert torch.equal(b.next_batch()[0], expected[0])


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(str(tmp_path / "nope.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="offset 3"):
        prepare_dataset(str(bad))


def test_too_small_corpus(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello", encoding="utf-8")
    data = prepare_dataset(str(tiny))
    with pytest.raises(DataError, match="shorter than one window"):
        BatchSampler(data.val_ids, block_size=8, batch_size=2, seed=0)


def test_packaged_copy_is_unpacked_offline_and_matches_the_shared_file(monkeypatch, tmp_path, shakespeare_path):
    import socket

    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("Tiny Shakespeare must not need the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    path = tiny_shakespeare_path()
    assert path == tmp_path / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == shakespeare_path.read_bytes()
    assert len(path.read_text(encoding="utf-8")) == 1_115_394


def test_a_tampered_cache_is_replaced_from_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"tampered")
    assert tiny_shakespeare_path() == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256


def test_a_corrupt_packaged_copy_is_refused(monkeypatch, tmp_path):
    import gzip

    from scratchgpt import text as text_module

    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))
    fake_package = tmp_path / "pkg"
    (fake_package / "corpora").mkdir(parents=True)
    (fake_package / "corpora" / "tinyshakespeare.txt.gz").write_bytes(gzip.compress(b"First Citizen: not the file"))
    monkeypatch.setattr(text_module.resources, "files", lambda package: fake_package)
    with pytest.raises(DataError, match="SHA-256.*--data"):
        tiny_shakespeare_path()
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


def test_a_token_cache_cut_short_is_encoded_again_and_stale_temporaries_go(monkeypatch, tmp_path, small_corpus, capsys):
    import os
    from pathlib import Path

    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path / "cache"))
    good = prepare_dataset(str(small_corpus))
    expected = np.array(good.train_ids)
    train_file = Path(good.train_ids.filename)
    stale = train_file.parent.parent / f".{train_file.parent.name}.tmp-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))  # left by a run killed long ago
    del good
    with open(train_file, "r+b") as f:  # a disk that filled up, a copy cut short
        f.truncate(train_file.stat().st_size // 2)
    again = prepare_dataset(str(small_corpus))
    assert np.array_equal(np.array(again.train_ids), expected)
    assert "damaged" in capsys.readouterr().err and not stale.exists()
