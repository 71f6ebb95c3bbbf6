"""Capture in a forked child process, so that a training loop goes on meanwhile."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import time
import warnings

import torch
from torch import nn

from ..errors import first_line
from ..nodes import Node
from .export import Capture, capture


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


def _child_timeout() -> float:
    try:
        return float(os.environ.get("TB_MICROSCOPE_CAPTURE_TIMEOUT", CHILD_TIMEOUT_S))
    except ValueError:
        return CHILD_TIMEOUT_S


def _read_with_deadline(fd: int, deadline: float) -> bytes | None:
    """All of the pipe `fd` until its writer closes it (then closes it), or None at `deadline`."""
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def capture_in_child(
    model: nn.Module, example: torch.Tensor, nodes: list[Node], eager_edges: list
) -> Capture:
    """`capture()` in a forked child process, for a caller that trains on meanwhile.

    torch.export switches oneDNN, NNPACK and cuDNN off for the whole process while it traces
    (torch/export/_trace.py, `_ignore_backend_decomps`): on a thread, the training loop's
    convolutions would run without them (slower, and with other numerics) until the export
    ended. A forked child has the model (a CPU copy) without pickling or importing anything,
    and sends back only the archive's bytes, dims, edges and notes. Where fork is not safe, it
    runs here."""
    if not _can_fork():
        return capture(model, example, nodes, eager_edges)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            os.close(read)
            _die_with_parent()
            torch.set_num_threads(1)  # a thread pool forked mid-use is not safe to grow
            try:
                answer = ("ok", capture(model, example, nodes, eager_edges))
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
                answer = ("error", first_line(e))
            with os.fdopen(write, "wb") as out:
                out.write(pickle.dumps(answer))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = _read_with_deadline(read, time.monotonic() + _child_timeout())
    if data is None:  # stuck: a lock another thread held at the fork, say. Capture here instead.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        warnings.warn_explicit(
            f"tb_microscope: the architecture's capture process gave no answer in "
            f"{_child_timeout():.0f} s; capturing in this process instead",
            RuntimeWarning,
            "tb_microscope",
            0,
        )
        return capture(model, example, nodes, eager_edges)
    _, status = os.waitpid(pid, 0)
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
