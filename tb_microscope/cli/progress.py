"""The progress bar of a render on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr: done/total, units per second, time left."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.rendered, self.stream = total, 0, 0, stream
        self.start = time.monotonic()

    def advance(self, count: int, rendered: bool, label: str = "") -> None:
        self.done += count
        self.rendered += count if rendered else 0
        elapsed = time.monotonic() - self.start
        rate = self.rendered / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (30 - filled)
        minutes, seconds = divmod(int(left), 60)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} units  {rate:.2f} units/s  "
            f"{minutes}m{seconds:02d}s left  {label[-40:]:<40}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
