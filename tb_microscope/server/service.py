"""The render service behind the plugin: a bounded queue of work and one worker per device.

Two kinds of work, both keyed by the run's id and the versions of the snapshots they read, never
by the run's path:
- a `RenderWork`: units of one (run, step, node, technique, size, iterations, seed); a request
  for more units of queued work joins it, identical requests share it;
- an `Analysis`: one computed view of one unit (its dataset examples, weights, history, or a
  probe image's attribution to it), of a node at a step (its activation atlas, whose picture
  is stored beside the result), of a node over training (its dynamics; every node's, without a
  node) or of a node's units matched with another run's (align).

The work asked about most recently goes first. Whatever nobody has asked about for
`abandon_after` seconds (the tab polls every half second while it shows a unit) is dropped
before it starts, and cancelled within about a second once it runs; the `cancel` call does the
same at once. A RenderWork's units are planned by the sweep planner (`rendering/sweep.py`: the
units the cache lacks, one optimization per group) and rendered by the worker's executor
(`rendering/execution.py`): in this process, or, with a Ray cluster, on an actor of its own.
Results go to the run's cache (images as PNGs, analyses as JSON), where the plugin serves them
from. A failure is kept for the pollers (in a bounded table, for `retry_after`
seconds) and the worker carries on. Every table is bounded: the queue (a full one raises
`QueueFullError`), loaded models and programs (in bytes), runs, caches and failures.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis.atlas import activation_atlas
from ..analysis.attribution import attribution_and_notes, heat_map
from ..analysis.dynamics import align_units, model_dynamics, node_dynamics
from ..analysis.examples import dataset_examples
from ..analysis.history import unit_history
from ..analysis.weights import unit_weights
from ..errors import MicroscopeError
from ..execution import planner
from ..execution.cache import DiskBudget, RenderCache, RenderKey, ResultKey, encode_picture
from ..execution.executors import Executor, InProcessExecutor
from ..lru import LRU
from ..optvis.engine import RenderCancelled, available_devices
from ..optvis.probe import probe_images
from ..run import Run
from ..store.local import RunStore

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
log = logging.getLogger(__name__)


def _describe(work: Work) -> str:
    """`render of conv2 units at step 30 of run 'x'`: a piece of work, for a log line."""
    what = "render" if isinstance(work, RenderWork) else work.kind
    node = f" of {work.node}" if work.node else ""
    steps = ", ".join(str(step) for step, _ in work.snapshots)
    return f"{what}{node} at step {steps} of run '{work.run}'"


class QueueFullError(MicroscopeError):
    """More work is waiting than the service takes."""


class RunChangedError(MicroscopeError):
    """The run or snapshot a piece of work was asked for was replaced before it ran."""


@dataclass(frozen=True)
class RenderWork:
    """Units that can share one optimization."""

    run: str  # the run's directory
    run_id: str
    step: int
    version: str  # the snapshot's (Run.snapshot_version)
    node: str
    technique: str
    size: int
    iterations: int
    seed: int
    bands: tuple[int, ...] | None = None  # channels shown as RGB, for more than three
    preview: bool = False  # a first look (small, few iterations): goes before full renders

    @property
    def settings(self) -> planner.Settings:
        return planner.Settings(self.technique, self.size, self.iterations, self.seed, self.bands)

    def key(self, unit: int, image: int = 0) -> RenderKey:
        return self.keys(unit)[image]

    def keys(self, unit: int) -> list[RenderKey]:
        """The keys of all the unit's images (diversity draws several)."""
        return self.settings.keys(self.step, self.version, self.node, unit)

    @property
    def snapshots(self) -> tuple[tuple[int, str], ...]:
        return ((self.step, self.version),)


