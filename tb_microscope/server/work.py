"""What the render service is asked to do: the work items it queues, and the error of work that
went stale before it ran.

Both kinds are keyed by the run's id and the versions of the snapshots they read, never by the
run's path, so that a run logged again under the same name is new work.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MicroscopeError
from ..execution import planner
from ..execution.cache import RenderKey, ResultKey


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
