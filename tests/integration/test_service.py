"""The render service: newest request first, unpolled work dropped or cancelled, bounded tables."""

import logging
import time

import pytest
import torch

from tb_microscope.demo.train import train
from tb_microscope.server.models import DeviceModels, state_bytes
from tb_microscope.server.service import RenderService
from tb_microscope.server.work import RenderWork


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "demo"
    train(path, steps=3, log=lambda *_: None)
    return str(path)


def group_of(service, run_dir, step, iterations=4, node="conv2"):
    run = service.run(run_dir)
    version = run.snapshot_version(step)
    return RenderWork(run_dir, run.id, step, version, node, "channel", 16, iterations, 0)


def wait(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def busy_service(run_dir, tmp_path, abandon_after):
    """A service whose one worker is busy with a long render (polled once it runs)."""
    service = RenderService(device="cpu", cache_dir=str(tmp_path), abandon_after=abandon_after)
    busy = group_of(service, run_dir, 0, iterations=600)
    service.request(busy, [0])
    wait(lambda: service.request(busy, [0])[0]["progress"] > 0)  # polled: it keeps running
    status = service.request(busy, [0])[0]
    assert status["status"] == "running" and 0 < status["progress"] < 1
    return service, busy


def test_the_newest_request_goes_first(run_dir, tmp_path):
    service, busy = busy_service(run_dir, tmp_path, abandon_after=120)
    older, newer = (group_of(service, run_dir, s) for s in (2, 3))
    service.request(older, [1])
    time.sleep(0.05)
    service.request(newer, [1])  # both wait behind `busy`; `newer` was asked about last
    assert service.request(busy, [0])[0]["status"] == "running"
    wait(service.idle, seconds=180)
    assert [g.step for g, _, _ in service.recent] == [0, 3, 2]


def test_work_nobody_polls_is_dropped_before_it_starts(run_dir, tmp_path):
    service, busy = busy_service(run_dir, tmp_path, abandon_after=0.5)
    forgotten, polled = (group_of(service, run_dir, s) for s in (1, 2))
    service.request(forgotten, [1])  # asked once, never again
    deadline = time.monotonic() + 180
    while not service.idle():
        assert time.monotonic() < deadline
        service.request(busy, [0])  # still on screen
        service.request(polled, [1])
        time.sleep(0.1)
    assert [g.step for g, _, _ in service.recent] == [0, 2]
    assert service.stats["dropped"] == 1


def test_a_render_nobody_polls_any_more_is_cancelled(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), abandon_after=1.0)
    busy = group_of(service, run_dir, 2, iterations=100_000, node="conv3")  # hours of work
    service.request(busy, list(range(8)))
    wait(lambda: service.snapshot()["running"])
    wait(lambda: service.stats["cancelled"] == 1, seconds=120)
    assert service.idle() and service.stats["renders"] == 0
    cache = service.cache(service.run(run_dir))
    assert not any(key in cache for key in busy.keys(0))
    quick = group_of(service, run_dir, 2)  # the worker goes on with the next work
    wait(lambda: service.request(quick, [0])[0]["status"] == "done")


def test_cancel_stops_a_running_render_nobody_else_waits_for(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), abandon_after=60)
    busy = group_of(service, run_dir, 1, iterations=100_000, node="conv3")
    service.request(busy, [0, 1])
    wait(lambda: service.snapshot()["running"])
    assert service.cancel(busy, [0]) == 1
    progress = service.request(busy, [1])[1]["progress"]  # unit 1 is still wanted: it goes on
    wait(lambda: service.request(busy, [1])[1]["progress"] > progress)
    assert service.stats["cancelled"] == 0
    assert service.cancel(busy, [1]) == 1  # nobody else waits: hours of work stop
    wait(lambda: service.idle(), seconds=60)
    assert service.stats["cancelled"] == 1 and service.stats["renders"] == 0


def test_models_and_programs_share_one_memory_bound(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path))
    run = service.run(run_dir)
    one = state_bytes(run.load_model(0))
    service.memory.max_bytes = int(1.5 * one)
    models = DeviceModels(torch.device("cpu"), service.memory)
    first = models.get(run, 0)
    assert models.get(run, 0) is first  # kept
    models.get(run, 1)  # two do not fit: the least recently used goes
    assert service.memory.bytes <= service.memory.max_bytes
    assert models.get(run, 0) is not first
    kinds = [key[0] for key, _ in service.memory.items()]
    assert kinds.count("model") == 1


