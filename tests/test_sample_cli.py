"""`scratchgpt sample` with the engine's options, and `scratchgpt bench sample`, on a tiny trained run."""

import json

import pytest
from conftest import TINY_TRAIN_FLAGS

from scratchgpt.cli import main

TINY = TINY_TRAIN_FLAGS


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "cpu-baby", "--data", str(small_corpus), "--out", str(out), "--max-steps", "30",
                 "--eval-interval", "30", "--lr", "1e-2", *TINY]) == 0
    return out


def sample(capsys, run, *flags) -> str:
    assert main(["sample", "--checkpoint", str(run), *flags]) == 0
    return capsys.readouterr().out


def test_greedy_text_is_the_same_with_and_without_the_cache(run, capsys):
    flags = ["--prompt", "the ", "--max-new-tokens", "60", "--temperature", "0"]  # 64 tokens: past block_size 16
    cached = sample(capsys, run, *flags)
    assert cached == sample(capsys, run, *flags, "--no-kv-cache")
    assert len(cached) == len("the ") + 60 + 1


def test_sampled_text_is_the_same_with_and_without_the_cache(run, capsys):
    flags = ["--prompt", "the ", "--max-new-tokens", "40", "--seed", "4", "--top-k", "5", "--repetition-penalty", "1.1"]
    assert sample(capsys, run, *flags) == sample(capsys, run, *flags, "--no-kv-cache")


def test_stop_strings_end_each_sample(run, capsys):
    out = sample(capsys, run, "--prompt", "the ", "--max-new-tokens", "200", "--seed", "1", "--num-samples", "3",
                 "--stop", "\n", "--stop", "zz")
    samples = out[:-1].split("\n---\n")
    assert len(samples) == 3
    for text in samples:  # the corpus has a newline every few words: every sample stops at its first
        assert text.startswith("the ") and "\n" not in text and len(text) < 100


def test_bad_repetition_penalty_and_empty_stop_are_refused(run, capsys):
    assert main(["sample", "--checkpoint", str(run), "--repetition-penalty", "0"]) == 1
    assert "--repetition-penalty must be in [0.001, 1000.0]" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run), "--stop", ""]) == 1
    assert "--stop must be non-empty" in capsys.readouterr().err


def test_bench_sample_json(run, capsys):
    assert main(["bench", "sample", "--checkpoint", str(run), "--max-new-tokens", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical_text"] is True
    assert result["settings"]["block_size"] == 16 and result["settings"]["max_new_tokens"] == 40


def test_serve_and_bench_sample_help(capsys):
    for argv in (["serve", "--help"], ["bench", "sample", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and "examples:" in capsys.readouterr().out
