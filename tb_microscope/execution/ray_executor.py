"""`RayExecutor`: groups rendered by actors on a Ray cluster (extra `tb-microscope[ray]`).

One actor per GPU of the cluster, else one per CPU (each with one torch thread); each keeps the
runs it opened and its last models, so the planner's order (consecutive groups share a model)
saves loads, and an executor keeps its actors from one `execute` to the next until `close`.
Actors open runs by their source (a directory the cluster's machines share, or runs:/<id> of an
MLflow server they reach) and send the pictures back to the caller, which alone writes the
cache. An actor that dies (killed, out of memory, its machine lost) is replaced and its group
given to the next free actor, so every unit is rendered and stored once; a group whose actors
die `MAX_ATTEMPTS` times fails with the error. This is the one road for every caller: the CLI's
sweeps and the plugin's render service, whose workers each hold an executor of one actor from a
shared `ActorPool`.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

from ..errors import MicroscopeError, RunNotFoundError, StepNotFoundError
from .executors import OnProgress, OnResult
from .planner import Group, Renderer, Settings

MAX_ATTEMPTS = 3
CANCEL_GRACE_S = 2.0  # how long a cancelled render may take to stop before its actor is killed


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise MicroscopeError("--ray needs Ray: pip install 'tb-microscope[ray]'") from e
    return ray


def _actor_class(ray):
    class RenderActor:
        def __init__(self, device: str, allow_pickle: bool, threads: int):
            import torch

            torch.set_num_threads(threads)
            self.renderer = Renderer(torch.device(device), allow_pickle)

        def pid(self) -> int:
            return os.getpid()

        def render(self, group: Group, settings: Settings):
            # encoded here: the driver only writes the files
            return self.renderer.render(group, settings).encoded(group, settings)

    return ray.remote(RenderActor)


def task_failure(error: BaseException, group: Group, who: str) -> MicroscopeError:
    """What an actor's failed render says: the error it raised, without Ray's traceback, and, for
    a run or file it did not find, that every machine of the cluster must reach the runs."""
    cause = getattr(error, "cause", None)
    cause = cause if isinstance(cause, BaseException) else error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    message = (
        f"{who} could not render {group.node} units {group.units[0]}-{group.units[-1]} at step "
        f"{group.step} of {group.source}: {type(cause).__name__}: {text}"
    )
    if isinstance(cause, (FileNotFoundError, RunNotFoundError, StepNotFoundError)):
        message += (
            " (the cluster's machines open runs themselves: the log directory must be on storage "
            "they all see, or the runs in MLflow)"
        )
    return MicroscopeError(message)


def connect(address: str):
    """ray, initialised: a new local cluster for "local", else the one at `address` ("auto":
    RAY_ADDRESS)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    options = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), **options)
        else:
            ray.init(address=address, **options)
    except Exception as e:
        where = "RAY_ADDRESS" if address == "auto" else address
        raise MicroscopeError(
            f"could not join the Ray cluster at {where} ({type(e).__name__}: {e}); start one "
            "with `ray start --head`, or use --ray local. A cluster that checks tokens (one "
            "started by `ray start` checks them since Ray 2.59) needs RAY_AUTH_MODE=token "
            "here, and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
        ) from e
    return ray


