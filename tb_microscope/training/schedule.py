"""Which training steps get a snapshot.

A schedule is a sorted, possibly endless, set of steps. `Logger.log(step)` takes a snapshot when
some scheduled step lies after the last logged step and at or before `step`, so a training loop
that calls `log` only every few steps (or resumes past a scheduled step) still gets one snapshot
for each stretch of the schedule, labelled with the step it was really taken at.

The default is dense early and sparse later, because features form fast at the start of
training: step 0, then 1, 2, 3, 5, 7 in every decade (10, 15, 20, 30, 50, 70, 100, 150, …).
Over 100,000 steps that is 31 snapshots:
0 1 2 3 5 7 10 15 20 30 50 70 100 150 200 300 500 700 1000 1500 2000 3000 5000 7000 10000 15000
20000 30000 50000 70000 100000; six more per further decade.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

_MANTISSAS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)


class Schedule:
    def next_after(self, step: int) -> int | None:
        """The first scheduled step greater than `step`, or None when there is none."""
        raise NotImplementedError

    def due(self, step: int, last_logged: int | None) -> bool:
        nxt = self.next_after(-1 if last_logged is None else last_logged)
        return nxt is not None and nxt <= step

    def steps_until(self, end: int) -> list[int]:
        out, s = [], self.next_after(-1)
        while s is not None and s <= end:
            out.append(s)
            s = self.next_after(s)
        return out


class Every(Schedule):
    def __init__(self, n: int):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"every= must be a positive whole number of steps, not {n!r}")
        self.n = n

    def next_after(self, step: int) -> int:
        return (step // self.n + 1) * self.n

    def __repr__(self) -> str:
        return f"every {self.n} steps"


class Steps(Schedule):
    def __init__(self, steps: Iterable[int]):
        steps = list(steps)
        bad = [s for s in steps if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:
            raise ValueError(f"steps= must hold whole numbers >= 0; got {bad[:5]!r}")
        self.steps = sorted(set(steps))

    def next_after(self, step: int) -> int | None:
        i = bisect.bisect_right(self.steps, step)
        return self.steps[i] if i < len(self.steps) else None

    def __repr__(self) -> str:
        return f"steps {self.steps[:8]}{' …' if len(self.steps) > 8 else ''}"


class DenseEarly(Schedule):
    def next_after(self, step: int) -> int:
        if step < 0:
            return 0
        decade = 10 ** (len(str(step)) - 1)
        while True:
            for m in _MANTISSAS:
                candidate = m * decade
                if candidate.is_integer() and candidate > step:
                    return int(candidate)
            decade *= 10

    def __repr__(self) -> str:
        return "dense early (0 1 2 3 5 7 10 15 20 30 50 70 100 …)"


class Union(Schedule):
    def __init__(self, *parts: Schedule):
        self.parts = parts

    def next_after(self, step: int) -> int | None:
        found = [s for s in (p.next_after(step) for p in self.parts) if s is not None]
        return min(found) if found else None

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.parts))


def make_schedule(every: int | None, steps: Iterable[int] | None) -> Schedule:
    """`every=` and `steps=` combine; with neither, the dense-early default."""
    parts = []
    if every is not None:
        parts.append(Every(every))
    if steps is not None:
        parts.append(Steps(steps))
    if not parts:
        return DenseEarly()
    return parts[0] if len(parts) == 1 else Union(*parts)
