"""The training side: `Logger` saves the model's weights at chosen steps into a run directory.

The training thread does as little as possible: at a snapshot it copies the weights to host memory
once (pinned, asynchronous on CUDA) and hands them to the background writer (`writer.py`), which
writes the safetensors file atomically. The architecture is captured once, at the first snapshot,
on a thread of its own and on a CPU copy of the model built from that host copy, so that no
`log()` waits for `torch.export` (seconds for most models, much more for some); snapshots are
written meanwhile, and the run becomes readable once its manifest is written. Write errors (full
disk, permissions) warn and never stop training unless `strict=True`; every warning is also a
record of this module's logger, with the error's traceback where there is one (`errors.warn`).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import datetime
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import IncompatibleRunError, first_line, summarize, warn
from ..store import mlflow as mlflow_integration
from ..store.local import RunStore, write_bytes_atomic
from ..store.manifest import (
    EXPORT,
    NONE,
    PENDING,
    PICKLE,
    Architecture,
    InputSpec,
    Manifest,
    ModelInfo,
    ProbeSpec,
    new_run_id,
)
from ..store.mlflow import ArtifactUploader
from ..store.paths import EXPORTED_ARCHITECTURE, PICKLED_ARCHITECTURE, is_remote_url
from ..store.upload import Uploader, uploaded_steps
from .capture import (
    Capture,
    ChildCapture,
    discover_nodes,
    original_forward,
    select_nodes,
    unwrap,
)
from .schedule import make_schedule
from .writer import (
    ErrorPolicy,
    ManifestJob,
    SnapshotJob,
    SnapshotRecord,
    SnapshotWriteError,
    SnapshotWriter,
)

__all__ = ["Logger", "SnapshotRecord", "SnapshotWriteError"]

Normalize = tuple[Sequence[float] | float, Sequence[float] | float]
log = logging.getLogger(__name__)


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


def _outside(images: torch.Tensor, lo: float, hi: float) -> float:
    """The share of `images`' values outside [lo, hi] by more than 2% of its width; 0 for a
    share under 1% (rounding, a few extreme pixels)."""
    slack = 0.02 * (hi - lo)
    share = float(((images < lo - slack) | (images > hi + slack)).float().mean())
    return share if share >= 0.01 else 0.0


def _looks_unnormalized(x: torch.Tensor, spec: dict, lo: float, hi: float) -> bool:
    """Whether probe images `x`, said to be normalized with `spec`, are more likely images in
    value_range that were never normalized: every value lies in [lo, hi] although normalized
    images have a negative value wherever a pixel is darker than its channel's mean, and the
    normalization is not close to the identity (where the two readings agree)."""
    slack = 0.02 * (hi - lo)
    near_identity = all(abs(m) < 0.05 for m in spec["mean"]) and all(
        abs(s - 1) < 0.05 for s in spec["std"]
    )
    return not near_identity and float(x.min()) >= lo - slack and float(x.max()) <= hi + slack


def cpu_copy(model: nn.Module, tensors: dict, aliases: dict) -> nn.Module:
    """A copy of `model` on the CPU whose weights are the snapshot's host tensors (no second
    copy of them), for capturing its architecture while the model itself trains on; with its own
    forward, not accelerate's mixed precision wrapper (`original_forward`)."""
    state = {**tensors, **{alias: tensors[stored] for alias, stored in aliases.items()}}
    memo: dict[int, object] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state and id(p) not in memo:
            memo[id(p)] = nn.Parameter(state[name], requires_grad=p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in state and id(b) not in memo:
            memo[id(b)] = state[name]
    return original_forward(copy.deepcopy(model, memo).cpu())


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

    `Logger("mlflow", ...)` logs into the active MLflow run (or the one `run_id=` names, at
    `tracking_uri=`, default MLFLOW_TRACKING_URI) as artifacts under `tb_microscope/`: files are
    written to a local staging directory first and uploaded by a background thread. While the
    server is unreachable they wait there; past `backlog_mb` of waiting snapshots, due steps are
    skipped (with a warning) until the backlog drains. `close()` waits up to `upload_timeout`
    seconds for the uploads; what is left is uploaded by the next Logger on that run.

    `logdir` may also be an fsspec URL (`s3://bucket/runs/exp1`, `gs://...`; s3fs or gcsfs
    installed): the run is written to a local staging directory and each finished file is put
    there whole by a background thread, as for MLflow (same `backlog_mb` and `upload_timeout`).
    Access is checked when the Logger starts: a missing bucket or missing credentials raise here.
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
        run_id: str | None = None,
        tracking_uri: str | None = None,
        backlog_mb: float = 4096,
        upload_timeout: float = 60.0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self._inert = _is_secondary_rank()
        self._uploader: Uploader | None = None
        self.mlflow_run_id: str | None = None
        self.url: str | None = None
        if is_remote_url(logdir):
            if run_id is not None or tracking_uri is not None:
                raise ValueError("run_id= and tracking_uri= name an MLflow run, not a URL")
            from ..store import remote

            self.url = remote.normalize(logdir)
            if not self._inert:
                remote.check_access(self.url)
            logdir = remote.staging_dir(self.url)
        elif isinstance(logdir, str) and logdir == "mlflow":
            if not self._inert:
                uri = mlflow_integration.tracking_uri(tracking_uri)
                self.mlflow_run_id = mlflow_integration.active_run_id(run_id)
                logdir = mlflow_integration.staging_dir(uri, self.mlflow_run_id)
        elif run_id is not None or tracking_uri is not None:
            raise ValueError(
                "run_id= and tracking_uri= name an MLflow run: use them with "
                "Logger('mlflow', ...); a log directory needs neither"
            )
        self._backlog_bytes = int(backlog_mb * (1 << 20))
        self._upload_timeout = upload_timeout
        self._backlog_warned = False
        self.store = RunStore(logdir)
        self.strict = strict
        self.schedule = make_schedule(every, steps)
        self.records: list[SnapshotRecord] = []
        self._model = unwrap(model)
        self._closed = False
        self._policy = ErrorPolicy(self.store.run_dir, strict)
        self._capture_done = False
        self._capturing: threading.Thread | None = None
        self._run_id = new_run_id()
        self._logged: set[int] = set()
        self._last_logged: int | None = None
        if self._inert:  # DDP: only rank 0 writes
            return

        example = self._check_example(example_input)
        self._example = example
        try:
            discovery = discover_nodes(self._model, example)
        except Exception as e:
            why = str(e).strip()[:300].rstrip(".")
            raise ValueError(
                f"example_input of shape {tuple(example.shape)} ({example.dtype}) does not fit the "
                f"model: {type(e).__name__}: {why}. Pass one batch shaped as the "
                "model receives it in training, e.g. torch.randn(2, 3, 224, 224)."
            ) from e
        all_nodes, self._eager_edges = discovery.nodes, discovery.edges
        self._left_out = discovery.note
        if not all_nodes:
            raise ValueError(
                "the model has no named submodule whose output is a feature map, tokens or a "
                "vector; tb_microscope needs at least one (a conv or linear layer, say)"
            )
        wanted = list(nodes) if nodes is not None else None
        self.nodes = select_nodes(all_nodes, wanted, discovery.left_out)
        self._input = self._input_spec(example, normalize, value_range)
        self._probe = self._probe_images(probe, example)

        self.store.remove_stale_temporaries()
        self._fingerprint = weights_fingerprint(self._model)
        if self.mlflow_run_id is not None:  # a run logged elsewhere: go on with it
            mlflow_integration.adopt_remote(self.store, self.mlflow_run_id, uri)
        elif self.url is not None:
            from ..store.remote import adopt_remote

            adopt_remote(self.store, self.url)
        if self.store.has_manifest():
            self._resume()
        if self.mlflow_run_id is not None:
            self._uploader = ArtifactUploader(self.store, self.mlflow_run_id, uri, self._run_id)
        elif self.url is not None:
            from ..store.remote import RemoteUploader

            self._uploader = RemoteUploader(self.store, self.url, self._run_id)
        self._writer = SnapshotWriter(
            self.store, self._policy, self._uploader.notify if self._uploader else None
        )
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
        lo, hi = self._input.value_range
        if spec is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            images = x * torch.tensor(spec["std"]).view(shape) + torch.tensor(spec["mean"]).view(
                shape
            )
            if _looks_unnormalized(x, spec, lo, hi):
                warn(
                    f"probe= holds float images in [{lo:g}, {hi:g}] that look not normalized (no "
                    "value below any channel's mean; read as normalized inputs, they would be "
                    f"washed out to [{float(images.min()):.2f}, {float(images.max()):.2f}]): they "
                    "are stored as the images they are. Pass probe= exactly as the model is fed "
                    "(normalized like the training inputs), or as uint8 images, to silence this.",
                    log=log,
                )
                images = x
        else:
            images = x
        clipped = _outside(images, lo, hi)
        if clipped:
            what = "normalize=(mean, std)" if spec is None else "value_range=(low, high)"
            warn(
                f"{clipped:.0%} of the probe images' values lie outside value_range "
                f"[{lo:g}, {hi:g}] (min {float(images.min()):.3g}, max {float(images.max()):.3g}) "
                f"and are clipped: pass probe= as the model is fed, and {what} if the model's "
                "inputs are normalized or span another range.",
                log=log,
            )
        return ((images - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()

    def _resume(self) -> None:
        manifest = self.store.read_manifest()
        stored = manifest.model.weights
        if stored != self._fingerprint:
            differ = sorted(set(stored) ^ set(self._fingerprint)) or sorted(
                k for k in stored if stored[k] != self._fingerprint[k]
            )
            where, instead = f"run '{self.store.run_dir}'", "a new run directory"
            if self.mlflow_run_id is not None:
                where = f"MLflow run {self.mlflow_run_id}"
                instead = "a new MLflow run (mlflow.start_run())"
            elif self.url is not None:
                where, instead = f"run '{self.url}'", "a new URL"
            raise IncompatibleRunError(
                f"{where} already holds a different model (weights differ at "
                f"{summarize(differ)}); log this model into {instead}"
            )
        self._run_id = manifest.run_id
        # an architecture still pending was never captured (its Logger ended first): capture it
        self._capture_done = manifest.model.architecture.kind != PENDING
        existing = self.store.steps()
        if self.mlflow_run_id is not None or self.url is not None:
            # uploaded snapshots leave the staging directory
            existing = sorted(set(existing) | set(uploaded_steps(self.store)))
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
        self._policy.raise_pending()
        if step in self._logged or not (force or self.schedule.due(step, self._last_logged)):
            return False
        if self._uploader is not None and self._backlogged(step):
            return False
        start = time.perf_counter()
        tensors, aliases, events = self._host_copy()
        if not self._capture_done:
            self._start_capture(tensors, aliases, events)
        record = SnapshotRecord(step, 0.0)
        self._writer.submit(SnapshotJob(step, tensors, aliases, events, time.time(), record))
        record.stall_s = time.perf_counter() - start
        self.records.append(record)
        self._logged.add(step)
        self._last_logged = max(step, self._last_logged if self._last_logged is not None else step)
        return True

    def _backlogged(self, step: int) -> bool:
        """True (said once) while more than `backlog_mb` of snapshots wait for MLflow."""
        count, size = self._uploader.backlog()
        if size <= self._backlog_bytes:
            self._backlog_warned = False
            return False
        if not self._backlog_warned:
            self._backlog_warned = True
            warn(
                f"step {step} is not logged: {count} snapshots ({size / 1e6:.0f} MB) already "
                f"wait in {self.store.run_dir} for {self._uploader.where}, more than "
                f"backlog_mb={self._backlog_bytes >> 20}; steps are logged again once they "
                "are uploaded",
                log=log,
            )
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

    def _start_capture(self, tensors: dict, aliases: dict, events: list) -> None:
        """Capture the architecture on a thread of its own, from a CPU copy of the model whose
        weights are this snapshot's host copy (the live model trains on meanwhile)."""
        self._capture_done = True
        pending = Capture(PENDING, None, None, [], self._eager_edges, None)
        self._writer.submit(ManifestJob(self._manifest(pending)))  # readable while capturing
        for event in events:  # the host copy must be complete before the copy reads it
            event.synchronize()
        try:
            model = cpu_copy(self._model, tensors, aliases)
        except Exception:  # a module that cannot be deep-copied: capture the live model, now
            child = ChildCapture(self._model, self._example, self.nodes, self._eager_edges)
            self._capture(child.start())
            return
        # forked here, on the training thread between its steps (see ChildCapture), and waited
        # for on a thread of its own
        child = ChildCapture(model, self._example.detach().cpu(), self.nodes, self._eager_edges)
        self._capturing = threading.Thread(
            target=self._capture, args=(child.start(),), name="tb_microscope-capture", daemon=True
        )
        self._capturing.start()

    def _capture(self, child: ChildCapture) -> None:
        name = type(self._model).__name__
        try:
            result = child.result()
        except Exception as e:
            why = first_line(e)
            self._policy.fail(
                "the architecture",
                f"could not capture the model's architecture ({why}); snapshots are "
                "still written, but the run cannot be rebuilt without your code",
                e,
            )
            result = Capture(NONE, None, None, [], self._eager_edges, why)
        # One line each, from the capture thread (where a caller's line would mean nothing).
        if result.kind == PICKLE:
            warn(
                f"torch.export could not capture {name} ({result.note}); its architecture is "
                "saved as a pickle, which readers load only with allow_pickle=True "
                "(tensorboard --microscope_allow_pickle), as it runs code.",
                log=log,
            )
        elif result.kind == EXPORT and result.note:
            fixed = {d["name"]: d["size"] for d in result.dims}
            if fixed.get("height") is not None:
                warn(
                    f"captured {name} for {fixed['height']}x{fixed['width']} inputs only "
                    f"({result.note}); it is rendered at that size.",
                    log=log,
                )
            elif any(d["max"] is not None for d in result.dims if d["name"] == "height"):
                warn(
                    f"captured {name} ({result.note}); pictures are rendered within that size.",
                    log=log,
                )
        self._writer.submit(ManifestJob(self._manifest(result), self._architecture_writer(result)))

    def _architecture_writer(self, result: Capture):
        def write(store: RunStore) -> None:
            if result.kind == EXPORT:
                path = store.root / EXPORTED_ARCHITECTURE
                write_bytes_atomic(path, result.archive)
            elif result.kind == PICKLE:
                write_bytes_atomic(store.root / PICKLED_ARCHITECTURE, result.pickled)
            if self._probe is not None:
                store.write_probe(self._probe)

        return write

    def _note(self, result: Capture) -> str | None:
        """The capture's note, after the modules that discovery left out."""
        return "; ".join(n for n in (result.note, self._left_out) if n) or None

    def _manifest(self, result: Capture) -> Manifest:
        file = {EXPORT: EXPORTED_ARCHITECTURE, PICKLE: PICKLED_ARCHITECTURE}.get(result.kind)
        model = self._model
        return Manifest(
            run_id=self._run_id,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tb_microscope=__version__,
            torch=torch.__version__,
            model=ModelInfo(
                cls=f"{type(model).__module__}.{type(model).__qualname__}",
                parameters=sum(p.numel() for p in model.parameters()),
                weights=self._fingerprint,
                architecture=Architecture(result.kind, file, self._note(result)),
            ),
            input=dataclasses.replace(self._input, dims=result.dims),
            nodes=self.nodes if result.nodes is None else result.nodes,
            edges=[tuple(e) for e in result.edges],
            probe=None
            if self._probe is None
            else ProbeSpec(int(self._probe.shape[0]), list(self._probe.shape[1:])),
            schedule=repr(self.schedule),
        )

    def _wait_for_capture(self) -> None:
        if self._capturing is not None:
            self._capturing.join()
            self._capturing = None

    # --- lifecycle -------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until the architecture (once captured) and every queued snapshot are on disk."""
        if not self._inert and not self._closed:
            self._wait_for_capture()
            self._writer.join()
            if self._uploader is not None:
                self._uploader.wait(self._upload_timeout)
            self._policy.raise_pending()

    def close(self, raise_errors: bool = True) -> None:
        """Write what is queued and stop the background thread. Safe to call twice."""
        if self._inert or self._closed:
            return
        self._closed = True
        self._wait_for_capture()
        self._writer.close()
        if self._uploader is not None:
            self._uploader.close(self._upload_timeout)
        _open_loggers.discard(self)
        if raise_errors:
            self._policy.raise_pending()

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close(raise_errors=exc[0] is None)
