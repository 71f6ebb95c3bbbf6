"""Errors on a real TensorBoard: a fault of the machine is a 500 whose traceback is in the server's
log, a broken run a 400 saying what to do, and neither stops the server answering."""

import json
import shutil
import time

import pytest

from conftest import http, tensorboard, unwritable
from tb_microscope.demo.train import train
from tb_microscope.store.local import RunStore

BASE = "/data/plugin/tb_microscope"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A TensorBoard over the demo run, and a copy of it whose step 3 is a directory, with a
    cache folder it may not write in; yields its base URL and its log's lines so far."""
    root = tmp_path_factory.mktemp("errors")
    logdir = root / "logdir"
    train(logdir / "demo", steps=3, log=lambda *_: None)
    shutil.copytree(logdir / "demo", logdir / "torn")
    snapshot = RunStore(logdir / "torn").snapshot_path(3)
    snapshot.unlink()
    snapshot.mkdir()
    cache = root / "cache"
    cache.mkdir()
    unwritable(cache)  # a machine whose disk refuses the cache (permissions, a read-only mount)
    flags = ["--microscope_cache_dir", str(cache)]
    flags += ["--microscope_size", "16", "--microscope_iterations", "2"]
    output: list[str] = []
    try:
        with tensorboard(logdir, *flags, output=output) as url:
            yield url + BASE, output
    finally:
        unwritable(cache, locked=False)


def logged(output: list[str], *words: str, seconds: float = 30) -> str:
    """The server's log, once it holds each of `words`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = "".join(output)
        if all(word in text for word in words):
            return text
        time.sleep(0.1)
    pytest.fail(f"the server's log does not say {words}:\n{''.join(output)[-3000:]}")


def test_a_fault_of_the_machine_is_a_500_with_its_traceback_in_the_servers_log(server):
    base, output = server
    status, kind, body = http(f"{base}/image?run=demo&step=3&node=conv1&unit=0")
    assert status == 500 and kind.startswith("text/plain"), (status, body)
    assert body.startswith(b"internal error in tb_microscope (PermissionError: "), body
    assert body.endswith(b"the server's log has the traceback")
    text = logged(output, "a request to tb_microscope failed", "Traceback (most recent call last)")
    after = text[text.index("a request to tb_microscope failed") :]
    assert "PermissionError" in after and "cache.py" in after  # where it was raised
    status, _, body = http(f"{base}/runs")  # the server goes on
    assert status == 200 and "demo" in {r["run"] for r in json.loads(body)}


def test_a_snapshot_that_is_not_a_file_is_a_400_saying_what_to_do(server):
    base, _ = server
    status, _, body = http(f"{base}/image?run=torn&step=3&node=conv1&unit=0")
    assert status == 400, (status, body)
    assert b"CorruptSnapshotError: the snapshot of step 3 in run" in body
    assert b"it is not a file" in body and b"delete this file to drop the step" in body
