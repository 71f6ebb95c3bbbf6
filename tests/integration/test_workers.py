"""Several render workers on a real TensorBoard: overlapping waves of renders, dataset examples
and attributions give what the same calls give in this process, and no worker is lost."""

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_ray import RAY_ENV, cluster  # noqa: F401  (a fixture: a Ray cluster on loopback)

import tb_microscope
from conftest import TinyCNN, http, tensorboard, train_step

SIZE, ITERATIONS = 16, 200  # long enough for the second wave to find the first running
FLAGS = ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
FLAGS += ["--microscope_preview_size", "0"]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """One run of the tests' TinyCNN with probe images, logged at steps 0 and 2."""
    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.rand(8, 3, 16, 16)
    with tb_microscope.Logger(root / "a", model, x, probe=x, steps=[0, 2]) as logger:
        for step in range(3):
            logger.log(step)
            train_step(model, x)
    return root


def plugin(base: str, route: str) -> str:
    return f"{base}/data/plugin/tb_microscope/{route}"


def poll(base: str, route: str, seconds: float = 300) -> bytes:
    """GET a route until it answers 200 (202 is 'still working'); its body."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, _, body = http(plugin(base, route))
        if status == 200:
            return body
        assert status == 202, (route, status, body)
        time.sleep(0.1)
    pytest.fail(f"{route} did not arrive")


def render_all(base: str, group: dict, units: list[int], seconds: float = 300) -> None:
    """POST `render` for `units` until every one is done, as the tab does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, _, body = http(plugin(base, "render"), {**group, "units": units})
        assert status == 200, body
        states = json.loads(body)["units"]
        assert not [s for s in states.values() if s["status"] == "failed"], states
        if all(s["status"] == "done" for s in states.values()):
            return
        time.sleep(0.1)
    pytest.fail(f"{group} {units} did not finish")


def waves(base: str) -> None:
    """A first wave of conv2's units; while it renders, a second wave asks for the same units
    and more (the same work again), another node's units, examples and an attribution."""
    conv2 = {"run": "a", "step": 2, "node": "conv2"}
    first = threading.Thread(target=render_all, args=(base, conv2, list(range(8))))
    first.start()
    deadline = time.monotonic() + 120
    while json.loads(http(plugin(base, "status"))[2])["running"] == 0:
        assert time.monotonic() < deadline, "the first wave never started"
        time.sleep(0.02)
    # the same work again, asked while it runs: its units join the running job
    joined = http(plugin(base, "render"), {**conv2, "units": list(range(16))})
    assert "running" in {s["status"] for s in json.loads(joined[2])["units"].values()}, joined
    second = [
        threading.Thread(target=render_all, args=(base, conv2, list(range(16)))),
        threading.Thread(target=render_all, args=(base, {**conv2, "node": "conv1"}, [0, 1, 2])),
        threading.Thread(target=poll, args=(base, "examples?run=a&step=2&node=conv2&unit=3")),
        threading.Thread(
            target=poll, args=(base, "attribution?run=a&step=2&node=conv2&unit=3&image=1")
        ),
        threading.Thread(target=poll, args=(base, "examples?run=a&step=0&node=conv1&unit=5")),
    ]  # fmt: skip
    for thread in second:
        thread.start()
    for thread in [first, *second]:
        thread.join(timeout=600)
        assert not thread.is_alive()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_against_this_process(base: str, logdir) -> None:
    run = tb_microscope.open_run(logdir / "a")
    here = tb_microscope.render(run, 2, "conv2", list(range(16)), size=SIZE, iterations=ITERATIONS,
                                device="cpu")  # fmt: skip
    for unit in range(16):
        served = png(poll(base, f"image?run=a&step=2&node=conv2&unit={unit}"))
        np.testing.assert_array_equal(served, here.images[unit], err_msg=f"unit {unit}")
    here = tb_microscope.render(run, 2, "conv1", [0, 1, 2], size=SIZE, iterations=ITERATIONS,
                                device="cpu")  # fmt: skip
    for unit in range(3):
        served = png(poll(base, f"image?run=a&step=2&node=conv1&unit={unit}"))
        np.testing.assert_array_equal(served, here.images[unit], err_msg=f"conv1 unit {unit}")
    examples = json.loads(poll(base, "examples?run=a&step=2&node=conv2&unit=3"))
    direct = tb_microscope.dataset_examples(run, 2, "conv2", [3], count=8, device="cpu")[3]
    assert [(e["index"], e["box"]) for e in examples["examples"]] == [
        (e.index, list(e.box)) for e in direct
    ]
    assert [e["activation"] for e in examples["examples"]] == [e.activation for e in direct]
    attribution = json.loads(poll(base, "attribution?run=a&step=2&node=conv2&unit=3&image=1"))
    expected = tb_microscope.attribution(run, 2, "conv2", 3, 1, device="cpu")
    np.testing.assert_allclose(np.array(attribution["values"]), expected, rtol=1e-3, atol=1e-7)


