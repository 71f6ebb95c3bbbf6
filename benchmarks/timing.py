"""What the benchmarks that time one piece of work at a time print: its seconds, and the
process's peak resident memory so far. Imported by the scripts beside it (`python
benchmarks/NAME.py` puts this folder on the path)."""

from __future__ import annotations

import resource
import time


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(label: str, work, *, width: int = 62, digits: int = 1):
    """`work()`'s result, after a line: `label` (padded to `width`), its seconds (to `digits`
    decimals) and the peak resident memory."""
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    print(f"{label:<{width}} {seconds:8.{digits}f} s   peak RSS {peak_mib():6.0f} MiB")
    return result
