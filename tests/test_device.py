"""The CPU thread count follows the cores other programs leave free (device.py)."""

import subprocess
import sys
import time

import pytest
import torch

from scratchgpt import device as threads
from scratchgpt.cli import main
from scratchgpt.device import SlowdownWatch, ThreadGovernor, governed, threads_for


def test_threads_for_counts_cores_free_for_most_of_their_time():
    assert threads_for(2.0, most=2) == 2  # an idle machine keeps every thread
    assert threads_for(1.7, most=2) == 2  # 0.3 of a core busy elsewhere: still free enough
    assert threads_for(1.33, most=2) == 1  # a busy loop's share beside our two threads
    assert threads_for(1.0, most=2) == 1
    assert threads_for(0.2, most=2) == 1  # never fewer than one
    assert threads_for(7.0, most=4) == 4  # never more than PyTorch's own choice


@pytest.fixture
def governor(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    g = ThreadGovernor(most=2)
    yield g
    torch.set_num_threads(before)


def test_governor_drops_at_once_and_rises_only_when_two_readings_agree(governor):
    governor.cpus = [0, 1]
    assert governor.threads == 2
    governor.adjust(others=1.0)
    assert governor.threads == 1 and torch.get_num_threads() == 1
    governor.adjust(others=0.0)  # one quiet second is not enough
    assert governor.threads == 1
    governor.adjust(others=0.9)  # the load came back: the count stays, and the streak restarts
    governor.adjust(others=0.0)
    assert governor.threads == 1
    governor.adjust(others=0.1)
    assert governor.threads == 2 and torch.get_num_threads() == 2


def test_governor_says_once_why_it_changed_the_count(governor):
    said = []
    governor.say = said.append
    governor.cpus = [0, 1]
    governor.adjust(1.2)
    governor.adjust(0.0)
    governor.adjust(0.0)
    governor.adjust(1.2)
    assert len(said) == 1 and "1.2 of this machine's 2 cores" in said[0] and "--threads N" in said[0]


def test_a_busy_process_counts_as_load_and_our_own_work_does_not(governor):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        governor.measure()
        time.sleep(1.5)
        with_busy = governor.measure()
    finally:
        busy.kill()
        busy.wait()
    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    governor.measure()
    start = time.monotonic()
    while time.monotonic() - start < 1.5:  # this process keeps both cores busy
        a @ a
    own = governor.measure()
    assert with_busy > 0.6, with_busy
    assert own < with_busy - 0.4, (own, with_busy)


def test_governed_fixes_or_adapts_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with governed(1) as g:
        assert g is None and torch.get_num_threads() == 1
        threads.tick()  # no governor: nothing changes
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with governed(0) as g:
        assert isinstance(g, ThreadGovernor) and threads._active is g
    assert threads._active is None and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user chose: nothing adapts
    with governed(0) as g:
        assert g is None


def test_slowdown_is_said_once_after_several_slow_windows():
    said = []
    watch = SlowdownWatch(said.append, ratio=0.5, windows=3)
    for speed in [1000, 1100, 400, 1000, 400, 400, 1000]:  # one slow window (an evaluation) says nothing
        watch.observe(speed)
    assert said == []
    for speed in [400, 300, 300]:
        watch.observe(speed)
    assert len(said) == 1 and "27% of the 1,100" in said[0]


def test_threads_flag_on_sample_and_eval_is_checked(capsys):
    assert main(["sample", "--checkpoint", "nowhere", "--threads", "-2"]) == 1
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_the_callers_thread_count_is_the_ceiling_and_survives(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert threads.threads_now(0, seconds=0.05) == 1  # never more than the caller allowed
        assert torch.get_num_threads() == 1  # and reading the load changes nothing
        with governed(0) as g:
            g.adjust(others=0.0)
            g.adjust(others=0.0)
            assert g.most == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_accelerator_that_computes_wrong_is_refused_by_name(monkeypatch):
    from scratchgpt import device as device_module
    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig
    from scratchgpt.errors import ScratchGPTError

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(20, (2, 8)), torch.randint(20, (2, 8))
    device_module.verify_device(model, x, y, torch.device("cpu"))  # a device that agrees passes
    real = device_module._pass_on

    def mps_off_by(factor):  # "mps" computed on the CPU, its loss off by `factor`: nothing here touches a real MPS
        def pass_on(m, xb, yb, device):
            loss, norm = real(m, xb, yb, torch.device("cpu"))
            return (loss * factor, norm) if device.type == "mps" else (loss, norm)
        return pass_on

    monkeypatch.setattr(device_module, "_pass_on", mps_off_by(1.05))
    with pytest.raises(ScratchGPTError, match=r"mps computes differently from the CPU.*--device cpu.*--trust-device"):
        device_module.verify_device(model, x, y, torch.device("mps"))
    monkeypatch.setattr(device_module, "_pass_on", mps_off_by(1.001))  # within the tolerance: kernels' rounding
    device_module.verify_device(model, x, y, torch.device("mps"))
    monkeypatch.setattr(device_module, "_pass_on", mps_off_by(float("nan")))
    with pytest.raises(ScratchGPTError, match="mps computes differently"):
        device_module.verify_device(model, x, y, torch.device("mps"))


def test_training_on_an_accelerator_checks_it_first_unless_trusted(monkeypatch, tmp_path, small_corpus):
    import importlib

    from conftest import tiny_config

    train_module = importlib.import_module("scratchgpt.train")
    checked = []

    class Checked(Exception):
        pass

    def record(model, x, y, device):
        checked.append((tuple(x.shape), device))
        raise Checked

    monkeypatch.setattr(train_module, "verify_device", record)
    monkeypatch.setattr(train_module, "setup", lambda device: (train_module.DistributedContext(), torch.device("mps")))
    with pytest.raises(Checked):  # the check comes before the model moves to the device
        train_module.train(tiny_config(small_corpus, max_steps=1), tmp_path / "a", progress=False, log=lambda line: None)
    assert checked == [((4, 16), torch.device("mps"))]
    checked.clear()
    with pytest.raises(Exception) as trusted:  # no MPS here: the run fails when it moves the model, unchecked
        train_module.train(tiny_config(small_corpus, max_steps=1, trust_device=True), tmp_path / "b", progress=False,
                           log=lambda line: None)
    assert checked == [] and not isinstance(trusted.value, Checked)
