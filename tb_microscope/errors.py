"""Errors a user of tb_microscope can hit; each message says what was wrong and what to do."""

from __future__ import annotations


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
