"""The analyses' libraries warmed up in the background, once per process.

A process's first activation atlas waits for numba to compile umap-learn's and pynndescent's
functions (`embedding.warm_up_umap`: about half a minute on a CPU), its first concepts for
scikit-learn's or Overcomplete's import (a second or three each). `WarmUp.start` does all of
that on a daemon thread of its own, once however many threads call it: the server calls it
when it first lists a run with probe images (the runs an atlas or concepts can be made of), so
that the first look at one finds them ready. An atlas asked for meanwhile does not compile
UMAP a second time: numba compiles under one lock, and the layout waits for the compilation
under way. A library that is not installed is skipped (an atlas is then laid out by PCA).
Nothing it meets is raised to its caller: a failure is logged, as is what it did and how long
each part took.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import MicroscopeError, first_line
from .concepts import needs_library
from .embedding import warm_up_umap

log = logging.getLogger(__name__)
IDLE, RUNNING, DONE = "idle", "running", "done"
SKIPPED = "not installed"


def _library(method: str) -> Callable[[], bool]:
    def warm() -> bool:
        try:
            needs_library(method)
        except MicroscopeError:  # the extra is not installed
            return False
        return True

    return warm


# What is warmed, in order: the atlas's UMAP first (the half minute), then concepts' libraries.
PARTS: dict[str, Callable[[], bool]] = {
    "umap": warm_up_umap,
    "nmf": _library("nmf"),  # scikit-learn's NMF
    "sae": _library("sae"),  # Overcomplete
}


class WarmUp:
    """One warm-up of `parts` (name -> a function that warms it, False where its library is
    missing), started once on a daemon thread; `state()` says where it is."""

    def __init__(self, parts: dict[str, Callable[[], bool]] | None = None):
        self.parts = dict(PARTS if parts is None else parts)
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._results: dict[str, float | str] = {}  # part -> seconds, SKIPPED or the failure
        self._seconds: float | None = None

    def start(self) -> bool:
        """Start the warm-up on a thread of its own unless it was started before (by any
        thread): True for the one call that started it. Never raises."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(
                target=self._run, daemon=True, name="tb_microscope-warm-up"
            )
            try:
                self._thread.start()
            except Exception:  # no thread to be had (a fault of the machine): logged only
                log.warning("the analyses' warm-up could not start", exc_info=True)
                self.done.set()
                return False
        return True

    @property
    def started(self) -> bool:
        return self._thread is not None

    def state(self) -> dict:
        """`{"status": "idle" | "running" | "done", "seconds", "parts": {part: seconds, or
        "not installed", or "failed: ..."}}`, for the `status` route."""
        status = DONE if self.done.is_set() else RUNNING if self.started else IDLE
        return {"status": status, "seconds": self._seconds, "parts": dict(self._results)}

    def _run(self) -> None:
        began = time.perf_counter()
        log.info("warming up the analyses' libraries in the background: %s", ", ".join(self.parts))
        try:
            for name, warm in self.parts.items():
                start = time.perf_counter()
                try:
                    warmed = warm()
                except Exception as e:  # a bug or a broken install: the analysis will say it
                    self._results[name] = f"failed: {first_line(e)}"
                    log.warning("warming up %s failed", name, exc_info=True)
                    continue
                seconds = round(time.perf_counter() - start, 3)
                self._results[name] = seconds if warmed else SKIPPED
                if warmed:
                    log.debug("warmed up %s in %.1f s", name, seconds)
                else:
                    log.debug("not warming up %s: not installed", name)
        finally:
            self._seconds = round(time.perf_counter() - began, 3)
            self.done.set()
            log.info("the analyses' warm-up took %.1f s: %s", self._seconds, self._summary())

    def _summary(self) -> str:
        """`umap 36.2 s, nmf 0.1 s, sae not installed`: what each part did, for the log."""
        said = (v if isinstance(v, str) else f"{v:.1f} s" for v in self._results.values())
        return ", ".join(f"{name} {what}" for name, what in zip(self._results, said))


WARM_UP = WarmUp()  # the process's own: the server starts it
