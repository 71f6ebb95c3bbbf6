"""The reading side: `open_run` gives a logged run's steps and nodes, and its model at any step."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import nn

from .capture import EXPORT, PICKLE, Node, assign_state, load_exported, load_pickled
from .errors import (
    CorruptSnapshotError,
    IncompatibleRunError,
    NodeNotFoundError,
    RunNotFoundError,
    summarize,
)
from .runstore import MANIFEST, PLUGIN_NAME, RunStore


class Run:
    """One logged run. `steps` is read from disk on every access, so new snapshots appear."""

    def __init__(self, run_dir: str | os.PathLike, *, allow_pickle: bool = False):
        self.store = RunStore(run_dir)
        self.path = self.store.run_dir
        self.allow_pickle = allow_pickle
        self.manifest = self.store.read_manifest()
        self.nodes = [Node.from_json(n) for n in self.manifest["nodes"]]
        self.edges = [tuple(e) for e in self.manifest["edges"]]
        self._by_name = {n.name: n for n in self.nodes}
        self._programs: dict[str, torch.export.ExportedProgram] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self.steps)}, nodes={len(self.nodes)})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def steps(self) -> list[int]:
        return self.store.steps()

    @property
    def input_spec(self) -> dict:
        return self.manifest["input"]

    @property
    def architecture(self) -> str:
        """ "export", "pickle" or "none" (weights only: the model could not be captured)."""
        return self.manifest["model"]["architecture"]["kind"]

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise NodeNotFoundError(
                f"node {name!r} is not in run '{self.name}'; nodes: "
                f"{summarize(list(self._by_name), 40)}"
            ) from None

    def load_state_dict(self, step: int, device: str | torch.device = "cpu") -> dict:
        """The model's state dict at `step` (tied names share one tensor)."""
        return self.store.read_snapshot(step, device)

    def load_model(self, step: int, device: str | torch.device = "cpu") -> nn.Module:
        """The model at `step`, in eval mode, rebuilt without the training script's code.

        Its nodes are named submodules (`model.get_submodule("layer3.1.conv2")`) that forward
        hooks can watch, and gradients flow back to its input.
        """
        device = torch.device(device)
        state = self.load_state_dict(step, device)
        module = self._architecture(device)
        try:
            assign_state(module, state)
        except ValueError as e:
            raise CorruptSnapshotError(f"step {step} of run '{self.name}': {e}") from e
        return module.to(device).eval()

    def _architecture(self, device: torch.device) -> nn.Module:
        spec = self.manifest["model"]["architecture"]
        path = self.store.root / str(spec.get("file"))
        if spec["kind"] == EXPORT:
            with self._lock:
                if str(device) not in self._programs:
                    self._programs[str(device)] = load_exported(path, device)
            return torch.export.unflatten(self._programs[str(device)])
        if spec["kind"] == PICKLE:
            return load_pickled(path.read_bytes(), self.path, self.allow_pickle)
        raise IncompatibleRunError(
            f"run '{self.name}' holds weights only: its architecture could not be captured when "
            f"it was logged ({spec.get('note')}). Load the weights into your own model with "
            "run.load_state_dict(step)."
        )

    def probe_images(self) -> torch.Tensor | None:
        """The probe images logged with the run, uint8 N x C x H x W, or None."""
        return self.store.read_probe()


def open_run(run_dir: str | os.PathLike, *, allow_pickle: bool = False) -> Run:
    """Open the run logged into `run_dir` by `tb_microscope.Logger`.

    A pickled architecture (a model torch.export could not capture) is refused unless
    `allow_pickle=True`, because unpickling runs code from the log directory.
    """
    if not Path(run_dir).is_dir():
        raise RunNotFoundError(
            f"'{run_dir}' is not a directory; pass a run directory written by tb_microscope.Logger"
        )
    return Run(run_dir, allow_pickle=allow_pickle)


def find_runs(logdir: str | os.PathLike) -> list[Path]:
    """Every run directory under `logdir` (itself included) that holds tb_microscope data."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise RunNotFoundError(f"'{logdir}' is not a directory")
    found = []
    for root, dirs, files in os.walk(logdir):
        here = Path(root)
        if here.name == PLUGIN_NAME and here.parent.name == "plugins":
            if MANIFEST in files:
                found.append(here.parent.parent)
            dirs.clear()
        dirs.sort()
    return sorted(found)
