"""The render service behind the plugin: a queue of render jobs and one worker per device.

Requests for units of the same (run, step, node, technique, size, iterations, seed) join one
group and are rendered in one optimization; identical requests share one job. The group asked
about most recently goes first, and units nobody has asked about for `stale_after` seconds are
dropped before their group starts (the tab polls while it shows a unit). Finished images go to
the run's render cache, where the plugin serves them from. A failed render keeps its error for
the pollers; the worker carries on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from ..errors import MicroscopeError
from ..rendering import RenderCache, RenderKey, get_technique, render_cached
from ..run import Run

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class QueueFullError(MicroscopeError):
    """More render groups are waiting than the service takes."""


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

    def key(self, unit: int, image: int = 0) -> RenderKey:
        return RenderKey(
            self.step, self.node, unit, self.technique, self.size, self.iterations, self.seed, image
        )

    def keys(self, unit: int) -> list[RenderKey]:
        """The keys of all the unit's images (diversity draws several)."""
        return [self.key(unit, i) for i in range(get_technique(self.technique).images_per_unit)]


@dataclass
class _Job:
    group: Group
    asked: dict[int, float] = field(default_factory=dict)  # unit -> when last asked about
    order: int = 0
    started: float | None = None
    progress: float = 0.0  # fraction of the optimization done, while running

    @property
    def last_asked(self) -> float:
        return max(self.asked.values(), default=0.0)


def service_devices(device: str | None) -> list[torch.device]:
    """The devices to run workers on: the one named, else every CUDA device, else the CPU."""
    if device:
        return [torch.device(device)]
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


class _Models:
    """Loaded models of one device, least recently used first out, bounded in bytes."""

    def __init__(self, device: torch.device, max_bytes: int):
        self.device, self.max_bytes = device, max_bytes
        self._models: OrderedDict[tuple[str, int], tuple[torch.nn.Module, int]] = OrderedDict()

    def get(self, run: Run, step: int) -> torch.nn.Module:
        key = (str(run.path), step)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key][0]
        model = run.load_model(step, self.device)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self._models[key] = (model, size)
        while len(self._models) > 1 and sum(s for _, s in self._models.values()) > self.max_bytes:
            self._models.popitem(last=False)
        return model


class RenderService:
    def __init__(
        self,
        *,
        device: str | None = None,
        cache_dir: str | None = None,
        allow_pickle: bool = False,
        max_queued: int = 256,
        stale_after: float = 30.0,
        model_bytes: int = 2 << 30,
    ):
        self.devices = service_devices(device)
        self.cache_dir = cache_dir
        self.allow_pickle = allow_pickle
        self.max_queued = max_queued
        self.stale_after = stale_after
        self._queued: dict[Group, _Job] = {}
        self._running: dict[Group, _Job] = {}
        self._failed: dict[tuple[Group, int], tuple[str, float]] = {}  # error, when
        self._runs: dict[str, Run] = {}
        self._caches: dict[str, RenderCache] = {}
        self._counter = itertools.count()
        self._lock = threading.Condition()
        self.stats = {"renders": 0, "units_rendered": 0, "failed": 0, "dropped": 0}
        self.recent: deque[tuple[Group, list[int], float]] = deque(maxlen=64)  # finished jobs
        self._workers = [
            threading.Thread(
                target=self._work,
                args=(_Models(d, model_bytes),),
                daemon=True,
                name=f"tb_microscope-render-{d}",
            )
            for d in self.devices
        ]
        for worker in self._workers:
            worker.start()

    # --- for the plugin ----------------------------------------------------------------------
    def run(self, path: str) -> Run:
        with self._lock:
            if path not in self._runs:
                self._runs[path] = Run(path, allow_pickle=self.allow_pickle)
            return self._runs[path]

    def cache(self, run: Run) -> RenderCache:
        """The run's render cache, found (and its folder checked writable) once per run."""
        with self._lock:
            if str(run.path) not in self._caches:
                self._caches[str(run.path)] = RenderCache(run, self.cache_dir)
            return self._caches[str(run.path)]

    def request(self, group: Group, units: list[int]) -> dict[int, dict]:
        """Ask for units' images; returns each one's status (`done` once it is in the cache)."""
        cache = self.cache(self.run(group.run))
        statuses, wanted = {}, []
        for unit in units:
            if all(key in cache for key in group.keys(unit)):
                statuses[unit] = {"status": DONE}
            else:
                wanted.append(unit)
        if not wanted:
            return statuses
        now = time.monotonic()
        with self._lock:
            running = self._running.get(group)
            job = self._queued.get(group)
            for unit in wanted:
                failure = self._failed.get((group, unit))
                if failure is not None and now - failure[1] < self.stale_after:
                    statuses[unit] = {"status": FAILED, "error": failure[0]}
                    continue  # asking again after stale_after seconds retries the render
                if running is not None and unit in running.asked:
                    statuses[unit] = self._status(running)
                    continue
                if job is None:
                    if len(self._queued) >= self.max_queued:
                        raise QueueFullError(
                            f"the render queue is full ({self.max_queued} groups waiting); "
                            "try again shortly"
                        )
                    job = self._queued[group] = _Job(group, order=next(self._counter))
                job.asked[unit] = now
            if job is not None:
                self._lock.notify_all()
                for unit in wanted:
                    statuses.setdefault(unit, self._status(job))
        return statuses

    def _status(self, job: _Job) -> dict:
        if self._running.get(job.group) is job:
            return {
                "status": RUNNING,
                "position": 0,
                "progress": round(job.progress, 3),
                "units": len(job.asked),
                "elapsed_s": round(time.monotonic() - (job.started or 0), 1),
            }
        ahead = sorted(self._queued.values(), key=lambda j: (-j.last_asked, j.order))
        return {
            "status": QUEUED,
            "position": ahead.index(job) + len(self._running),
            "progress": 0.0,
            "units": len(job.asked),
        }

    def snapshot(self) -> dict:
        """What the service is doing, for the `status` route."""
        with self._lock:
            return {
                **self.stats,
                "queued": len(self._queued),
                "running": len(self._running),
                "devices": [str(d) for d in self.devices],
            }

    # --- workers -----------------------------------------------------------------------------
    def _next(self) -> _Job:
        with self._lock:
            while True:
                now = time.monotonic()
                for group, job in list(self._queued.items()):
                    stale = [u for u, t in job.asked.items() if now - t > self.stale_after]
                    for unit in stale:
                        del job.asked[unit]
                    self.stats["dropped"] += len(stale)
                    if not job.asked:
                        del self._queued[group]
                if self._queued:
                    break
                self._lock.wait(timeout=self.stale_after)
            job = max(self._queued.values(), key=lambda j: (j.last_asked, -j.order))
            del self._queued[job.group]
            self._running[job.group] = job
            job.started = time.monotonic()
            return job

    def _work(self, models: _Models) -> None:
        while True:
            job = self._next()
            group, units = job.group, sorted(job.asked)
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
                    device=models.device,
                    model=models.get(run, group.step),
                    progress=lambda fraction, job=job: setattr(job, "progress", fraction),
                )
                with self._lock:
                    self.stats["renders"] += 1
                    self.stats["units_rendered"] += len(units)
                    self.recent.append((group, units, time.monotonic() - job.started))
            except Exception as e:  # reported to the pollers; the worker goes on
                message = f"{type(e).__name__}: {e}"
                with self._lock:
                    self.stats["failed"] += 1
                    for unit in units:
                        self._failed[(group, unit)] = (message, time.monotonic())
            with self._lock:
                del self._running[group]
