"""The render service behind the plugin: a queue of render jobs and a worker that runs them.

Requests for units of the same (run, step, node, technique, size, iterations, seed) join one
group and are rendered in one optimization; identical requests share one job. The group asked
about most recently goes first. Finished images go to the run's render cache, which is where the
plugin serves them from; a failed group keeps its error for the pollers and the worker carries on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import MicroscopeError
from ..rendering import RenderCache, RenderKey, render_cached
from ..rendering.engine import default_device
from ..run import Run

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


@dataclass(frozen=True)
class Group:
    """Units that can share one optimization."""

    run: str  # the run's directory
    step: int
    node: str
    technique: str
    size: int
    iterations: int
    seed: int


@dataclass
class _Job:
    group: Group
    units: set[int] = field(default_factory=set)
    state: str = QUEUED
    asked: float = 0.0  # when a poller last asked about it (newest goes first)
    order: int = 0
    started: float | None = None


class RenderService:
    """One worker thread per device; here one device, the first CUDA device or the CPU."""

    def __init__(
        self,
        *,
        device: str | None = None,
        cache_dir: str | None = None,
        allow_pickle: bool = False,
        max_queued: int = 256,
        max_models: int = 4,
    ):
        self.device = torch.device(device) if device else default_device()
        self.cache_dir = cache_dir
        self.allow_pickle = allow_pickle
        self.max_queued = max_queued
        self._queued: dict[Group, _Job] = {}
        self._running: dict[Group, _Job] = {}
        self._failed: dict[tuple[Group, int], str] = {}
        self._runs: dict[str, Run] = {}
        self._models: OrderedDict[tuple[str, int], torch.nn.Module] = OrderedDict()
        self._max_models = max_models
        self._counter = itertools.count()
        self._lock = threading.Condition()
        self.renders = 0  # optimizations run, for tests and benchmarks
        self._worker = threading.Thread(target=self._work, name="tb_microscope-render", daemon=True)
        self._worker.start()

    # --- for the plugin ----------------------------------------------------------------------
    def run(self, path: str) -> Run:
        with self._lock:
            if path not in self._runs:
                self._runs[path] = Run(path, allow_pickle=self.allow_pickle)
            return self._runs[path]

    def cache(self, run: Run) -> RenderCache:
        return RenderCache(run, self.cache_dir)

    def request(self, group: Group, unit: int) -> dict:
        """Ask for one unit's image; returns its status (`done` once it is in the cache)."""
        run = self.run(group.run)
        key = RenderKey(
            group.step, group.node, unit, group.technique, group.size, group.iterations, group.seed
        )
        if key in self.cache(run):
            return {"status": DONE}
        with self._lock:
            if (group, unit) in self._failed:
                return {"status": FAILED, "error": self._failed[(group, unit)]}
            running = self._running.get(group)
            if running is not None and unit in running.units:
                return self._status(running)
            job = self._queued.get(group)
            if job is None:
                if len(self._queued) >= self.max_queued:
                    raise MicroscopeError("the render queue is full; try again shortly")
                job = self._queued[group] = _Job(group, order=next(self._counter))
            job.units.add(unit)
            job.asked = time.monotonic()
            self._lock.notify()
            return self._status(job)

    def _status(self, job: _Job) -> dict:
        if job.state == RUNNING:
            return {
                "status": RUNNING,
                "position": 0,
                "units": len(job.units),
                "elapsed": round(time.monotonic() - (job.started or time.monotonic()), 1),
            }
        ahead = sorted(self._queued.values(), key=lambda j: (-j.asked, j.order))
        return {
            "status": QUEUED,
            "position": ahead.index(job) + len(self._running),
            "units": len(job.units),
        }

    # --- worker ------------------------------------------------------------------------------
    def _next(self) -> _Job:
        with self._lock:
            while not self._queued:
                self._lock.wait()
            job = max(self._queued.values(), key=lambda j: (j.asked, -j.order))
            del self._queued[job.group]
            self._running[job.group] = job
            job.state, job.started = RUNNING, time.monotonic()
            return job

    def _model(self, run: Run, step: int) -> torch.nn.Module:
        key = (str(run.path), step)
        if key in self._models:
            self._models.move_to_end(key)
        else:
            self._models[key] = run.load_model(step, self.device)
            while len(self._models) > self._max_models:
                self._models.popitem(last=False)
        return self._models[key]

    def _work(self) -> None:
        while True:
            job = self._next()
            group = job.group
            units = sorted(job.units)
            try:
                run = self.run(group.run)
                render_cached(
                    self.cache(run),
                    run,
                    group.step,
                    group.node,
                    units,
                    group.technique,
                    size=group.size,
                    iterations=group.iterations,
                    seed=group.seed,
                    device=self.device,
                    model=self._model(run, group.step),
                )
                self.renders += 1
            except Exception as e:  # reported to the pollers; the worker goes on
                message = f"{type(e).__name__}: {e}"
                with self._lock:
                    for unit in units:
                        self._failed[(group, unit)] = message
            with self._lock:
                del self._running[group]
