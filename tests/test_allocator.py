"""allocator.keep_freed_memory: afterwards glibc serves large blocks from its heap; the user's settings win."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from scratchgpt import cli
from scratchgpt.speed import allocator

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc on Linux")

# A fresh interpreter allocates a 20 MiB block and says whether it lies in the [heap] mapping
# (reused from one step to the next) rather than in a mapping of its own (unmapped when freed).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from scratchgpt.speed.allocator import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(20 << 20)
    with open("/proc/self/maps") as f:
        heaps = [line.split()[0].split("-") for line in f if line.rstrip().endswith("[heap]")]
    in_heap = any(int(lo, 16) <= block < int(hi, 16) for lo, hi in heaps)
    libc.free(block)
    print(kept, in_heap)
""")


def probe(mode: str) -> str:
    unset = {"GLIBC_TUNABLES", "SCRATCHGPT_MALLOC", *allocator.MALLOC_VARIABLES}  # whatever the test's environment has
    env = {name: value for name, value in os.environ.items() if name not in unset}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


@glibc_only
def test_a_large_block_comes_from_the_heap_once_freed_memory_is_kept():
    assert probe("default") == "None False"  # glibc's default: a mapping of its own
    assert probe("keep") == "True True"


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_sets_both_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert allocator.keep_freed_memory({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 64 << 20), (allocator.M_TRIM_THRESHOLD, 256 << 20)]


@pytest.mark.parametrize("environ", [{"SCRATCHGPT_MALLOC": "system"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
                                     {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_users_settings_win(environ, monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: pytest.fail("mallopt must not be called"))
    assert not allocator.keep_freed_memory(environ)


def test_other_c_libraries_are_left_alone(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", no_glibc)
    assert not allocator.keep_freed_memory({})
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert not allocator.keep_freed_memory({})


def test_the_cli_keeps_freed_memory_except_to_benchmark(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["presets"]) == 0
    assert calls == [True]
    assert cli.main(["bench", "train", "--preset", "no-such-preset"]) == 1  # fails before any work
    assert calls == [True]
