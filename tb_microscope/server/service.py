"""The render service behind the plugin: a bounded queue of work and one worker per device.

It schedules the two kinds of work of `work.py`, both keyed by the run's id and the versions of
the snapshots they read, never by the run's path:
- a `RenderWork`: units of one (run, step, node, technique, size, iterations, seed); a request
  for more units of queued work joins it, identical requests share it;
- an `Analysis`: one computed view of one unit (its dataset examples, weights, history, or a
  probe image's attribution to it), of a node at a step (its activation atlas, whose picture
  is stored beside the result), of a node over training (its dynamics; every node's, without a
  node) or of a node's units matched with another run's (align); `analyses.py` computes each.

The work asked about most recently goes first. Whatever nobody has asked about for
`abandon_after` seconds (the tab polls every half second while it shows a unit) is dropped
before it starts, and cancelled within about a second once it runs; the `cancel` call does the
same at once. A RenderWork's units are planned by the sweep planner (`execution/planner.py`: the
units the cache lacks, one optimization per group) and rendered by the worker's executor
(`execution/executors.py`): in this process, or, with a Ray cluster, on an actor of its own.
Results go to the run's cache (images as PNGs, analyses as JSON), where the plugin serves them
from. A failure is kept for the pollers (in a bounded table, for `retry_after`
seconds) and the worker carries on. Every table is bounded: the queue (a full one raises
`QueueFullError`), loaded models and programs (in bytes), runs, caches and failures.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import MicroscopeError
from ..execution import planner
from ..execution.cache import DiskBudget, RenderCache
from ..execution.executors import Executor, InProcessExecutor
from ..lru import LRU
from ..optvis.engine import RenderCancelled, available_devices
from ..optvis.probe import probe_images
from ..run import Run
from ..store.local import RunStore
from .analyses import ADAPTERS, PICTURED
from .models import DeviceModels
from .work import RenderWork, RunChangedError, Work

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


@dataclass
class Job:
    """A piece of work waiting or running, and who still wants which of its units."""

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


def job_priority(job: Job) -> tuple:
    """Which queued job a free worker takes: previews first (the first look at what is on
    screen), then what was asked about most recently, then the oldest."""
    return (job.work.preview, job.touched, -job.order)


def service_devices(device: str | None) -> list[torch.device]:
    """The devices to run workers on: the one named, else every CUDA device, else the CPU."""
    return [torch.device(device)] if device else available_devices()


class _ServiceRenderer(planner.Renderer):
    """Renders a worker's groups in this process, with the run the service opened for the job
    (`use`) and the models in the service's memory (shared with the runs' programs)."""

    def __init__(self, models: DeviceModels):
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
        workers: int | None = None,
    ):
        self.devices = service_devices(device)
        # With a Ray cluster, each worker sends its renders to an actor of its own (analyses
        # stay here, on this process's device).
        # A cluster it cannot join is said (in the log and the status route) and the pictures
        # rendered here: failing would make TensorBoard drop the whole tab without a word.
        self.pool = None
        self.ray_error: str | None = None
        if ray_address:
            from ..execution.ray_executor import ActorPool, RayExecutor

            try:
                self.pool = ActorPool(ray_address, allow_pickle)
            except MicroscopeError as e:
                self.ray_error = f"{e}. Rendering in the TensorBoard process instead."
                log.error("tb_microscope: %s", self.ray_error)
        self.cache_dir = cache_dir
        self.allow_pickle = allow_pickle
        self.max_queued = max_queued
        self.abandon_after = abandon_after
        self.retry_after = retry_after
        self.memory: LRU = LRU(max_bytes=model_bytes)  # loaded models and programs
        self.budget = DiskBudget(cache_bytes) if cache_bytes is not None else None
        self._queued: dict[Work, Job] = {}
        self._running: dict[Work, Job] = {}
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
        # Each worker loads its own instance of a model: hooks and swapped submodules are per
        # call, so one module is never used by two threads at once.
        if self.pool is not None:
            devices = [self.devices[0]] * self.pool.size
        elif workers:
            devices = [self.devices[i % len(self.devices)] for i in range(workers)]
        else:
            devices = self.devices
        self._slots = []
        for i, device in enumerate(devices):
            models = DeviceModels(device, self.memory, worker=i)
            renderer = _ServiceRenderer(models)
            executor = (
                RayExecutor(pool=self.pool, workers=1)
                if self.pool is not None
                else InProcessExecutor(renderers=[renderer])
            )
            self._slots.append((models, renderer, executor))
        self._workers: list[threading.Thread | None] = [None] * len(self._slots)
        self.restarted = 0  # workers found dead and replaced
        self._start_workers()

    def _start_workers(self) -> None:
        """Start every worker that is not running: at first, and in place of one that died
        (which the guard in `_work` should make impossible; it is logged)."""
        for i, thread in enumerate(self._workers):
            if thread is not None and thread.is_alive():
                continue
            if thread is not None:
                self.restarted += 1
                log.error("render worker %s had stopped; a new one takes its place", thread.name)
            models = self._slots[i][0]
            thread = threading.Thread(
                target=self._work,
                args=self._slots[i],
                daemon=True,
                name=f"tb_microscope-render-{i}-{models.device}",
            )
            self._workers[i] = thread
            thread.start()

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
        if not all(t is not None and t.is_alive() for t in self._workers):
            with self._lock:
                self._start_workers()
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
                    job = self._queued[work] = Job(work, order=next(self._counter))
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

    def _status(self, job: Job) -> dict:
        if self._running.get(job.work) is job:
            return {
                "status": RUNNING,
                "position": 0,
                "progress": round(job.progress, 3),
                "units": len(job.asked),
                "elapsed_s": round(time.monotonic() - (job.started or 0), 1),
            }
        ahead = sorted(self._queued.values(), key=job_priority, reverse=True)
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
                "workers": sum(t is not None and t.is_alive() for t in self._workers),
                "restarted": self.restarted,
                "ray": None if self.pool is None else self.pool.describe(),
                "ray_error": self.ray_error,
                "memory_bytes": self.memory.bytes,
                "memory_entries": len(self.memory),
                "cache_bytes": None if self.budget is None else self.budget.total,
            }

    def idle(self) -> bool:
        with self._lock:
            return not self._queued and not self._running

    # --- workers -----------------------------------------------------------------------------
    def _next(self) -> Job:
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
                # One job per work key at a time: a job asked for while the same work runs
                # waits behind it (and finds the cache holding most of what it wanted).
                ready = [j for w, j in self._queued.items() if w not in self._running]
                if ready:
                    break
                self._lock.wait(timeout=self.abandon_after)
            job = max(ready, key=job_priority)
            del self._queued[job.work]
            self._running[job.work] = job
            job.started = time.monotonic()
            job.units = sorted(job.asked)
            return job

    def _abandoned(self, job: Job) -> bool:
        return job.cancelled.is_set() or time.monotonic() - job.touched > self.abandon_after

    def _work(self, models: DeviceModels, renderer: _ServiceRenderer, executor: Executor) -> None:
        """A worker: one job at a time, for ever. Nothing a job raises ends it, nor does its
        bookkeeping, which runs inside the same guard; the job leaves the running table
        whatever happened, and a job for the same work waiting behind it may start."""
        while True:
            job = self._next()
            try:
                self._run_job(job, models, renderer, executor)
            except Exception:  # a bug in the bookkeeping: logged, and the worker goes on
                log.exception("the render worker's bookkeeping of %s failed", _describe(job.work))
            finally:
                with self._lock:
                    if self._running.get(job.work) is job:
                        del self._running[job.work]
                    self._finished += 1
                    self._lock.notify_all()

    def _run_job(
        self, job: Job, models: DeviceModels, renderer: _ServiceRenderer, executor: Executor
    ) -> None:
        work, units = job.work, job.units
        outcome, message = "skipped", None
        try:
            run = self.run(work.run)
            current = [(step, run.snapshot_version(step)) for step, _ in work.snapshots]
            if run.id != work.run_id or tuple(current) != work.snapshots:
                raise RunChangedError(
                    f"run '{run.name}' was logged again while this waited; ask again"
                )
            # Nothing to do when the cache got them meanwhile (from the job for the same work
            # before this one, or another process sharing it); only real work is counted.
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

    def _execute(self, run: Run, job: Job, models: DeviceModels, executor: Executor) -> None:
        work = job.work
        cache = self.cache(run)

        def should_stop() -> bool:
            return self._abandoned(job)

        def progress(fraction: float) -> None:
            job.progress = fraction

        if isinstance(work, RenderWork):
            self._render(run, cache, job, executor, should_stop)
        else:
            result = ADAPTERS[work.kind](self, run, work, models, should_stop, progress)
            cache.put_result(work.result_key, result)

    def _render(
        self, run: Run, cache: RenderCache, job: Job, executor: Executor, should_stop
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
