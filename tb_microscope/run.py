"""The reading side: `open_run` gives a logged run's steps and nodes, and its model at any step."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import (
    CorruptSnapshotError,
    IncompatibleRunError,
    MicroscopeError,
    NodeNotFoundError,
    PickleNotAllowedError,
    RunNotFoundError,
    summarize,
)
from .lru import LRU
from .nodes import Node
from .store.architecture import (
    EXPORT_LOCK,
    check_program,
    load_pickled,
    load_program,
    move_program,
    pickle_refusal,
    program_bytes,
)
from .store.local import RunStore
from .store.manifest import EXPORT, PENDING, PICKLE, InputSpec
from .store.mlflow import MlflowRunStore, parse_mlflow_uri
from .store.paths import is_mlflow_uri, is_remote_url, local_path

PROGRAM_CACHE_BYTES = 1 << 30  # a Run's own bound, when no shared cache is given


class Run:
    """One logged run. `steps` is read from disk on every access, so new snapshots appear.

    `id` is the random id its Logger wrote: what every cache of the reading side is keyed by,
    with each snapshot's `snapshot_version`, so a run deleted and logged again under the same
    name is a new run. `memory` is the cache loaded programs go to, shared with the loaded
    models by a server (bounded in bytes); by default each Run has a small one of its own.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        memory: LRU | None = None,
        store: RunStore | None = None,
    ):
        self.store = store if store is not None else RunStore(run_dir)
        self.path = self.store.run_dir
        self.allow_pickle = allow_pickle
        self.signature = self.store.manifest_signature()
        self.manifest = self.store.read_manifest()
        self.id = self.manifest.run_id
        self.nodes: list[Node] = self.manifest.nodes
        self.edges: list[tuple[str, str]] = self.manifest.edges
        self._by_name = {n.name: n for n in self.nodes}
        self._memory = memory if memory is not None else LRU(max_bytes=PROGRAM_CACHE_BYTES)
        self._problem: list[BaseException | None] = []  # memo of check()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self.steps)}, nodes={len(self.nodes)})"

    @property
    def name(self) -> str:
        """The run directory's name; `runs:/<id>` for an MLflow run, its URL for a run in
        object storage."""
        return getattr(self.store, "name", None) or self.path.name

    @property
    def steps(self) -> list[int]:
        return self.store.steps()

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def architecture(self) -> str:
        """ "export", "pickle", "none" (weights only: the model could not be captured) or
        "pending" (its Logger is capturing it)."""
        return self.manifest.model.architecture.kind

    def check(self) -> None:
        """Raise why no model of this run can be loaded here: a refused or unreadable
        architecture file, a pickle without allow_pickle, weights only. Checked once per Run,
        without building the model."""
        if not self._problem:
            spec = self.manifest.model.architecture
            try:
                if spec.kind == EXPORT:
                    check_program(self.store.root / spec.file, trusted=self.allow_pickle)
                elif spec.kind == PICKLE and not self.allow_pickle:
                    raise pickle_refusal(self.path)
                elif spec.kind == PENDING:
                    raise self._pending()
                elif spec.kind not in (EXPORT, PICKLE):
                    raise self._weights_only()
                self._problem.append(None)
            except (MicroscopeError, ValueError, OSError) as e:
                self._problem.append(e)
        error = self._problem[0]
        if isinstance(error, MicroscopeError):
            raise error.with_traceback(None)  # raised again and again: its traceback must not grow
        if error is not None:
            raise IncompatibleRunError(str(error))

    def problem(self) -> str | None:
        """What `check` would raise, as text, or None."""
        try:
            self.check()
        except MicroscopeError as e:
            return str(e)
        return None

    def is_current(self) -> bool:
        """False once the run's manifest was replaced (the run deleted and logged again)."""
        return self.store.manifest_signature() == self.signature

    def snapshot_version(self, step: int) -> str:
        """What identifies the content of `step`'s snapshot (see `RunStore.snapshot_version`)."""
        return self.store.snapshot_version(step)

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise NodeNotFoundError(
                f"node {name!r} is not in run '{self.name}'; nodes: "
                f"{summarize(list(self._by_name), 40)}"
            ) from None

    def load_state_dict(self, step: int, device: str | torch.device = "cpu") -> dict:
        """The model's state dict at `step` (tied names share one tensor), checked against the
        run's model before it is read."""
        return self.store.read_snapshot(step, device, self.manifest.model.weights)

    def load_model(self, step: int, device: str | torch.device = "cpu") -> nn.Module:
        """The model at `step`, in eval mode, rebuilt without the training script's code.

        Its nodes are named submodules (`model.get_submodule("layer3.1.conv2")`) that forward
        hooks can watch, and gradients flow back to its input.
        """
        device = torch.device(device)
        module = self._architecture(device)
        state = self.load_state_dict(step, device)
        try:
            assign_state(module, state)
        except ValueError as e:
            raise CorruptSnapshotError(f"step {step} of run '{self.name}': {e}") from e
        return module.to(device).eval()

    def prepare(self, device: str | torch.device = "cpu") -> None:
        """Load the run's architecture into memory ahead of `load_model`, which then only reads
        weights: torch.export's loader takes seconds for a large model (about 2 s for a
        ResNet-50 or a GoogLeNet on a 2-core CPU, and 3 s of imports the first time in a
        process), and the program is kept in the run's memory. Does nothing for a pickled
        architecture (nothing to keep)."""
        if self.manifest.model.architecture.kind == EXPORT:
            self._architecture(torch.device(device))

    def _architecture(self, device: torch.device) -> nn.Module:
        spec = self.manifest.model.architecture
        if spec.kind == EXPORT:
            path = self.store.root / spec.file
            key = ("program", self.id, self.signature, str(device))

            def load():
                try:
                    program = load_program(path, trusted=self.allow_pickle)
                except PickleNotAllowedError:
                    raise  # the refusal says it all
                except (ValueError, OSError) as e:
                    raise IncompatibleRunError(
                        f"the architecture of run '{self.name}' cannot be loaded: {e}"
                    ) from e
                program = move_program(program, device)
                return program, program_bytes(program)

            program = self._memory.get_or_make(key, load)
            with EXPORT_LOCK:  # torch.export's module globals: one thread at a time
                return torch.export.unflatten(program)
        if spec.kind == PICKLE:
            path = self.store.root / spec.file
            return load_pickled(path.read_bytes(), self.path, self.allow_pickle)
        raise self._pending() if spec.kind == PENDING else self._weights_only()

    def _pending(self) -> IncompatibleRunError:
        return IncompatibleRunError(
            f"the architecture of run '{self.name}' is still being captured by its Logger (a few "
            "seconds for most models); if no Logger writes this run any more, it was stopped "
            "first: a new Logger on the same directory captures it again"
        )

    def _weights_only(self) -> IncompatibleRunError:
        return IncompatibleRunError(
            f"run '{self.name}' holds weights only: its architecture could not be captured when "
            f"it was logged ({self.manifest.model.architecture.note}). Load the weights into "
            "your own model with run.load_state_dict(step)."
        )

    def probe_images(self) -> torch.Tensor | None:
        """The probe images logged with the run, uint8 N x C x H x W, or None."""
        return self.store.read_probe(self.input_spec.channels)


