"""Executors: what renders a sweep's groups, behind one protocol on every road.

The CLI's `render` and the demo (`cli.render.render_jobs`) hand a whole sweep to an executor; the
plugin's render service gives each of its workers one, and hands it each request's groups. The
caller plans the groups (`planner.plan`) and alone writes the results into the cache (from
`on_result`, with `planner.store`), so the files are the same whichever executor rendered them.
`InProcessExecutor` renders on this process's devices; `RayExecutor` (`ray_executor.py`) on
actors of a Ray cluster, replacing an actor that dies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..optvis.engine import RenderCancelled, available_devices
from .planner import Group, Rendered, Renderer, Settings

OnResult = Callable[[Group, Rendered, str], None]  # (group, its pictures, which worker)
OnProgress = Callable[[Group, float], None]  # (group, the fraction of it done)


class Executor(Protocol):
    """Renders groups somewhere. `execute` hands each group's pictures to `on_result` (one call
    at a time) as soon as it is done, in the groups' order where it renders one at a time;
    returns early once `should_stop()` is true (what was done is handed over, a running render
    is stopped at its next check); raises the error of a group that failed. `progress`, where
    the executor hears it, is told the fraction of a group done now and then. An executor keeps
    what it loaded (runs, models, actors) from one `execute` to the next until `close`."""

    @property
    def device_kind(self) -> str: ...

    def describe(self) -> str: ...

    def execute(
        self,
        groups: Sequence[Group],
        settings: Settings,
        on_result: OnResult,
        should_stop: Callable[[], bool],
        progress: OnProgress | None = None,
    ) -> None: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """A `Renderer` per device of this process (`renderers` given, else one per device of
    `devices`: every CUDA device, else the CPU), each taking the next group on a thread of its
    own; with one renderer, on the calling thread."""

    def __init__(
        self,
        devices: Sequence[torch.device] | None = None,
        allow_pickle: bool = False,
        renderers: Sequence[Renderer] | None = None,
    ):
        if renderers is None:
            renderers = [Renderer(d, allow_pickle) for d in devices or available_devices()]
        self.renderers = list(renderers)

    @property
    def device_kind(self) -> str:
        return self.renderers[0].device_kind

    def describe(self) -> str:
        return ", ".join(str(r.device) for r in self.renderers)

    def execute(
        self,
        groups: Sequence[Group],
        settings: Settings,
        on_result: OnResult,
        should_stop: Callable[[], bool],
        progress: OnProgress | None = None,
    ) -> None:
        pending = list(reversed(groups))
        lock = threading.Lock()
        failures: list[BaseException] = []

        def work(renderer: Renderer, name: str) -> None:
            try:
                while not should_stop() and not failures:
                    with lock:
                        if not pending:
                            return
                        group = pending.pop()
                    heard = None if progress is None else (lambda f, g=group: progress(g, f))
                    rendered = renderer.render(group, settings, should_stop, heard)
                    with lock:
                        on_result(group, rendered, name)
            except RenderCancelled:
                pass
            except BaseException as e:  # said by the caller; the other workers stop
                failures.append(e)

        names = [f"{r.device} (worker {i + 1})" for i, r in enumerate(self.renderers)]
        if len(self.renderers) == 1:
            work(self.renderers[0], names[0])
        else:
            workers = [
                threading.Thread(target=work, args=(r, n), daemon=True, name=f"render-{r.device}")
                for r, n in zip(self.renderers, names)
            ]
            for worker in workers:
                worker.start()
            while any(worker.is_alive() for worker in workers):
                for worker in workers:
                    worker.join(0.1)
        if failures:
            raise failures[0]

    def close(self) -> None:
        """Nothing to let go of but memory, which goes with the executor."""
