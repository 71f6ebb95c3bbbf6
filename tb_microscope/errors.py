"""Errors a user of tb_microscope can hit; each message says what was wrong and what to do.

`warn` is the one road for a failure that must not stop the caller (a snapshot that could not be
written while training goes on): a warning, and a record of the "tb_microscope" logger.
"""

from __future__ import annotations

import logging
import warnings

# A library's loggers get a NullHandler: records reach the handlers the application configures
# (TensorBoard's, a training job's), and an application that configures none does not get them
# printed a second time, beside the warning, by logging's last-resort handler.
logging.getLogger("tb_microscope").addHandler(logging.NullHandler())


class MicroscopeError(Exception):
    """Base class of every error tb_microscope raises on purpose."""


class RunNotFoundError(MicroscopeError, FileNotFoundError):
    """A directory holds no tb_microscope run."""


class StepNotFoundError(MicroscopeError, LookupError):
    """A step was asked for that the run did not log."""


class NodeNotFoundError(MicroscopeError, LookupError):
    """A node name that the model does not have."""


class CorruptSnapshotError(MicroscopeError, ValueError):
    """A snapshot file exists but cannot be read back intact."""


class PickleNotAllowedError(MicroscopeError, PermissionError):
    """The run's architecture is pickled and the reader did not opt in to unpickling it."""


class IncompatibleRunError(MicroscopeError, ValueError):
    """A run directory already holds a different model, or a format this version cannot read."""


def summarize(names: list[str], limit: int = 12) -> str:
    """`a, b, c … y, z (40 in all)`: a short list of names for an error message."""
    if len(names) <= limit:
        return ", ".join(names)
    half = limit // 2
    return f"{', '.join(names[:half])} … {', '.join(names[-half:])} ({len(names)} in all)"


def first_line(error: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message`, at most `limit` characters: an error in one line,
    for a note, a log line or another error's message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")[:limit]


def warn(
    message: str, error: BaseException | None = None, log: logging.Logger | None = None
) -> None:
    """Say `message` two ways: as a RuntimeWarning (what a script or a notebook shows) and as a
    WARNING record of `log` (by default the "tb_microscope" logger; a module passes its own,
    under it), with `error`'s traceback where there is one. A script that filters warnings, or a
    job whose warnings go nowhere, still has the record, and the traceback."""
    text = message if message.startswith("tb_microscope: ") else f"tb_microscope: {message}"
    warnings.warn_explicit(text, RuntimeWarning, "tb_microscope", 0)
    (log or logging.getLogger("tb_microscope")).warning(text, exc_info=error)
