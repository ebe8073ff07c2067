"""Keep freed memory in the process, so that every training step does not pay for fresh pages.

A training step allocates and frees the same tensors every step: activations, gradients,
temporaries. glibc's malloc (the allocator of most Linux systems, and PyTorch's on a CPU) serves
a block above its mmap threshold (128 KiB at first, raised as large blocks are freed, to at most
32 MiB) with a fresh mapping that it unmaps when the block is freed, and it hands free memory at
the top of its heap back to the kernel once that exceeds twice the threshold. Either way the
next step writes to pages that the kernel must fault in and zero again: 1,000-2,000 page
faults a step for cpu-baby. In its eager step GELU's backward took 432-783 us that way, against
211-402 us with freed memory kept (and 163 us alone in a loop).

`keep_freed_memory` raises both thresholds once, when the CLI starts: blocks under 64 MiB
come from the heap and are reused, and up to 256 MiB of freed heap stays with the process. On
this project's CPU, training runs went 10-24% faster (cpu-baby and `speedrun-30s` eager, the
`speedrun` model compiled; median tokens/s of alternating runs) at no cost in peak memory
(BENCHMARKS.md). PyTorch's own CPU launcher (`python -m torch.backends.xeon.run_cpu`) goes
further for the same reason and preloads another allocator (TCMalloc or JeMalloc).

`scratchgpt bench` keeps glibc's defaults: its two paths, stepped in turn in one process,
share the heap, and with the thresholds raised a path could run much slower there than in a
training run of its own.

Nothing changes where the C library is not glibc, or where the user set glibc's malloc
tunables themselves (`GLIBC_TUNABLES=glibc.malloc.*` or one of `MALLOC_VARIABLES`); set
`SCRATCHGPT_MALLOC=system` to keep glibc's defaults. A script that calls `scratchgpt.train`
itself can call `keep_freed_memory()` first.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20  # blocks smaller than this come from the heap, and are reused
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap that the process keeps

# glibc's older environment variables for the same parameters.
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_configured_malloc(environ: Mapping[str, str]) -> bool:
    """True if the environment already sets glibc's malloc parameters (the user's choice wins)."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(name in environ for name in MALLOC_VARIABLES)


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set."""
    if not sys.platform.startswith("linux") or environ.get("SCRATCHGPT_MALLOC") == "system":
        return False
    if user_configured_malloc(environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname; musl and others have none
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