@dataclass(frozen=True)
class Analysis:
    """One computed view: `kind` is examples, weights, history or attribution (of one unit),
    atlas (of a node at a step; unit 0), dynamics (of a node, or of every node when `node` is
    empty) or align (a node's units; unit 0). An atlas's preview (`preview`) goes first."""

    run: str
    run_id: str
    kind: str
    node: str
    unit: int
    options: tuple[tuple[str, object], ...]  # e.g. (("count", 8), ("step", 10))
    snapshots: tuple[tuple[int, str], ...]  # the (step, version) of every snapshot it reads

    @property
    def result_key(self) -> ResultKey:
        return ResultKey(self.kind, self.node, self.unit, self.options, self.snapshots)

    def option(self, name: str):
        return dict(self.options).get(name)

    @property
    def preview(self) -> bool:
        """A first look (an atlas's preview), which goes before full work."""
        return bool(self.option("preview"))


Work = RenderWork | Analysis
PICTURED = {"atlas"}  # the analyses whose result has a picture beside it


@dataclass
class _Job:
    work: Work
    asked: dict[int, float] = field(default_factory=dict)  # unit -> when last asked about
    order: int = 0
    touched: float = 0.0  # when any of its units was last asked about
    started: float | None = None
    units: list[int] = field(default_factory=list)  # what it renders, fixed when it starts
    progress: float = 0.0  # fraction of the work done, while running
    cancelled: threading.Event = field(default_factory=threading.Event)

    def ask(self, unit: int, now: float) -> None:
        self.asked[unit] = now
        self.touched = max(self.touched, now)


def _priority(job: _Job) -> tuple:
    """Which queued job a free worker takes: previews first (the first look at what is on
    screen), then what was asked about most recently, then the oldest."""
    return (job.work.preview, job.touched, -job.order)


def service_devices(device: str | None) -> list[torch.device]:
    """The devices to run workers on: the one named, else every CUDA device, else the CPU."""
    return [torch.device(device)] if device else available_devices()


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class _Models:
    """A device's loaded models, in the memory cache shared with the runs' programs."""

    def __init__(self, device: torch.device, memory: LRU):
        self.device, self.memory = device, memory

    def get(self, run: Run, step: int) -> torch.nn.Module:
        key = ("model", run.id, step, run.snapshot_version(step), str(self.device))

        def load():
            model = run.load_model(step, self.device)
            return model, state_bytes(model)

        return self.memory.get_or_make(key, load)


class _ServiceRenderer(planner.Renderer):
    """Renders a worker's groups in this process, with the run the service opened for the job
    (`use`) and the models in the service's memory (shared with the runs' programs)."""

    def __init__(self, models: _Models):
        super().__init__(models.device)
        self.memory = models
        self._run: Run | None = None

    def use(self, run: Run) -> None:
        self._run = run

    def run(self, group: planner.Group) -> Run:
        if self._run is None or self._run.id != group.run_id:
            raise RunChangedError(f"run {group.source} was logged again while this waited")
        return self._run

    def model(self, run: Run, group: planner.Group) -> torch.nn.Module:
        return self.memory.get(run, group.step)


def _png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_picture(image)).decode()


