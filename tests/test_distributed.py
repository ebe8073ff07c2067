"""DistributedDataParallel through torchrun, on CPU with the gloo backend."""

import json
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_faults import env, train_cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "scratchgpt", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, small_corpus):
    steps = 12
    single = train_cmd(small_corpus, tmp_path / "single", steps)
    single[single.index("--batch-size") + 1] = "8"
    subprocess.run(single, env=env(), check=True, capture_output=True)

    ddp_args = train_cmd(small_corpus, tmp_path / "ddp", steps)[3:]  # drop "python -m scratchgpt"
    ddp_args[ddp_args.index("--batch-size") + 1] = "4"  # per process: 2 x 4 = 8
    proc = torchrun(2, ddp_args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done:") == 1  # only rank 0 reports

    a = load_file(str(tmp_path / "single" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    state = json.loads((tmp_path / "ddp" / "last" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["tokens_seen"] == steps * 8 * 16


def test_ddp_with_gradient_accumulation_and_resume(tmp_path, small_corpus):
    steps = 12
    args = train_cmd(small_corpus, tmp_path / "ddp", steps, "--grad-accum-steps", "2")[3:]
    args[args.index("--batch-size") + 1] = "2"
    first = list(args)
    first[first.index("--max-steps") + 1] = "6"
    proc = torchrun(2, first)
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(2, ["train", "--resume", str(tmp_path / "ddp"), "--max-steps", str(steps), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    whole = list(args)
    whole[whole.index("--out") + 1] = str(tmp_path / "whole")
    proc = torchrun(2, whole)
    assert proc.returncode == 0, proc.stderr
    a = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed DDP run is bit-identical to the uninterrupted one


def test_a_worker_that_fails_after_joining_exits_with_its_error_code(tmp_path, small_corpus):
    """Workers that joined a process group end without Python's shutdown (distributed.exit_if_joined):
    the exit code and the one-line error must still come through."""
    args = train_cmd(small_corpus, tmp_path / "ddp", 12, "--time-budget", "0.001")[3:]
    proc = torchrun(2, args)
    assert proc.returncode != 0
    assert proc.stderr.count("scratchgpt train: error: --time-budget 0.001 s is too short") == 2  # one line per worker
    assert "(exitcode: 1)" in proc.stderr  # torchrun saw the workers' own code, not a signal