def check_no_worker_was_lost(base: str, workers: int) -> None:
    status = json.loads(http(plugin(base, "status"))[2])
    assert status["workers"] == workers and status["restarted"] == 0, status
    assert status["failed"] == 0, status


def test_two_workers_in_process_serve_overlapping_waves_as_this_process_renders(logdir, tmp_path):
    flags = [*FLAGS, "--microscope_workers", "2", "--microscope_cache_dir", str(tmp_path)]
    with tensorboard(logdir, *flags) as base:
        assert json.loads(http(plugin(base, "status"))[2])["workers"] == 2
        waves(base)
        check_no_worker_was_lost(base, 2)
        check_against_this_process(base, logdir)


def test_workers_on_a_local_ray_cluster_serve_overlapping_waves_as_this_process_renders(
    logdir, request, tmp_path
):
    """The tab's workers on a Ray cluster on this machine (`ray start --head` on loopback, as
    test_ray.py starts it), one actor each."""
    flags = [*FLAGS, "--microscope_ray_address", request.getfixturevalue("cluster")]
    flags += ["--microscope_cache_dir", str(tmp_path)]
    output: list[str] = []
    with tensorboard(logdir, *flags, env=RAY_ENV, output=output) as base:
        code, _, body = http(plugin(base, "status"))
        assert code == 200, "".join(output)[-3000:]  # the plugin loaded: its Ray pool started
        status = json.loads(body)
        workers = status["workers"]
        assert workers >= 2 and status["ray"].startswith("Ray: "), status
        waves(base)
        check_no_worker_was_lost(base, workers)
        check_against_this_process(base, logdir)


def test_a_ray_cluster_that_cannot_be_joined_leaves_the_tab_rendering_in_tensorboard(
    logdir, tmp_path
):
    """A Ray address that cannot be joined (one Ray cannot parse: it refuses it at once, whatever
    clusters run on this machine, where `auto` would find them): the tab still loads, says why in
    its status and the server's log, and renders in the TensorBoard process."""
    flags = ["--microscope_size", str(SIZE), "--microscope_iterations", "4"]
    flags += ["--microscope_preview_size", "0", "--microscope_ray_address", "127.0.0.1:notaport"]
    flags += ["--microscope_cache_dir", str(tmp_path)]
    output: list[str] = []
    with tensorboard(logdir, *flags, env=RAY_ENV, output=output) as base:
        code, _, body = http(plugin(base, "status"))
        assert code == 200, "".join(output)[-3000:]
        status = json.loads(body)
        assert status["ray"] is None and status["workers"] >= 1, status
        assert "could not join the Ray cluster at 127.0.0.1:notaport" in status["ray_error"]
        assert "Rendering in the TensorBoard process instead" in status["ray_error"]
        png = poll(base, "image?run=a&step=2&node=conv2&unit=1")
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (SIZE, SIZE, 3)
    assert "could not join the Ray cluster" in "".join(output)