def test_threads_opening_a_runs_cache_at_once_all_find_it_next_to_the_run(run_dir):
    """The cache folder's writability check must not trip over another thread's check (two
    probes of one name: one thread removed the other's and sent its renders to ~/.cache)."""
    import threading

    from tb_microscope.execution.cache import CACHE, RenderCache
    from tb_microscope.run import Run

    run = Run(run_dir)
    roots, start = [], threading.Barrier(16)

    def open_cache():
        start.wait()
        roots.append(RenderCache(run).root)

    threads = [threading.Thread(target=open_cache) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(roots) == {run.store.root / CACHE}


def test_a_request_goes_through_the_sweep_planner_and_draws_what_the_cli_draws(run_dir, tmp_path):
    """20 units are more than one CPU group (16): the service renders them as the planner's
    groups and writes the bytes `tb-microscope render` writes."""
    from tb_microscope.cli.render import render_jobs
    from tb_microscope.execution.cache import RenderCache
    from tb_microscope.run import Run

    service = RenderService(device="cpu", cache_dir=str(tmp_path / "service"), abandon_after=60)
    work = group_of(service, run_dir, 2, iterations=24, node="conv2")
    units = list(range(4, 24))
    wait(lambda: all(s["status"] == "done" for s in service.request(work, units).values()), 240)
    wait(service.idle, 30)  # the images are on disk a moment before the render is counted
    assert service.stats["renders"] == 1 and service.stats["units_rendered"] == 20
    run = Run(run_dir)
    rendered, interrupted = render_jobs(
        [(run, 2, "conv2", units)], "channel", size=16, iterations=24, seed=0,
        devices=[torch.device("cpu")], batch_size=None, cache_dir=str(tmp_path / "cli"),
    )  # fmt: skip
    assert (rendered, interrupted) == (20, False)
    ours, theirs = service.cache(service.run(run_dir)), RenderCache(run, str(tmp_path / "cli"))
    for unit in units:
        (key,) = work.keys(unit)
        assert ours.path(key).read_bytes() == theirs.path(key).read_bytes()


def test_a_key_being_made_is_made_once_while_others_wait_for_it():
    import threading

    from tb_microscope.lru import LRU

    memory, calls, start = LRU(max_items=4), [], threading.Barrier(8)

    def make():
        calls.append(1)
        time.sleep(0.3)
        return object(), 1

    got = []

    def ask():
        start.wait()
        got.append(memory.get_or_make("program", make))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(v) for v in got}) == 1

    def fail():
        raise OSError("unreadable")

    with pytest.raises(OSError):
        memory.get_or_make("broken", fail)
    assert memory.get_or_make("broken", lambda: ("made", 1)) == "made"  # a failure is not kept


def test_showing_a_runs_nodes_loads_its_program_before_a_node_is_opened(run_dir, tmp_path):
    service = RenderService(device="cpu", cache_dir=str(tmp_path))
    run = service.run(run_dir)
    service.prefetch(run)
    wait(lambda: any(key[0] == "program" for key, _ in service.memory.items()))
    programs = [key for key, _ in service.memory.items() if key[0] == "program"]
    assert programs == [("program", run.id, run.signature, "cpu")]


def test_a_failed_render_is_logged_with_its_traceback(run_dir, tmp_path, caplog, read_only):
    service = RenderService(device="cpu", cache_dir=str(tmp_path), abandon_after=60)
    run = service.run(run_dir)
    bad = RenderWork(run_dir, run.id, 1, run.snapshot_version(1), "conv2", "channel", 16, 4, 0)
    read_only(service.cache(run).root)  # a fault of the machine: the pictures cannot be stored
    with caplog.at_level(logging.WARNING, logger="tb_microscope.server.service"):
        wait(lambda: service.request(bad, [0])[0]["status"] == "failed", 120)
        wait(service.idle, 30)
    (record,) = [r for r in caplog.records if r.name == "tb_microscope.server.service"]
    assert f"render of conv2 at step 1 of run '{run_dir}' failed" == record.getMessage()
    assert record.exc_info is not None and issubclass(record.exc_info[0], PermissionError)
