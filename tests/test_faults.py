"""Fault injection: kills, interrupted saves, a full disk, corrupted files, NaN losses."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config
from safetensors.torch import load_file

from scratchgpt import checkpoint as ckpt
from scratchgpt import model as model_module
from scratchgpt.checkpoint import load_checkpoint, recover_interrupted_save
from scratchgpt.errors import CheckpointError
from scratchgpt.train import TrainingDiverged, train


def train_cmd(data, out, steps, *extra):
    return [sys.executable, "-m", "scratchgpt", "train", "--preset", "cpu-baby", "--data", str(data), "--out", str(out),
            "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
            "--max-steps", str(steps), "--lr-decay-steps", str(steps), "--eval-interval", "10", "--eval-iters", "1",
            "--sample-tokens", "0", "--device", "cpu", "--dtype", "float32", "--no-progress", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow  # about 27 s on 2 cores: run with -m slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, small_corpus):
    steps = 400
    subprocess.run(train_cmd(small_corpus, tmp_path / "clean", steps), env=env(), check=True, capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    proc = subprocess.Popen(train_cmd(small_corpus, run, steps), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(20):
        deadline = time.time() + 60
        while not (run / "last" / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        resume = [sys.executable, "-m", "scratchgpt", "train", "--resume", str(run), "--no-progress"]
        proc = subprocess.Popen(resume, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert kills >= 2
    assert json.loads((run / "last" / "meta.json").read_text())["step"] == steps
    assert same_weights(tmp_path / "clean" / "last", run / "last")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "eval"):  # rows written after the last checkpoint of a killed process are dropped
        logged = [r["step"] for r in rows if r["kind"] == kind]
        assert logged == list(range(10, steps + 1, 10))


def test_sigterm_saves_and_exits_cleanly(tmp_path, small_corpus):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(small_corpus, run, 100000), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (run / "last" / "meta.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=20)
    assert code == 130
    meta = json.loads((run / "last" / "meta.json").read_text())
    assert meta["interrupted"] is True and meta["step"] > 0
    load_checkpoint(run / "last")


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, small_corpus, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)
    before = load_file(str(run / "last" / "model.safetensors"))

    def die(folder):
        raise KeyboardInterrupt  # the process dies after writing, before the rename

    monkeypatch.setattr(ckpt, "_fsync_tree", die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(small_corpus, max_steps=20), run, resume=True, progress=False)
    monkeypatch.undo()
    after = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(run.glob(".last.tmp-*"))
    train(tiny_config(small_corpus, max_steps=20), run, resume=True, progress=False)  # and the run goes on


def test_crash_between_renames_is_recovered(tmp_path, small_corpus):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)
    os.replace(run / "last", run / ".last.old-12345")  # died after moving the old copy away
    recover_interrupted_save(run / "last")
    assert json.loads((run / "last" / "meta.json").read_text())["step"] == 10
    os.replace(run / "last", run / ".last.tmp-999")  # died with the new copy complete but not yet renamed
    assert load_checkpoint(run)[3]["step"] == 10  # resolving a run directory recovers it too


def test_full_disk_while_saving(tmp_path, small_corpus, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        train(tiny_config(small_corpus, max_steps=20), run, resume=True, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(run / "last")[3]["step"] == 10


def test_corrupted_files_are_named(tmp_path, small_corpus):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)
    weights = run / "last" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the tensor data: same size, valid header
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        load_checkpoint(run / "last")
    optimizer = run / "best" / "meta.json"
    optimizer.write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(run / "best")


def test_corrupted_optimizer_state_refuses_resume(tmp_path, small_corpus):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)
    (run / "last" / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        train(tiny_config(small_corpus, max_steps=20), run, resume=True, progress=False)


def test_resume_with_another_architecture_is_refused(tmp_path, small_corpus):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=10), run, progress=False)
    other = tiny_config(small_corpus, max_steps=20)
    other.model.n_layer = 3
    with pytest.raises(CheckpointError, match="n_layer"):
        train(other, run, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_best(tmp_path, small_corpus, monkeypatch):
    run = tmp_path / "run"
    real_loss = model_module.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        loss = real_loss(logits, targets)
        if torch.is_grad_enabled() and targets is not None:
            calls["n"] += 1
            if calls["n"] > 15:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(model_module, "lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 15.*last"):
        train(tiny_config(small_corpus, max_steps=30), run, progress=False)
    best = load_checkpoint(run / "best")
    assert best[3]["step"] == 10
    assert all(torch.isfinite(p).all() for p in best[0].parameters())


def test_periodic_checkpoints_keep_the_last_k(tmp_path, small_corpus):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, max_steps=25, save_every=5, keep_checkpoints=2), run, progress=False)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000020", "step-000025"]


def test_sigterm_during_an_evaluation_stops_it_within_seconds_and_keeps_last(tmp_path, small_corpus):
    run = tmp_path / "run"
    # The last step's evaluation is long (1500 batches a split); its log row is written just before it starts.
    cmd = train_cmd(small_corpus, run, 1000, "--eval-interval", "1000", "--eval-iters", "1500")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"kind": "train", "step": 1000,' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)  # within seconds, not after the evaluation and the full validation pass
    assert code == 130, proc.stderr.read().decode()
    _, _, _, meta = load_checkpoint(run / "last")  # whole: every file matches its checksum
    assert meta["step"] == 1000 and meta["interrupted"] is True and "full_val" not in meta
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
    assert evals == []  # the evaluation was cut short, so it logged nothing


def test_sigterm_during_the_full_validation_pass_saves_last_and_reports_interrupted(tmp_path, small_corpus):
    def log(message: str) -> None:
        if message.startswith("step 20:"):  # the last estimate is done; the full validation pass comes next
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny_config(small_corpus), tmp_path / "run", progress=False, log=log)
    assert result.interrupted and result.steps == 20
    meta = json.loads((tmp_path / "run" / "last" / "meta.json").read_text())
    assert meta["step"] == 20 and meta["interrupted"] is True and "full_val" not in meta
    assert (tmp_path / "run" / "loss.png").is_file()  # the curve so far is drawn anyway
