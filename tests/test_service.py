"""The render service's scheduling: newest request first, unpolled requests dropped."""

import time

import pytest

from tb_microscope.demo.train import train
from tb_microscope.server.service import Group, RenderService


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "demo"
    train(path, steps=3, log=lambda *_: None)
    return str(path)


def test_newest_request_goes_first_and_unpolled_ones_are_dropped(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), stale_after=0.5)

    def group(step, iterations=4):
        return Group(run_dir, step, "conv2", "channel", 16, iterations, 0)

    busy = group(0, iterations=600)
    service.request(busy, [0])
    deadline = time.monotonic() + 30
    while not service.snapshot()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    status = service.request(busy, [0])[0]
    assert status["status"] == "running" and 0 < status["progress"] < 1
    forgotten, older, newer = group(1), group(2), group(3)
    service.request(forgotten, [1])  # asked once, never again
    time.sleep(0.8)
    while service.snapshot()["running"] or service.snapshot()["queued"]:
        assert time.monotonic() < deadline + 120
        service.request(older, [1])  # both still on screen; `newer` was looked at last
        service.request(newer, [1])
        time.sleep(0.2)
    done = [g.step for g, _, _ in service.recent]
    assert done[0] == 0
    assert forgotten.step not in done and service.stats["dropped"] == 1
    assert done.index(newer.step) < done.index(older.step)


def test_loaded_models_are_kept_within_their_memory_bound(run_dir):
    import torch

    from tb_microscope import open_run
    from tb_microscope.server.service import _Models

    run = open_run(run_dir)
    one = sum(t.numel() * t.element_size() for t in run.load_state_dict(0).values())
    models = _Models(torch.device("cpu"), max_bytes=int(1.5 * one))
    first = models.get(run, 0)
    assert models.get(run, 0) is first  # kept
    models.get(run, 1)  # two do not fit: the least recently used goes
    assert models.get(run, 1) is not None and len(models._models) == 1
    assert models.get(run, 0) is not first
