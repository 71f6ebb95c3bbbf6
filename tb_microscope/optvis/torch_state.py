"""Torch's and Python's global settings, left as a render found them (`restored_torch_state`).

A render, an analysis or an atlas may run in a process that also trains (the Python API, a
training callback). What it switches for itself (oneDNN and NNPACK on the CPU, TF32 on CUDA:
`numerics.py`; a warning filter for Captum: `attribution.py`), and whatever a library it calls
switches, is put back when it ends, returned or raised: every switch of `PROCESS_SETTINGS`, read
when the first of the renders running at once (the service's workers on several devices) starts
and put back when the last ends, and the per-thread ones of `THREAD_SETTINGS` (grad mode,
autocast) around each. A change another thread makes while a render runs is undone with the rest.

TF32 has two APIs in torch that check each other: the old one (`torch.backends.cuda.matmul.
allow_tf32`, `torch.backends.cudnn.allow_tf32`, `torch.set_float32_matmul_precision`) and the
new `fp32_precision` of each backend. A process that mixed them cannot read the old one any more
(torch raises); so the old values are put back first (where they could be read), then every new
one as it was, which leaves both as they were.

glibc's malloc thresholds, which `heap.py` raises for CPU renders, are not among them: glibc has
no way to read them, so they cannot be put back (see `heap.py`).
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Setting:
    """One global setting: its name (as a user would write it), how to read and write it."""

    name: str
    get: Callable[[], object]
    set: Callable[[object], None]


def _attribute(path: str) -> Setting:
    """The setting `torch.<path>`, an attribute read and written as it is."""
    *owner, leaf = path.split(".")

    def parent():
        obj = torch
        for part in owner:
            obj = getattr(obj, part)
        return obj

    return Setting(
        f"torch.{path}", lambda: getattr(parent(), leaf), lambda v: setattr(parent(), leaf, v)
    )


def _warning_filters(filters) -> None:
    warnings.filters[:] = filters
    # what warnings.catch_warnings does on leaving: the per-module "already said" registries
    # that the old filters filled are cleared on their next use
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


def _deterministic(value) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


# Old TF32 API first, then the new one (see the module's text).
_OLD_TF32 = [
    _attribute("backends.cuda.matmul.allow_tf32"),
    _attribute("backends.cudnn.allow_tf32"),
    Setting(
        "torch.get_float32_matmul_precision()",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
    ),
]
_NEW_TF32 = [
    _attribute(f"backends.{backend}fp32_precision")
    for backend in (
        "",
        "cuda.matmul.",
        "cudnn.",
        "cudnn.conv.",
        "cudnn.rnn.",
        "mkldnn.",
        "mkldnn.matmul.",
        "mkldnn.conv.",
        "mkldnn.rnn.",
    )
]

PROCESS_SETTINGS: list[Setting] = [
    *_OLD_TF32,
    *_NEW_TF32,
    _attribute("backends.mkldnn.enabled"),
    _attribute("backends.mkldnn.deterministic"),
    Setting(
        "torch.backends.nnpack enabled",
        lambda: torch._C._get_nnpack_enabled(),  # torch has no public reader
        lambda value: torch.backends.nnpack.set_flags(value),
    ),
    _attribute("backends.cudnn.enabled"),
    _attribute("backends.cudnn.benchmark"),
    _attribute("backends.cudnn.benchmark_limit"),
    _attribute("backends.cudnn.deterministic"),
    Setting(
        "torch.are_deterministic_algorithms_enabled() (and warn_only)",
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        _deterministic,
    ),
    _attribute("utils.deterministic.fill_uninitialized_memory"),
    Setting("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    Setting("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    Setting("torch.get_default_device()", torch.get_default_device, torch.set_default_device),
    Setting("warnings.filters", lambda: list(warnings.filters), _warning_filters),
]

THREAD_SETTINGS: list[Setting] = [
    Setting("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
    *(
        Setting(
            f"autocast on {kind}",
            lambda kind=kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)),
            lambda value, kind=kind: (
                torch.set_autocast_enabled(kind, value[0]),
                torch.set_autocast_dtype(kind, value[1]),
            ),
        )
        for kind in ("cpu", "cuda")
    ),
]

_MISSING = object()  # a setting this torch does not have, or that it cannot read now


def read(settings: list[Setting]) -> list[object]:
    """Each setting's value (`_MISSING` where it cannot be read)."""
    values = []
    for setting in settings:
        try:
            values.append(setting.get())
        except (AttributeError, RuntimeError):  # an older torch; TF32's APIs mixed
            values.append(_MISSING)
    return values


def restore(settings: list[Setting], values: list[object]) -> None:
    """Write back each setting whose value differs from `values` (read by `read`). One that
    cannot be written back is logged, and the others are still put back."""
    for setting, value in zip(settings, values):
        if value is _MISSING:
            continue
        try:
            now = setting.get()
        except (AttributeError, RuntimeError):
            now = _MISSING
        if now is not _MISSING and now == value:
            continue
        try:
            setting.set(value)
        except Exception:  # the others must still be put back
            log.warning("could not put back %s (%r)", setting.name, value, exc_info=True)


_LOCK = threading.Lock()
_held: dict = {"count": 0, "values": None}


@contextmanager
def restored_torch_state() -> Iterator[None]:
    """Torch's and Python's global settings as they were before the block, after it, whether it
    returns or raises (see the module's text): the process-wide ones once the last block running
    in any thread ends, the thread's own at the end of each."""
    with _LOCK:
        if not _held["count"]:
            _held["values"] = read(PROCESS_SETTINGS)
        _held["count"] += 1
    own = read(THREAD_SETTINGS)
    try:
        yield
    finally:
        restore(THREAD_SETTINGS, own)
        with _LOCK:
            _held["count"] -= 1
            if not _held["count"]:
                restore(PROCESS_SETTINGS, _held["values"])
                _held["values"] = None


def restores_torch_state(function: F) -> F:
    """`function` (an entry point: a render, an analysis), run in `restored_torch_state` with
    gradients on and out of inference mode: called from a caller's `torch.no_grad()` block, or
    from a training hook that runs in `torch.inference_mode()` (Lightning's validation loop),
    an optimization or an attribution would have nothing to differentiate."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with restored_torch_state(), torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
