import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TRAIN_FLAGS

from scratchgpt.cli import main

TINY = TINY_TRAIN_FLAGS


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("runs") / "baby"
    assert main(["train", "--preset", "cpu-baby", "--data", str(small_corpus), "--out", str(out), "--max-steps", "12",
                 "--eval-interval", "6", *TINY]) == 0
    return out


def test_train_writes_a_run(trained_run, capsys):
    assert (trained_run / "best" / "model.safetensors").is_file()
    assert (trained_run / "last" / "optimizer.safetensors").is_file()
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn with no extra installed
    config = json.loads((trained_run / "last" / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["train"]["max_steps"] == 12


def test_sample_streams_the_prompt_and_continuation(trained_run, capsys):
    args = ["sample", "--checkpoint", str(trained_run), "--prompt", "the ", "--max-new-tokens", "25", "--seed", "3",
            "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("the ") and len(first) == len("the ") + 25 + 1
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_sample_several_and_greedy(trained_run, capsys):
    assert main(["sample", "--checkpoint", str(trained_run / "last"), "--num-samples", "2", "--max-new-tokens", "10",
                 "--temperature", "0", "--prompt", "the"]) == 0
    a, b = capsys.readouterr().out.rstrip("\n").split("\n---\n")
    assert a == b  # greedy decoding has no randomness


def test_eval_json(trained_run, small_corpus, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(small_corpus), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"val_loss", "val_perplexity", "val_bpc", "val_bpb", "val_tokens", "val_chars", "val_bytes"}
    n_val = len(small_corpus.read_text()) - int(len(small_corpus.read_text()) * 0.9)
    assert result["val_tokens"] == result["val_chars"] == result["val_bytes"] == n_val - 1  # ASCII, one char per token
    assert result["val_bpc"] == result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["val_perplexity"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item(), rel=1e-5)


def test_eval_names_the_checkpoints_data_and_refuses_it_when_gone(trained_run, small_corpus, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), "--json"]) == 0
    assert f"evaluating on {small_corpus}" in capsys.readouterr().err
    import dataclasses

    from scratchgpt import load
    from scratchgpt.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = load(trained_run)
    config = load_checkpoint(trained_run)[2]
    gone = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(tmp_path / "gone.txt")))
    moved = save_checkpoint(tmp_path / "moved", model, tokenizer, gone, {"step": 0})
    assert main(["eval", "--checkpoint", str(moved)]) == 1
    assert "gone.txt, which is not here; pass --data" in capsys.readouterr().err


def test_python_api_load(trained_run):
    import scratchgpt

    model, tokenizer = scratchgpt.load(trained_run)
    assert model.config.block_size == 16 and not model.training
    text = scratchgpt.generate_text(model, tokenizer, "the ", max_new_tokens=5, seed=0)
    assert len(text) == 5


def test_resume_extends_a_run(trained_run, capsys):
    assert main(["train", "--resume", str(trained_run), "--max-steps", "14", "--no-progress"]) == 0
    meta = json.loads((trained_run / "last" / "meta.json").read_text())
    assert meta["step"] == 14


def test_existing_run_is_not_overwritten(trained_run, small_corpus, capsys):
    code = main(["train", "--data", str(small_corpus), "--out", str(trained_run), *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "--resume" in err and "--overwrite" in err


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "/no/such/file.txt"], "does not exist"),
    (["train", "--n-embd", "30", "--n-head", "4"], "divisible"),
    (["train", "--dropout", "1.5"], "dropout"),
    (["train", "--max-steps", "-3"], "max_steps"),
    (["sample", "--checkpoint", "/no/such/run"], "does not exist"),
    (["eval", "--checkpoint", "/no/such/run"], "does not exist"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else [])) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_foreign_directory_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"\x00" * 10)
    assert main(["sample", "--checkpoint", str(tmp_path)]) == 1
    assert "not a scratchgpt checkpoint" in capsys.readouterr().err


def test_corrupted_weights_are_refused(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "last", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    assert main(["sample", "--checkpoint", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and err.count("\n") == 1


def test_unknown_prompt_character_is_named(trained_run, capsys):
    assert main(["sample", "--checkpoint", str(trained_run), "--prompt", "the Ω"]) == 1
    captured = capsys.readouterr()
    assert "'Ω'" in captured.err
    assert captured.out == ""  # refused before the prompt is echoed


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "0"], ["--max-new-tokens", "-1"],
                                  ["--max-new-tokens", "0"], ["--num-samples", "0"]])
def test_bad_sampling_values_are_refused(trained_run, flag, capsys):
    assert main(["sample", "--checkpoint", str(trained_run), *flag]) == 1
    err = capsys.readouterr().err
    assert flag[0] in err and err.count("\n") == 1


def test_bad_flag_and_python_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scratchgpt", "train", "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "scratchgpt", "sample", "--checkpoint", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("argv,prog", [(["train", "--nope"], "scratchgpt train"),
                                       (["bench", "train", "--nope"], "scratchgpt bench train"),
                                       (["plot", "run", "--nope"], "scratchgpt plot")])
def test_unknown_flag_points_to_the_subcommands_help(argv, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == f"{prog}: error: unrecognized arguments: --nope (see {prog} --help)\n"


def test_every_config_flag_says_what_it_does():

    from scratchgpt.cli import NO_FLAG, build_parser
    from scratchgpt.config import FIELD_HELP, SECTIONS

    assert {s: set(h) for s, h in FIELD_HELP.items()} == {s: {f.name for f in dataclasses.fields(c)} for s, c in SECTIONS.items()}
    train = build_parser().subcommands["train"]
    unwrapped = "".join(train.format_help().split())  # argparse wraps lines, also at hyphens
    for section, fields in FIELD_HELP.items():
        for name, what in fields.items():
            assert len(what) >= 12 and not what.startswith("preset"), f"{section}.{name} needs a help sentence"
            assert (section, name) in NO_FLAG or "".join(what.split()) in unwrapped, f"--help of train lacks {section}.{name}"
    help_text = " ".join(train.format_help().split())
    assert "--n-layer N_LAYER transformer blocks stacked (preset's value; default 4)" in help_text
    assert "adapt to the cores other programs leave free (preset's value)" in help_text


def test_presets_and_help(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("bigram", "cpu-baby", "seed-small", "shakespeare-char"):
        assert name in out
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0 and "examples:" in capsys.readouterr().out
