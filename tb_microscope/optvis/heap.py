"""The C heap during CPU renders: freed memory kept for the next iteration, given back after.

An optimization allocates and frees the same large tensors every iteration (a ResNet's feature
maps, several megabytes each). glibc's malloc hands blocks above its mmap threshold back to the
kernel when they are freed, and trims the top of its heap once more than its trim threshold is
free there; the next iteration then touches fresh pages, each zeroed by the kernel on its first
write. Both thresholds adapt to what the process freed before, so whether that happens depends
on its history: ten 8 MiB tensors made and freed four times cost 81,960 page faults with glibc's
starting thresholds, and none (or one block's 2,048, once) with the heap kept
(tests/integration/test_rendering.py). In one process on this project's 2-core CPU, GoogLeNet
`inception4a` (16 units, 96 px, bf16) took about 15,000 page faults an iteration, and a bare
forward and backward to the node 113 ms where it took 86 to 91 ms with the heap kept; in another
(`TB_MICROSCOPE_KEEP_HEAP=0 python benchmarks/render_throughput.py`), none.

`kept_heap()` raises both thresholds (mmap for blocks up to 32 MiB, glibc's largest; trim only
beyond 1 GiB free) for the process, as glibc's settings are, and calls `malloc_trim` when the
last render in the process ends, so that a long-running server gives the memory back between
renders. Blocks above 32 MiB still come from the kernel each time. Elsewhere than glibc (macOS,
Windows, musl), with the environment variable TB_MICROSCOPE_KEEP_HEAP=0, or in a process started
with thresholds of its own (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES
naming glibc.malloc.mmap_threshold or glibc.malloc.trim_threshold), it does nothing.

Unlike torch's switches (`torch_state.py`), the thresholds are not put back after a render: glibc
has no way to read them, and once set they no longer adapt, so no value written back would be the
one the process had. In a process that trains and renders, they stay raised: freed blocks of up
to 32 MiB stay in the process, the training loop's as well as the renders', given back past
1 GiB free and when a render ends. A training process that must keep glibc's own behaviour
sets TB_MICROSCOPE_KEEP_HEAP=0.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit systems)
TRIM_THRESHOLD = 1 << 30

_LOCK = threading.Lock()
_state = {"set": False, "renders": 0}


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def thresholds_chosen() -> bool:
    """Whether this process was started with malloc thresholds of its own (see the module's
    text): they are then left alone."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ) or any(f"glibc.malloc.{name}=" in tunables for name in ("mmap_threshold", "trim_threshold"))


@contextmanager
def kept_heap() -> Iterator[None]:
    """Freed memory stays in the process while the block runs (see the module's text)."""
    libc = _glibc()
    if libc is None or os.environ.get("TB_MICROSCOPE_KEEP_HEAP", "1") == "0" or thresholds_chosen():
        yield
        return
    with _LOCK:
        if not _state["set"]:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            _state["set"] = True
        _state["renders"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _state["renders"] -= 1
            if not _state["renders"]:
                libc.malloc_trim(0)
