"""The training side: `Logger` saves the model's weights at chosen steps into a run directory.

The training thread does as little as possible: at a snapshot it copies the weights to host memory
once (pinned, asynchronous on CUDA) and hands them to a background thread, which writes the
safetensors file atomically and appends a summary to the run's event file. The architecture is
captured once, at the first snapshot. Write errors (full disk, permissions) warn and never stop
training unless `strict=True`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import errno
import os
import queue
import re
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .architecture import save_program
from .capture import Capture, capture, discover_nodes, select_nodes, unwrap
from .errors import IncompatibleRunError, MicroscopeError, summarize
from .runstore import (
    EXPORT,
    EXPORTED_ARCHITECTURE,
    NONE,
    PICKLE,
    PICKLED_ARCHITECTURE,
    Architecture,
    InputSpec,
    Manifest,
    ModelInfo,
    ProbeSpec,
    RunStore,
    atomic_write,
    new_run_id,
    write_bytes_atomic,
)
from .schedule import make_schedule
from .summary import SnapshotEvents

Normalize = tuple[Sequence[float] | float, Sequence[float] | float]


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
class _Job:
    step: int
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    events: list
    wall_time: float
    record: SnapshotRecord
    architecture: Capture | None = None
    extra: dict = field(default_factory=dict)


WRITER_NICENESS = 10
_open_loggers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _flush_open_loggers() -> None:
    for logger in list(_open_loggers):
        logger.close(raise_errors=False)


def _is_secondary_rank() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _per_channel(value, channels: int, what: str) -> list[float]:
    values = (
        [float(value)] * channels
        if isinstance(value, (int, float))
        else [float(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    )
    if len(values) != channels:
        raise ValueError(
            f"normalize {what} has {len(values)} values; the input has {channels} "
            "channels: give one value per channel, or a single number"
        )
    return values


def _hint(error: BaseException) -> str:
    """What to do about a write error (safetensors reports OS errors as text, without errno)."""
    text = str(error)
    codes = {getattr(error, "errno", None)} | {int(c) for c in re.findall(r"os error (\d+)", text)}
    if codes & {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}:
        return "free some disk space, or log to another directory"
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return "check that the directory is writable"
    return "see the error for the cause"


def weights_fingerprint(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape))
        for k, v in model.state_dict().items()
    }


class Logger:
    """Log a model's weights at chosen steps into `logdir` for the Microscope tab.

    `logdir` is a run directory, as for TensorBoard's `SummaryWriter` (it may be the same one).
    `example_input` is one batch shaped as the model receives it in training. Schedules: `every`
    N steps, an explicit list of `steps`, both combined, or by default dense early and sparse
    later (see `tb_microscope.schedule`). `nodes` narrows the recorded nodes. `normalize=(mean,
    std)` says the model is fed `(image - mean) / std` with images in `value_range`. `probe` is a
    small batch of inputs (as fed to the model, or uint8 images) kept for dataset examples.
    """

    def __init__(
        self,
        logdir: str | Path,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        nodes: Sequence[str] | None = None,
        probe: torch.Tensor | None = None,
        normalize: Normalize | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        strict: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.store = RunStore(logdir)
        self.strict = strict
        self.schedule = make_schedule(every, steps)
        self.records: list[SnapshotRecord] = []
        self._model = unwrap(model)
        self._inert = _is_secondary_rank()
        self._closed = False
        self._error: BaseException | None = None
        self._capture_done = False
        self._pending_architecture: Capture | None = None
        self._logged: set[int] = set()
        self._last_logged: int | None = None
        if self._inert:  # DDP: only rank 0 writes
            return

        example = self._check_example(example_input)
        self._example = example
        try:
            all_nodes, self._eager_edges = discover_nodes(self._model, example)
        except Exception as e:
            raise ValueError(
                f"example_input of shape {tuple(example.shape)} ({example.dtype}) does not fit the "
                f"model: {type(e).__name__}: {str(e).strip()[:300]}. Pass one batch shaped as the "
                "model receives it in training, e.g. torch.randn(2, 3, 224, 224)."
            ) from e
        if not all_nodes:
            raise ValueError(
                "the model has no named submodule with a 4-D or 2-D output; "
                "tb_microscope needs at least one (a conv or linear layer, say)"
            )
        self.nodes = select_nodes(all_nodes, list(nodes) if nodes is not None else None)
        self._input = self._input_spec(example, normalize, value_range)
        self._probe = self._probe_images(probe, example)

        self.store.remove_stale_temporaries()
        self._fingerprint = weights_fingerprint(self._model)
        if self.store.has_manifest():
            self._resume()
        self._events = SnapshotEvents(self.store.run_dir)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(
            target=self._write_loop, name="tb_microscope-writer", daemon=True
        )
        self._thread.start()
        _open_loggers.add(self)

    # --- validation ------------------------------------------------------------------------
    def _check_example(self, example: torch.Tensor) -> torch.Tensor:
        if not isinstance(example, torch.Tensor):
            raise TypeError(
                f"example_input must be a torch.Tensor batch, not {type(example).__name__}"
            )
        if not example.is_floating_point() or example.dim() < 2:
            raise ValueError(
                f"example_input must be a floating-point batch (N x C x H x W for images), got "
                f"shape {tuple(example.shape)} of {example.dtype}"
            )
        device = next((p.device for p in self._model.parameters()), example.device)
        return example.detach().to(device)

    @staticmethod
    def _input_spec(example, normalize, value_range) -> InputSpec:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
        if normalize is not None:
            if isinstance(normalize, dict):
                normalize = (normalize["mean"], normalize["std"])
            channels = example.shape[1]
            mean = _per_channel(normalize[0], channels, "mean")
            std = _per_channel(normalize[1], channels, "std")
            if any(s <= 0 for s in std):
                raise ValueError(f"normalize std must be positive, got {std}")
            normalize = {"mean": mean, "std": std}
        return InputSpec(
            shape=list(example.shape[1:]),
            dtype=str(example.dtype).removeprefix("torch."),
            value_range=[lo, hi],
            example_range=[float(example.min()), float(example.max())],
            normalize=normalize,
        )

    def _probe_images(self, probe, example) -> torch.Tensor | None:
        """Probe images as uint8 N x C x H x W, in the image space renders are drawn in."""
        if probe is None:
            return None
        if (
            not isinstance(probe, torch.Tensor)
            or probe.dim() != example.dim()
            or (probe.dim() >= 2 and probe.shape[1] != example.shape[1])
        ):
            raise ValueError(
                f"probe must be a tensor shaped like example_input (N x {example.shape[1]} x …), "
                f"got {getattr(probe, 'shape', type(probe).__name__)}"
            )
        probe = probe.detach().cpu()
        if probe.dtype == torch.uint8:
            return probe.contiguous()
        x = probe.float()
        spec = self._input.normalize
        if spec is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = x * torch.tensor(spec["std"]).view(shape) + torch.tensor(spec["mean"]).view(shape)
        lo, hi = self._input.value_range
        return ((x - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()

    def _resume(self) -> None:
        stored = self.store.read_manifest().model.weights
        if stored != self._fingerprint:
            differ = sorted(set(stored) ^ set(self._fingerprint)) or sorted(
                k for k in stored if stored[k] != self._fingerprint[k]
            )
            raise IncompatibleRunError(
                f"run '{self.store.run_dir}' already holds a different model (weights differ at "
                f"{summarize(differ)}); log this model into a new run directory"
            )
        self._capture_done = True
        existing = self.store.steps()
        self._logged.update(existing)
        self._last_logged = existing[-1] if existing else None

    # --- training thread -------------------------------------------------------------------
    @property
    def logged_steps(self) -> list[int]:
        return sorted(self._logged)

    def log(self, step: int, force: bool = False) -> bool:
        """Snapshot the weights if the schedule says `step` is due (or `force`); True if it did."""
        if self._inert:
            return False
        if self._closed:
            raise RuntimeError("this Logger is closed; create a new one to log more steps")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, got {step!r}")
        self._raise_pending()
        if step in self._logged or not (force or self.schedule.due(step, self._last_logged)):
            return False
        start = time.perf_counter()
        tensors, aliases, events = self._host_copy()
        architecture = None
        if not self._capture_done:
            architecture = self._capture()
        record = SnapshotRecord(step, 0.0)
        job = _Job(step, tensors, aliases, events, time.time(), record, architecture)
        self._queue.put(job)
        record.stall_s = time.perf_counter() - start
        self.records.append(record)
        self._logged.add(step)
        self._last_logged = max(step, self._last_logged if self._last_logged is not None else step)
        return True

    def _host_copy(self):
        """One copy of the weights to host memory; tied tensors are copied once, as aliases."""
        tensors, aliases, seen, devices = {}, {}, {}, set()
        for name, t in self._model.state_dict().items():
            if t.is_meta:
                continue
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                devices.add(t.device)
            else:
                host = t.detach().clone(memory_format=torch.contiguous_format)
            tensors[name] = host
        events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return tensors, aliases, events

    def _capture(self) -> Capture:
        """Capture the architecture; the writer thread saves it (its program without weights)."""
        self._capture_done = True
        try:
            result = capture(self._model, self._example, self.nodes, self._eager_edges)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip()[:300]}"
            self._fail(
                None,
                f"could not capture the model's architecture ({why}); snapshots are "
                "still written, but the run cannot be rebuilt without your code",
                e,
            )
            return Capture(NONE, None, None, [], self._eager_edges, why)
        if result.kind != EXPORT:
            warnings.warn(
                f"tb_microscope: torch.export could not capture {type(self._model).__name__} "
                f"({result.note}). Its architecture is saved as a pickle instead: readers must "
                "pass allow_pickle=True (tensorboard --microscope_allow_pickle) to load it, since "
                "unpickling runs code from the log directory, and they need the same torch.",
                RuntimeWarning,
                stacklevel=3,
            )
        return result

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _fail(self, step: int | None, message: str, cause: BaseException) -> None:
        where = f"step {step}" if step is not None else "the architecture"
        text = f"tb_microscope: writing {where} to '{self.store.run_dir}' failed: {message}"
        if self.strict:
            error = SnapshotWriteError(text)
            error.__cause__ = cause
            self._error = self._error or error
        else:  # often on the writer thread, where a caller's line would mean nothing
            warnings.warn_explicit(
                text + ". Training continues.", RuntimeWarning, "tb_microscope", 0
            )

    # --- background thread -----------------------------------------------------------------
    def _write_loop(self) -> None:
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
                self._write(job)
            finally:
                self._queue.task_done()

    def _write(self, job: _Job) -> None:
        start = time.perf_counter()
        try:
            for event in job.events:
                event.synchronize()
            if job.architecture is not None:
                self._pending_architecture = job.architecture
            if self._pending_architecture is not None:
                self._write_architecture(self._pending_architecture)
                self._pending_architecture = None
            job.record.bytes = self.store.write_snapshot(
                job.step,
                job.tensors,
                job.aliases,
                {"wall_time": str(job.wall_time), "tb_microscope": __version__},
            )
            self._events.write(job.step, job.record.bytes, job.wall_time)
        except Exception as e:
            job.record.error = f"{type(e).__name__}: {e}"
            self._fail(job.step, f"{job.record.error}; {_hint(e)}", e)
        job.record.write_s = time.perf_counter() - start

    def _write_architecture(self, result: Capture) -> None:
        file = {EXPORT: EXPORTED_ARCHITECTURE, PICKLE: PICKLED_ARCHITECTURE}.get(result.kind)
        if result.kind == EXPORT:
            atomic_write(self.store.root / file, lambda temp: save_program(result.program, temp))
        elif result.kind == PICKLE:
            write_bytes_atomic(self.store.root / file, result.pickled)
        if self._probe is not None:
            self.store.write_probe(self._probe)
        model = self._model
        self.store.write_manifest(
            Manifest(
                run_id=new_run_id(),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                tb_microscope=__version__,
                torch=torch.__version__,
                model=ModelInfo(
                    cls=f"{type(model).__module__}.{type(model).__qualname__}",
                    parameters=sum(p.numel() for p in model.parameters()),
                    weights=self._fingerprint,
                    architecture=Architecture(result.kind, file, result.note),
                ),
                input=dataclasses.replace(self._input, dims=result.dims),
                nodes=self.nodes,
                edges=[tuple(e) for e in result.edges],
                probe=None
                if self._probe is None
                else ProbeSpec(int(self._probe.shape[0]), list(self._probe.shape[1:])),
                schedule=repr(self.schedule),
            )
        )

    # --- lifecycle -------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every queued snapshot is on disk."""
        if not self._inert and not self._closed:
            self._queue.join()
            self._raise_pending()

    def close(self, raise_errors: bool = True) -> None:
        """Write what is queued and stop the background thread. Safe to call twice."""
        if self._inert or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._events.close()
        _open_loggers.discard(self)
        if raise_errors:
            self._raise_pending()

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close(raise_errors=exc[0] is None)
