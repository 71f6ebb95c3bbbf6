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
from collections import Counter, deque
from collections.abc import Callable, Sequence

from ..errors import MicroscopeError
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
            return self.renderer.render(group, settings)

    return ray.remote(RenderActor)


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
        ray = self._ray = _import_ray()
        self.allow_pickle, self.threads, self.say = allow_pickle, threads, say
        self._own = address == "local"
        options = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            if self._own:
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
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        if self.gpus:
            self.workers = workers or self.gpus
            self._options = dict(num_gpus=1, num_cpus=min(threads, cpus))
            self._device = "cuda"
        else:
            self.workers = workers or max(1, cpus // threads)
            self._options = dict(num_cpus=threads)
            self._device = "cpu"
        self._actor = _actor_class(ray)
        self.actors: dict[int, object] = {}
        self.replaced = 0

    @property
    def device_kind(self) -> str:
        return self._device

    def describe(self) -> str:
        return f"Ray: {self.workers} actors ({self._device})"

    def _spawn(self, slot: int):
        actor = self._actor.options(**self._options).remote(
            self._device, self.allow_pickle, self.threads
        )
        self.actors[slot] = actor
        return actor

    def execute(
        self,
        groups: Sequence[Group],
        settings: Settings,
        on_result: OnResult,
        should_stop: Callable[[], bool],
    ) -> None:
        ray = self._ray
        from ray.exceptions import RayActorError

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
