"""The plugin in a real `tensorboard` process on 127.0.0.1, on a logdir written by the Logger."""

import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import tb_microscope
from conftest import http, tensorboard
from tb_microscope.demo.model import SmallCNN
from tb_microscope.demo.train import train

SIZE, ITERATIONS = 24, 8


def get(url: str) -> tuple[int, str, bytes]:
    return http(url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logdir")
    train(logdir / "demo", steps=20, log=lambda *_: None)
    flags = ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
    with tensorboard(logdir, *flags) as url:
        yield url, logdir


def poll_image(base: str, query: str) -> bytes:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, kind, body = get(f"{base}/data/plugin/tb_microscope/image?{query}")
        if status == 200:
            assert kind == "image/png"
            return body
        assert status == 202, (status, body)
        status_body = json.loads(body)
        assert status_body["status"] in ("queued", "running")
        assert 0 <= status_body["position"] and 0.0 <= status_body["progress"] <= 1.0
        time.sleep(0.2)
    pytest.fail("the image did not arrive")


def test_plugin_is_listed_and_serves_the_engines_render(server):
    base, logdir = server
    status, _, body = get(f"{base}/data/plugins_listing")
    assert status == 200 and b'"tb_microscope"' in body and b'"Microscope"' in body
    status, kind, body = get(f"{base}/data/plugin/tb_microscope/static/index.js")
    assert status == 200 and kind.startswith("text/javascript")
    assert b"export async function render" in body

    png = poll_image(base, "run=demo&step=20&node=conv2&unit=3")
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    run = tb_microscope.open_run(logdir / "demo")
    engine = tb_microscope.render(
        run, 20, "conv2", [3], size=SIZE, iterations=ITERATIONS, device="cpu"
    )
    np.testing.assert_array_equal(served, engine.images[0])


def test_new_snapshots_appear_without_a_restart(server):
    base, logdir = server
    status, _, body = get(f"{base}/data/plugin/tb_microscope/runs")
    assert status == 200 and b'"run": "demo"' in body and b"20]" in body
    with tb_microscope.Logger(logdir / "demo", SmallCNN(), torch.rand(2, 3, 32, 32)) as logger:
        logger.log(25, force=True)
    status, _, body = get(f"{base}/data/plugin/tb_microscope/runs")
    assert b"20, 25]" in body


@pytest.mark.parametrize(
    "query, code",
    [
        ("run=nope&step=20&node=conv2&unit=0", 404),
        ("run=../../etc&step=20&node=conv2&unit=0", 404),
        ("run=demo&step=4&node=conv2&unit=0", 404),
        ("run=demo&step=-1&node=conv2&unit=0", 400),
        ("run=demo&step=99999999999999999999999&node=conv2&unit=0", 400),
        ("run=demo&step=x&node=conv2&unit=0", 400),
        ("run=demo&step=20&node=../conv2&unit=0", 404),
        ("run=demo&step=20&node=conv2&unit=32", 400),
        ("run=demo&step=20&node=conv2&unit=-1", 400),
        ("run=demo&step=20&node=conv2", 400),
        ("run=demo&step=20&node=conv2&unit=0&technique=wobble", 400),
        ("run=demo&step=20&node=conv2&unit=0&size=100000", 400),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, query, code):
    base, _ = server
    status, _, body = get(f"{base}/data/plugin/tb_microscope/image?{query}")
    assert status == code, body
    assert len(body) > 10
    assert get(f"{base}/data/plugin/tb_microscope/runs")[0] == 200


def test_listing_a_run_with_probe_images_starts_the_warm_up(server):
    """Eight listings at once start the warm-up (test_warmup.py checks that it starts once
    however many threads ask, and what it warms); the listings do not wait for it."""
    _, logdir = server
    with tensorboard(logdir, warm_up=True) as base:
        status = f"{base}/data/plugin/tb_microscope/status"
        assert json.loads(get(status)[2])["warm_up"]["status"] == "idle"  # nothing listed yet
        barrier, listed = threading.Barrier(8), []

        def list_runs():
            barrier.wait()
            listed.append(get(f"{base}/data/plugin/tb_microscope/runs"))

        listers = [threading.Thread(target=list_runs) for _ in range(8)]
        for lister in listers:
            lister.start()
        for lister in listers:
            lister.join()
        assert [code for code, _, _ in listed] == [200] * 8
        assert json.loads(listed[0][2])[0]["probe"] is not None  # the demo's has probe images
        warm_up = json.loads(get(status)[2])["warm_up"]
        assert warm_up["status"] in ("running", "done"), warm_up


def test_no_warm_up_with_its_flag(tmp_path):
    train(tmp_path / "demo", steps=2, log=lambda *_: None)
    with tensorboard(tmp_path, "--microscope_no_warm_up") as base:
        runs = json.loads(get(f"{base}/data/plugin/tb_microscope/runs")[2])
        assert runs[0]["probe"] is not None
        state = json.loads(get(f"{base}/data/plugin/tb_microscope/status")[2])
        assert state["warm_up"] == {"status": "idle", "seconds": None, "parts": {}}


def test_a_new_run_appears_without_a_restart(server):
    base, logdir = server
    with tb_microscope.Logger(logdir / "later", SmallCNN(), torch.rand(2, 3, 32, 32)) as logger:
        logger.log(0)
    deadline = time.monotonic() + 60
    while b'"run": "later"' not in get(f"{base}/data/plugin/tb_microscope/runs")[2]:
        assert time.monotonic() < deadline, "the new run never appeared"
        time.sleep(0.5)


def test_flags_are_listed_by_helpfull():
    out = subprocess.run(
        [sys.executable, "-m", "tensorboard.main", "--helpfull"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in (
        "--microscope_device",
        "--microscope_cache_dir",
        "--microscope_size",
        "--microscope_iterations",
        "--microscope_allow_pickle",
        "--microscope_no_warm_up",
    ):
        assert flag in out
