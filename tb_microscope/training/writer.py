"""The Logger's background writer and its error policy.

The training thread hands the writer work through a small queue: each snapshot's host copy of
the weights, and the run's manifest with the architecture (first while it is being captured,
then once it is). The writer thread writes them into the run store (atomically) and appends a
summary of each snapshot to the run's event file. Write errors (full disk, permissions) warn and
never stop training, unless the policy is strict, in which case the next call on the training
thread raises them. A warning is also a record of this module's logger, with the error's
traceback (`errors.warn`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import __version__
from ..errors import MicroscopeError, warn
from ..store.local import RunStore
from ..store.manifest import Manifest
from .summary import SnapshotEvents

WRITER_NICENESS = 10
log = logging.getLogger(__name__)


class SnapshotWriteError(MicroscopeError, OSError):
    """Writing a snapshot or the architecture failed (raised only with `strict=True`)."""


@dataclass
class SnapshotRecord:
    """What one snapshot cost: the training thread's stall and the bytes written."""

    step: int
    stall_s: float
    bytes: int = 0
    write_s: float = 0.0
    error: str | None = None


@dataclass
class SnapshotJob:
    step: int
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    events: list  # CUDA events the host copy waits for
    wall_time: float
    record: SnapshotRecord


@dataclass
class ManifestJob:
    """The run's manifest, after `write(store)` (the architecture's files), if given."""

    manifest: Manifest
    write: Callable[[RunStore], None] | None = None


def hint(error: BaseException) -> str:
    """What to do about a write error (safetensors reports OS errors as text, without errno)."""
    text = str(error)
    codes = {getattr(error, "errno", None)} | {int(c) for c in re.findall(r"os error (\d+)", text)}
    if codes & {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}:
        return "free some disk space, or log to another directory"
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return "check that the directory is writable"
    return "see the error for the cause"


class ErrorPolicy:
    """Warn about a failed write and go on, or (`strict`) keep it for the training thread."""

    def __init__(self, run_dir, strict: bool):
        self.run_dir, self.strict = run_dir, strict
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, where: str, message: str, cause: BaseException) -> None:
        text = f"tb_microscope: writing {where} to '{self.run_dir}' failed: {message}"
        if self.strict:
            error = SnapshotWriteError(text)
            error.__cause__ = cause
            with self._lock:
                self._error = self._error or error
        else:  # often on a background thread, where a caller's line would mean nothing
            warn(text + ". Training continues.", cause, log)

    def raise_pending(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error


class SnapshotWriter:
    """A thread writing snapshots and the architecture into `store` (see the module's doc)."""

    def __init__(
        self, store: RunStore, policy: ErrorPolicy, on_written: Callable[[], None] | None = None
    ):
        self.store, self.policy, self.on_written = store, policy, on_written
        self._events = SnapshotEvents(store.run_dir)
        self._queue: queue.Queue[SnapshotJob | ManifestJob | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._loop, name="tb_microscope-writer", daemon=True)
        self._thread.start()

    def submit(self, job: SnapshotJob | ManifestJob) -> None:
        self._queue.put(job)

    def join(self) -> None:
        """Wait until everything submitted is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._events.close()

    def _loop(self) -> None:
        # Lower this thread's priority (Linux schedules threads one by one): on a machine whose
        # cores the training step keeps busy, the writer then yields to it instead of stretching
        # every parallel op of the step while it runs.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if isinstance(job, ManifestJob):
                    self._write_manifest(job)
                else:
                    self._write_snapshot(job)
                if self.on_written is not None:
                    self.on_written()
            finally:
                self._queue.task_done()

    def _write_manifest(self, job: ManifestJob) -> None:
        try:
            if job.write is not None:
                job.write(self.store)
            self.store.write_manifest(job.manifest)
        except Exception as e:
            self.policy.fail("the architecture", f"{type(e).__name__}: {e}; {hint(e)}", e)

    def _write_snapshot(self, job: SnapshotJob) -> None:
        start = time.perf_counter()
        try:
            for event in job.events:
                event.synchronize()
            job.record.bytes = self.store.write_snapshot(
                job.step,
                job.tensors,
                job.aliases,
                {"wall_time": str(job.wall_time), "tb_microscope": __version__},
            )
            self._events.write(job.step, job.record.bytes, job.wall_time)
        except Exception as e:
            job.record.error = f"{type(e).__name__}: {e}"
            self.policy.fail(f"step {job.step}", f"{job.record.error}; {hint(e)}", e)
        job.record.write_s = time.perf_counter() - start