def actor_plan(ray, workers: int | None, threads: int) -> tuple[int, dict, str]:
    """How many actors, their resource options, and their device: one per GPU of the cluster,
    else one per `threads` CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        return workers or gpus, dict(num_gpus=1, num_cpus=min(threads, cpus)), "cuda"
    return workers or max(1, cpus // threads), dict(num_cpus=threads), "cpu"


class RayExecutor:
    """Renders groups on the Ray cluster at `address`: "local" starts one on this machine for
    the executor's life, "auto" joins the one in RAY_ADDRESS, anything else is its address; or,
    given a `pool`, on that pool's cluster with `workers` actors of its own."""

    def __init__(
        self,
        address: str | None = None,
        *,
        allow_pickle: bool = False,
        workers: int | None = None,
        threads: int = 1,
        pool: ActorPool | None = None,
        say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ):
        self._own = pool is None and address == "local"
        self.pool = pool or ActorPool(address, allow_pickle, threads, workers)
        self._ray, self.say = self.pool._ray, say
        self.workers = workers or self.pool.size
        self.actors: dict[int, object] = {}
        self.replaced = 0

    @property
    def device_kind(self) -> str:
        return self.pool.device_kind

    def describe(self) -> str:
        return self.pool.describe()

    def _spawn(self, slot: int):
        self.actors[slot] = actor = self.pool.spawn()
        return actor

    def _kill(self, slot: int) -> None:
        actor = self.actors.pop(slot, None)
        if actor is not None:
            self._ray.kill(actor)

    def execute(
        self,
        groups: Sequence[Group],
        settings: Settings,
        on_result: OnResult,
        should_stop: Callable[[], bool],
        progress: OnProgress | None = None,  # an actor's progress is not heard; a group's end is
    ) -> None:
        ray = self._ray
        from ray.exceptions import (
            GetTimeoutError,
            RayActorError,
            RayTaskError,
            TaskCancelledError,
        )

        pending: deque[Group] = deque(groups)
        for slot in range(min(self.workers, len(groups))):
            if slot not in self.actors:
                self._spawn(slot)
        idle: deque[int] = deque(sorted(self.actors))
        running: dict = {}  # object ref -> (slot, group)
        attempts: Counter = Counter()
        try:
            while (pending or running) and not should_stop():
                while idle and pending:
                    slot, group = idle.popleft(), pending.popleft()
                    running[self.actors[slot].render.remote(group, settings)] = (slot, group)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in ready:
                    slot, group = running.pop(ref)
                    try:
                        rendered = ray.get(ref)
                    except RayTaskError as e:  # the render itself failed: it would again
                        idle.append(slot)
                        raise task_failure(e, group, f"Ray actor {slot + 1}") from None
                    except RayActorError as e:
                        attempts[group] += 1
                        if attempts[group] >= MAX_ATTEMPTS:
                            self.actors.pop(slot, None)
                            raise MicroscopeError(
                                f"{MAX_ATTEMPTS} Ray actors died rendering {group.node} units "
                                f"{group.units[0]}-{group.units[-1]} at step {group.step} of "
                                f"{group.source}: {e}"
                            ) from e
                        self.replaced += 1
                        self.say(
                            f"tb-microscope: Ray actor {slot + 1} died ({type(e).__name__}); "
                            "a new one takes its place and its group is rendered again"
                        )
                        pending.appendleft(group)
                        self._spawn(slot)
                        idle.append(slot)
                        continue
                    if progress is not None:
                        progress(group, 1.0)
                    on_result(group, rendered, f"ray actor {slot + 1}")
                    idle.append(slot)
        finally:  # stopped or failed: what still runs is cancelled, its actor killed if it lingers
            if running:
                for ref in running:
                    ray.cancel(ref)
                deadline = time.monotonic() + CANCEL_GRACE_S
                for ref, (slot, _) in running.items():
                    try:
                        ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                    except (TaskCancelledError, RayTaskError, RayActorError):
                        pass  # stopped, as asked (or already gone)
                    except GetTimeoutError:
                        self._kill(slot)

    def close(self) -> None:
        """Kill this executor's actors; shut down the cluster it started ("local")."""
        for slot in list(self.actors):
            self._kill(slot)
        if self._own and self._ray.is_initialized():
            self._ray.shutdown()


class ActorPool:
    """How actors are made on a cluster: `size` of them (one per GPU, else per `threads` CPUs),
    each spawned by an executor; the plugin's render service shares one pool among the
    executors of its workers."""

    def __init__(
        self,
        address: str,
        allow_pickle: bool = False,
        threads: int = 1,
        workers: int | None = None,
    ):
        self._ray = connect(address)
        self.size, self._options, self.device_kind = actor_plan(self._ray, workers, threads)
        self._actor = _actor_class(self._ray)
        self._args = (self.device_kind, allow_pickle, threads)

    def describe(self) -> str:
        return f"Ray: {self.size} actors ({self.device_kind})"

    def spawn(self):
        return self._actor.options(**self._options).remote(*self._args)
