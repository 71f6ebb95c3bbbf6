"""Snapshot schedules: which steps the Logger snapshots."""

import pytest

from tb_microscope.training.schedule import DenseEarly, make_schedule


def test_default_schedule_logs_31_steps_over_100k_dense_early():
    steps = DenseEarly().steps_until(100_000)
    assert steps[:12] == [0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70]
    assert steps[-3:] == [50_000, 70_000, 100_000]
    assert len(steps) == 31
    assert sum(s <= 1000 for s in steps) == 19


def test_every_and_steps_combine():
    schedule = make_schedule(every=100, steps=[5, 250])
    assert schedule.steps_until(300) == [0, 5, 100, 200, 250, 300]


@pytest.mark.parametrize(
    "bad", [dict(every=0), dict(every=2.5), dict(steps=[-1]), dict(steps=["a"])]
)
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        make_schedule(bad.get("every"), bad.get("steps"))
