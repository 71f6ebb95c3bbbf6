"""`RayExecutor`: a sweep's groups rendered by actors on a Ray cluster (extra `tb-microscope[ray]`).

One actor per GPU of the cluster, else one per CPU (each with one torch thread); each keeps the
runs it opened and its last models, so the planner's order (consecutive groups share a model)
saves loads. Actors open runs by their source (a directory the cluster's machines share, or
runs:/<id> of an MLflow server they reach) and send the pictures back to the driver, which alone
writes the cache. An actor that dies (killed, out of memory, its machine lost) is replaced and its
group given to the next free actor, so every unit is rendered and stored once; a group whose
actors die `MAX_ATTEMPTS` times stops the sweep with the error.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

from ..errors import MicroscopeError, RunNotFoundError, StepNotFoundError
from .sweep import Group, OnResult, Renderer, Settings

MAX_ATTEMPTS = 3


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
    the executor's life, "auto" joins the one in RAY_ADDRESS, anything else is its address."""

    def __init__(
        self,
        address: str,
        *,
        allow_pickle: bool = False,
        workers: int | None = None,
        threads: int = 1,
        say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ):
        self.pool = ActorPool(address, allow_pickle, threads, workers)
        self._ray, self.say = self.pool._ray, say
        self._own = address == "local"
        self.workers = self.pool.size
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

    def execute(
        self,
        groups: Sequence[Group],
        settings: Settings,
        on_result: OnResult,
        should_stop: Callable[[], bool],
    ) -> None:
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        pending: deque[Group] = deque(groups)
        for slot in range(min(self.workers, len(groups))):
            self._spawn(slot)
        idle: deque[int] = deque(self.actors)
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
                        raise task_failure(e, group, f"Ray actor {slot + 1}") from None
                    except RayActorError as e:
                        attempts[group] += 1
                        if attempts[group] >= MAX_ATTEMPTS:
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
                    on_result(group, rendered, f"ray actor {slot + 1}")
                    idle.append(slot)
        finally:  # stopped, failed or done: the actors go, and their unfinished work with them
            for actor in self.actors.values():
                ray.kill(actor)
            self.actors.clear()

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


class ActorPool:
    """Actors for a long-lived process (the plugin's render service): `size` of them, each used
    by one of the caller's threads through `renderer(slot)`."""

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

    def renderer(self) -> RemoteRenderer:
        return RemoteRenderer(self)


class RemoteRenderer:
    """Renders one group at a time on an actor of its own (made when first needed, replaced when
    it dies; killed when a render is cancelled and does not stop within a second or two)."""

    def __init__(self, pool: ActorPool):
        self.pool, self._actor = pool, None
        self.device_kind = pool.device_kind

    def render(
        self,
        group: Group,
        settings: Settings,
        should_stop: Callable[[], bool],
        progress: Callable[[float], None] | None = None,  # not heard from the actor
    ):
        from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError

        from .engine import RenderCancelled

        ray = self.pool._ray
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if self._actor is None:
                self._actor = self.pool.spawn()
            ref = self._actor.render.remote(group, settings)
            cancelled_at = None
            try:
                while True:
                    ready, _ = ray.wait([ref], timeout=0.2)
                    if ready:
                        return ray.get(ref)
                    if cancelled_at is None and should_stop():
                        cancelled_at = time.monotonic()
                        ray.cancel(ref)
                    if cancelled_at is not None and time.monotonic() - cancelled_at > 2.0:
                        ray.kill(self._actor)
                        self._actor = None
                        raise RenderCancelled()
            except RayActorError:
                self._actor = None
                if attempt == MAX_ATTEMPTS:
                    raise
            except TaskCancelledError:
                raise RenderCancelled() from None
            except RayTaskError as e:  # reported to the tab's pollers as the render's failure
                raise task_failure(e, group, "the Ray actor") from None
        raise AssertionError("unreachable")