def _examples(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    step = work.option("step")
    found = dataset_examples(
        run,
        step,
        work.node,
        [work.unit],
        count=work.option("count"),
        device=models.device,
        model=models.get(run, step),
    )[work.unit]
    return {
        "unit": work.unit,
        "examples": [
            {
                "index": e.index,
                "activation": e.activation,
                "position": e.position,
                "box": e.box,
                "image": _png_data_url(e.image),
                "crop": _png_data_url(e.crop),
            }
            for e in found
        ],
    }


def _weights(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    step = work.option("step")
    source, connections, _ = unit_weights(
        run,
        step,
        work.node,
        work.unit,
        source=work.option("source"),
        top=work.option("top"),
        device=models.device,
        model=models.get(run, step),
    )
    return {
        "unit": work.unit,
        "source": source,
        "connections": [
            {"node": c.node, "unit": c.unit, "strength": c.strength} for c in connections
        ],
    }


ATTRIBUTION_DIGITS = 4  # significant digits of the values an attribution result holds


def _significant(values: np.ndarray, digits: int = ATTRIBUTION_DIGITS) -> list[list[float]]:
    """Rows of floats rounded to `digits` significant digits: a result a quarter the size."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in values.tolist()]


def _attribution(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    """A probe image's attribution to the unit at a step: the signed values per pixel (rounded),
    their range and sum, the heat map to overlay on the image (a PNG data URL), and what the
    tab should say of it (`notes`: guided backprop with no ReLU module to guide)."""
    step, image, method = work.option("step"), work.option("image"), work.option("method")
    values, notes = attribution_and_notes(
        run,
        step,
        work.node,
        work.unit,
        image,
        method=method,
        device=models.device,
        model=models.get(run, step),
        should_stop=should_stop,
    )
    height, width = values.shape
    return {
        "unit": work.unit,
        "step": step,
        "image": image,
        "method": method,
        "height": height,
        "width": width,
        "values": _significant(values),
        "min": float(values.min()),
        "max": float(values.max()),
        "sum": float(values.sum(dtype=np.float64)),
        "overlay": _png_data_url(heat_map(values)),
        "notes": notes,
    }


def _atlas(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    """The node's activation atlas at the work's step (laid out at its `layout_step`): what
    `Atlas.to_dict` holds, and the picture (empty cells transparent) stored beside it."""
    found = activation_atlas(
        run,
        work.option("step"),
        work.node,
        grid=work.option("grid"),
        size=work.option("size"),
        iterations=work.option("iterations"),
        preview=work.preview,
        layout_step=work.option("layout_step"),
        device=models.device,
        cache_dir=service.cache(run),
        load_model=lambda step: models.get(run, step),
        progress=progress,
        should_stop=should_stop,
    )
    service.cache(run).put_picture(work.result_key, found.rgba())
    return found.to_dict()


def _history(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    steps = [step for step, _ in work.snapshots]
    history = unit_history(
        run, work.node, work.unit, steps=steps, device=models.device, should_stop=should_stop
    )
    return {"unit": work.unit, "history": history}


def _dynamics(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    """A node's dynamics (`work.node`), or every node's CKA (no node), over the work's steps."""
    options = dict(
        steps=[step for step, _ in work.snapshots],
        device=models.device,
        cache_dir=service.cache(run),
        should_stop=should_stop,
    )
    if work.node:
        return node_dynamics(run, work.node, **options).to_dict()
    return model_dynamics(run, **options).to_dict()


def _align(service, run: Run, work: Analysis, models: _Models, should_stop, progress) -> dict:
    """The node's units at the work's step matched with those of the other run at its step."""
    other = service.run(work.option("other"))
    if other.id != work.option("other_id") or other.snapshot_version(
        work.option("other_step")
    ) != work.option("other_version"):
        raise RunChangedError(f"run '{other.name}' was logged again while this waited; ask again")
    ((step, _),) = work.snapshots
    found = align_units(
        run,
        step,
        other,
        work.option("other_step"),
        work.node,
        device=models.device,
        should_stop=should_stop,
    )
    return found.to_dict()


Analyze = Callable[
    ["RenderService", Run, Analysis, _Models, Callable[[], bool], Callable[[float], None]], dict
]
ANALYSES: dict[str, Analyze] = {
    "examples": _examples,
    "weights": _weights,
    "history": _history,
    "attribution": _attribution,
    "atlas": _atlas,
    "dynamics": _dynamics,
    "align": _align,
}


class RenderService:
    def __init__(
        self,
        *,
        device: str | None = None,
        cache_dir: str | None = None,
        allow_pickle: bool = False,
        max_queued: int = 256,
        abandon_after: float = 5.0,
        retry_after: float = 30.0,
        model_bytes: int = 2 << 30,
        cache_bytes: int | None = None,
        ray_address: str | None = None,
    ):
        self.devices = service_devices(device)
        # With a Ray cluster, each worker sends its renders to an actor of its own (analyses
        # stay here, on this process's device).
        self.pool = None
        if ray_address:
            from ..execution.ray_executor import ActorPool, RayExecutor

            self.pool = ActorPool(ray_address, allow_pickle)
        self.cache_dir = cache_dir
        self.allow_pickle = allow_pickle
        self.max_queued = max_queued
        self.abandon_after = abandon_after
        self.retry_after = retry_after
        self.memory: LRU = LRU(max_bytes=model_bytes)  # loaded models and programs
        self.budget = DiskBudget(cache_bytes) if cache_bytes is not None else None
        self._queued: dict[Work, _Job] = {}
        self._running: dict[Work, _Job] = {}
        self._failed: LRU[tuple[str, float]] = LRU(max_items=4096)  # (work, unit) -> error, when
        self._runs: LRU[Run] = LRU(max_items=256)
        self._caches: LRU[RenderCache] = LRU(max_items=256)
        self._prefetched: LRU[bool] = LRU(max_items=256)
        self._counter = itertools.count()
        self._finished = 0  # jobs that have left the running table, to spot one ending mid-request
        self._lock = threading.Condition()
        self.stats = {
            "renders": 0,
            "units_rendered": 0,
            "analyses": 0,
            "failed": 0,
            "dropped": 0,
            "cancelled": 0,
        }
        self.recent: deque[tuple[Work, list[int], float]] = deque(maxlen=64)  # finished work
        # One executor per worker: its renders here, or on an actor of its own of the cluster.
        slots = []
        for device in [self.devices[0]] * self.pool.size if self.pool else self.devices:
            models = _Models(device, self.memory)
            renderer = _ServiceRenderer(models)
            executor = (
                RayExecutor(pool=self.pool, workers=1)
                if self.pool is not None
                else InProcessExecutor(renderers=[renderer])
            )
            slots.append((models, renderer, executor))
        self._workers = [
            threading.Thread(
                target=self._work,
                args=slot,
                daemon=True,
                name=f"tb_microscope-render-{i}-{slot[0].device}",
            )
            for i, slot in enumerate(slots)
        ]
        for worker in self._workers:
            worker.start()

    # --- for the plugin ----------------------------------------------------------------------
    def run(self, path: str, store: RunStore | None = None) -> Run:
        """The run in `path` (read through `store`, if given), opened again when its manifest
        was replaced."""
        run = self._runs.get(path)
        if run is None or not run.is_current():
            run = self._runs.put(
                path, Run(path, allow_pickle=self.allow_pickle, memory=self.memory, store=store)
            )
        return run

    def cache(self, run: Run) -> RenderCache:
        """The run's render cache, found (and its folder checked writable) once per run."""
        return self._caches.get_or_make(
            run.id, lambda: (RenderCache(run, self.cache_dir, self.budget), 0)
        )

    def probe_images(self, run: Run) -> torch.Tensor:
        """The run's probe images (uint8 N x C x H x W), kept with the loaded models: the tab
        shows them one at a time, a few for each atlas cell the pointer crosses."""

        def load():
            images = probe_images(run)
            return images, images.numel() * images.element_size()

        return self.memory.get_or_make(("probe", run.id, run.signature), load)

    def prefetch(self, run: Run) -> None:
        """Load the run's architecture for this process's workers in the background, once per
        run (a Ray cluster's actors load their own): the tab asks for a run's nodes before it
        opens one, so the first render finds it loaded, or waits for the load under way rather
        than starting another."""
        if self.pool is not None:
            return
        with self._lock:
            if (run.id, run.signature) in self._prefetched:
                return
            self._prefetched.put((run.id, run.signature), True)

        def load() -> None:
            for device in self.devices:
                try:
                    run.prepare(device)
                except Exception:  # the render that needs it says why to the tab
                    log.warning(
                        "loading run '%s' ahead of its renders failed", run.name, exc_info=True
                    )
                    return

        threading.Thread(target=load, daemon=True, name="tb_microscope-prefetch").start()

    def missing(self, work: Work, units: list[int]) -> list[int]:
        """The units whose images (or result) are not in the cache yet. The run and its cache
        are looked up once for all of them: the tab asks for a grid's units twice a second."""
        cache = self.cache(self.run(work.run))
        if isinstance(work, RenderWork):
            return [u for u in units if not all(key in cache for key in work.keys(u))]
        key = work.result_key
        done = cache.result_path(key).is_file()
        if done and work.kind in PICTURED:  # its picture may have been evicted on its own
            done = cache.picture_path(key).is_file()
        return [] if done else list(units)

    def request(self, work: Work, units: list[int]) -> dict[int, dict]:
        """Ask for units' images (a RenderWork) or a unit's result (an Analysis, its one unit).
        Returns each unit's status; `done` once it is in the cache."""
        finished = self._finished
        wanted = self.missing(work, units)
        absent = set(wanted)
        statuses = {unit: {"status": DONE} for unit in units if unit not in absent}
        if not wanted:
            return statuses
        now = time.monotonic()
        with self._lock:
            if self._finished != finished:  # a job ended since the cache was looked at
                still = self.missing(work, wanted)
                statuses.update({u: {"status": DONE} for u in wanted if u not in still})
                wanted = still
                if not wanted:
                    return statuses
            running = self._running.get(work)
            job = self._queued.get(work)
            for unit in wanted:
                failure = self._failed.get((work, unit))
                if failure is not None and now - failure[1] < self.retry_after:
                    statuses[unit] = {"status": FAILED, "error": failure[0]}
                    continue  # asking again after retry_after seconds tries again
                if running is not None and unit in running.asked:
                    running.ask(unit, now)
                    statuses[unit] = self._status(running)
                    continue
                if job is None:
                    if len(self._queued) >= self.max_queued:
                        raise QueueFullError(
                            f"the render queue is full ({self.max_queued} waiting); "
                            "try again shortly"
                        )
                    job = self._queued[work] = _Job(work, order=next(self._counter))
                job.ask(unit, now)
            if job is not None:
                self._lock.notify_all()
                for unit in wanted:
                    statuses.setdefault(unit, self._status(job))
        return statuses

    def cancel(self, work: Work, units: list[int]) -> int:
        """Forget `units` of `work`: dropped from the queue, and a running render that nobody
        else waits for is stopped. Returns how many units were forgotten."""
        forgotten = 0
        with self._lock:
            for table in (self._queued, self._running):
                job = table.get(work)
                if job is None:
                    continue
                for unit in units:
                    forgotten += job.asked.pop(unit, None) is not None
                if not job.asked:
                    if table is self._queued:
                        del self._queued[work]
                    job.cancelled.set()
        return forgotten

    def _status(self, job: _Job) -> dict:
        if self._running.get(job.work) is job:
            return {
                "status": RUNNING,
                "position": 0,
                "progress": round(job.progress, 3),
                "units": len(job.asked),
                "elapsed_s": round(time.monotonic() - (job.started or 0), 1),
            }
        ahead = sorted(self._queued.values(), key=_priority, reverse=True)
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
                "ray": None if self.pool is None else self.pool.describe(),
                "memory_bytes": self.memory.bytes,
                "memory_entries": len(self.memory),
                "cache_bytes": None if self.budget is None else self.budget.total,
            }

    def idle(self) -> bool:
        with self._lock:
            return not self._queued and not self._running

    # --- workers -----------------------------------------------------------------------------
    def _next(self) -> _Job:
        with self._lock:
            while True:
                now = time.monotonic()
                for work, job in list(self._queued.items()):
                    stale = [u for u, t in job.asked.items() if now - t > self.abandon_after]
                    for unit in stale:
                        del job.asked[unit]
                    self.stats["dropped"] += len(stale)
                    if not job.asked:
                        del self._queued[work]
                if self._queued:
                    break
                self._lock.wait(timeout=self.abandon_after)
            job = max(self._queued.values(), key=_priority)
            del self._queued[job.work]
            self._running[job.work] = job
            job.started = time.monotonic()
            job.units = sorted(job.asked)
            return job

    def _abandoned(self, job: _Job) -> bool:
        return job.cancelled.is_set() or time.monotonic() - job.touched > self.abandon_after

    def _work(self, models: _Models, renderer: _ServiceRenderer, executor: Executor) -> None:
        while True:
            job = self._next()
            work, units = job.work, job.units
            outcome, message = "skipped", None
            try:
                run = self.run(work.run)
                current = [(step, run.snapshot_version(step)) for step, _ in work.snapshots]
                if run.id != work.run_id or tuple(current) != work.snapshots:
                    raise RunChangedError(
                        f"run '{run.name}' was logged again while this waited; ask again"
                    )
                # Nothing to do when the cache got them meanwhile (from another process sharing
                # it, say); only real work is counted.
                if self.missing(work, units):
                    renderer.use(run)
                    self._execute(run, job, models, executor)
                    outcome = "renders" if isinstance(work, RenderWork) else "analyses"
            except RenderCancelled:
                outcome = "cancelled"
            except Exception as e:  # reported to the pollers; the worker goes on
                outcome, message = "failed", f"{type(e).__name__}: {e}"
                if isinstance(e, MicroscopeError):  # said to the user, who can act on it
                    log.warning("%s failed: %s", _describe(work), message)
                else:  # a bug, or a fault of the machine: keep its traceback for whoever looks
                    log.exception("%s failed", _describe(work))
            with self._lock:  # the outcome is counted as the job leaves the running table
                if outcome != "skipped":
                    self.stats[outcome] += 1
                if outcome == "renders":
                    self.stats["units_rendered"] += len(units)
                if outcome in ("renders", "analyses"):
                    self.recent.append((work, units, time.monotonic() - job.started))
                if outcome == "failed":
                    for unit in units:
                        self._failed.put((work, unit), (message, time.monotonic()))
                del self._running[work]
                self._finished += 1

    def _execute(self, run: Run, job: _Job, models: _Models, executor: Executor) -> None:
        work = job.work
        cache = self.cache(run)

        def should_stop() -> bool:
            return self._abandoned(job)

        def progress(fraction: float) -> None:
            job.progress = fraction

        if isinstance(work, RenderWork):
            self._render(run, cache, job, executor, should_stop)
        else:
            result = ANALYSES[work.kind](self, run, work, models, should_stop, progress)
            cache.put_result(work.result_key, result)

    def _render(
        self, run: Run, cache: RenderCache, job: _Job, executor: Executor, should_stop
    ) -> None:
        """The job's units through the sweep planner (the groups the cache lacks, one
        optimization each), rendered by this worker's executor (here, or on its Ray actor); each
        group is stored as soon as it is back."""
        work, settings = job.work, job.work.settings
        per_group = planner.group_size(work.technique, executor.device_kind, None)
        groups, _ = planner.plan(
            [(run, work.step, work.node, job.units)], settings, None, per_group, self.cache
        )
        done: list[planner.Group] = []

        def stored(group: planner.Group, rendered: planner.Rendered, worker: str) -> None:
            planner.store(cache, group, settings, rendered)
            done.append(group)
            job.progress = len(done) / len(groups)

        def progress(group: planner.Group, fraction: float) -> None:
            job.progress = (len(done) + fraction) / len(groups)

        executor.execute(groups, settings, stored, should_stop, progress)
        if len(done) < len(groups):  # stopped before the end: nobody waits for the rest
            raise RenderCancelled()