def open_run(
    run_dir: str | os.PathLike, *, allow_pickle: bool = False, tracking_uri: str | None = None
) -> Run:
    """Open the run logged into `run_dir` by `tb_microscope.Logger`.

    `run_dir` may also be `runs:/<run_id>`, an MLflow run logged with `Logger("mlflow", ...)`,
    read from the tracking server at `tracking_uri` (default: MLFLOW_TRACKING_URI) through a
    local mirror: opening it again fetches what is new; each snapshot is fetched when first read.

    `run_dir` may also be an fsspec URL (`s3://bucket/runs/exp1`, `gs://...`, `memory://...`),
    read through a local mirror as well (see `tb_microscope.store.remote`): new steps appear as
    they are listed, each snapshot is fetched when first read into a bounded cache.

    A pickled architecture (a model torch.export could not capture) is refused unless
    `allow_pickle=True`, because unpickling runs code from the log directory.
    """
    if is_mlflow_uri(run_dir):
        store = MlflowRunStore(parse_mlflow_uri(run_dir), tracking_uri)
        store.sync()
        return Run(store.run_dir, allow_pickle=allow_pickle, store=store)
    if is_remote_url(run_dir):
        from .store.remote import RemoteRunStore

        store = RemoteRunStore(run_dir)
        store.sync()
        return Run(store.run_dir, allow_pickle=allow_pickle, store=store)
    run_dir = local_path(run_dir)
    if not Path(run_dir).is_dir():
        raise RunNotFoundError(
            f"'{run_dir}' is not a directory; pass a run directory written by tb_microscope.Logger"
        )
    return Run(run_dir, allow_pickle=allow_pickle)


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Put `state`'s tensors into `module` in place of its own (no copy), keeping ties.

    The module gets fresh Parameter objects, so two modules rebuilt from one architecture never
    share weights.
    """
    expected = set(module.state_dict(keep_vars=True))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            "the snapshot does not match the run's architecture: "
            + "; ".join(
                f"{what} {summarize(names)}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            )
        )
    made: dict[int, nn.Parameter] = {}
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if id(tensor) not in made:
                made[id(tensor)] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            owner._parameters[attr] = made[id(tensor)]
        else:
            owner._buffers[attr] = tensor
    return module
