"""Capture in a forked child process, so that a training loop goes on meanwhile."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ...errors import first_line, warn
from ...nodes import Node
from .export import Capture, capture

log = logging.getLogger(__name__)


class CaptureProcessError(RuntimeError):
    """The process capturing the architecture ended without a result."""


def _can_fork() -> bool:
    # macOS's system libraries are not safe in a forked child of a threaded process.
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _die_with_parent() -> None:
    """Ask Linux to kill this (child) process when the thread that forked it ends: a training
    process that exits mid-capture leaves no exporter behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # not Linux's libc: the child still ends with its export
        pass


CHILD_TIMEOUT_S = 240.0  # TB_MICROSCOPE_CAPTURE_TIMEOUT; then the capture is done in-process
# TB_MICROSCOPE_CAPTURE_STALL: a child that used no CPU for this many seconds is stuck (a lock
# another thread held at the fork stays held in the child forever); it is killed at once
STALL_S = 15.0


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time process `pid` has used (Linux's /proc), None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _read_child(fd: int, pid: int, timeout: float, stall: float) -> tuple[bytes | None, str]:
    """All of the pipe `fd` until the child `pid` closes it (then closes it), or None and why
    not: past `timeout`, or once the child has used no CPU for `stall` seconds."""
    chunks = []
    start = time.monotonic()
    last_cpu, last_progress = _cpu_seconds(pid), start
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                return None, f"gave no answer in {timeout:.0f} s"
            if select.select([fd], [], [], min(1.0, timeout - (now - start)))[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return b"".join(chunks), ""
                chunks.append(chunk)
                last_progress = time.monotonic()
                continue
            cpu = _cpu_seconds(pid)
            if cpu is None or last_cpu is None or cpu - last_cpu > 0.01:
                last_cpu, last_progress = cpu, time.monotonic()
            elif time.monotonic() - last_progress > stall:
                return None, f"used no CPU for {stall:.0f} s (stuck)"
    finally:
        os.close(fd)


class ChildCapture:
    """`capture()` running in a forked child process, for a caller that trains on meanwhile.

    torch.export switches oneDNN, NNPACK and cuDNN off for the whole process while it traces
    (torch/export/_trace.py, `_ignore_backend_decomps`): on a thread, the training loop's
    convolutions would run without them (slower, and with other numerics) until the export
    ended. A forked child has the model (a CPU copy) without pickling or importing anything,
    and sends back only the archive's bytes, dims, edges and notes.

    Fork from the training thread, between its steps (`start`): a C++ lock that a torch
    operation on another thread holds at the fork stays held in the child, whose own operations
    then wait for it forever. A child that stops using CPU anyway is killed after
    `TB_MICROSCOPE_CAPTURE_STALL` seconds, and the capture done in this process (`result`).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, nodes: list[Node], edges: list):
        self.args = (model, example, nodes, edges)
        self.pid: int | None = None
        self.read: int | None = None

    def start(self) -> ChildCapture:
        """Fork the child (where fork is safe; elsewhere `result` captures in this process)."""
        if not _can_fork():
            return self
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.close(read)
                _die_with_parent()
                torch.set_num_threads(1)  # a thread pool forked mid-use is not safe to grow
                try:
                    answer = ("ok", capture(*self.args))
                except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
                    answer = ("error", first_line(e))
                with os.fdopen(write, "wb") as out:
                    out.write(pickle.dumps(answer))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self.read = pid, read
        return self

    def result(self) -> Capture:
        """The child's capture (waiting for it), or this process's own where the child is stuck."""
        if self.pid is None:
            return capture(*self.args)
        timeout = _setting("TB_MICROSCOPE_CAPTURE_TIMEOUT", CHILD_TIMEOUT_S)
        stall = _setting("TB_MICROSCOPE_CAPTURE_STALL", STALL_S)
        data, why = _read_child(self.read, self.pid, timeout, stall)
        if data is None:  # stuck: capture here instead
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            warn(
                f"the architecture's capture process {why}; capturing in this process instead",
                log=log,
            )
            return capture(*self.args)
        _, status = os.waitpid(self.pid, 0)
        if not data:
            how = (
                f"signal {os.WTERMSIG(status)}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.WEXITSTATUS(status)}"
            )
            raise CaptureProcessError(f"the capture process ended ({how}) without a result")
        # Our own child's answer, through a pipe only the two processes hold.
        kind, value = pickle.loads(data)
        if kind == "error":
            raise CaptureProcessError(value)
        return value


def capture_in_child(
    model: nn.Module, example: torch.Tensor, nodes: list[Node], eager_edges: list
) -> Capture:
    """`ChildCapture`'s result, forked from this thread now."""
    return ChildCapture(model, example, nodes, eager_edges).start().result()
