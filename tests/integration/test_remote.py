"""Runs in object storage, for real: the Logger writing to a real S3-compatible server
(`moto_server`), `open_run` on the URL rendering what the same run logged locally renders, a
missing bucket or missing credentials refused when the Logger starts, a truncated snapshot object
and a store that stops answering mid-upload, the CLI on a URL, and TensorBoard's tab on
`--logdir s3://...`; and `gs://` against a real GCS emulator (`gcp-storage-emulator`): a run read
back as logged, a missing bucket refused."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import tb_microscope
from conftest import SCRIPTS, TinyCNN, http, run_python, tensorboard, train_step
from tb_microscope.errors import CorruptSnapshotError, MicroscopeError, RunNotFoundError
from tb_microscope.store.remote import find_remote_runs

PLUGIN = "/data/plugin/tb_microscope"
SIZE, ITERATIONS = 16, 4


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test's own user cache (mirrors, staging folders, render caches)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def log_run(logdir, steps=3, seed=0):
    """A TinyCNN trained a few SGD steps, logged at each, with probe images."""
    torch.manual_seed(seed)
    model, x = TinyCNN(), torch.rand(4, 3, 16, 16)
    with tb_microscope.Logger(logdir, model, x, every=1, probe=x) as logger:
        for step in range(steps):
            train_step(model, x)
            logger.log(step)
    return logger


@pytest.fixture(scope="module")
def logged(s3_server, tmp_path_factory):
    """One run logged to s3://lab/runs/exp1, and the same run logged to a local directory."""
    root = tmp_path_factory.mktemp("remote")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root / "train-cache")
    try:
        bucket = s3_server.bucket("lab")
        log_run(f"{bucket}/runs/exp1")
        log_run(root / "local" / "exp1")
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = saved
    return f"{bucket}/runs/exp1", root / "local" / "exp1"


def test_a_run_at_an_s3_url_renders_as_the_same_run_logged_locally(logged):
    url, local = logged
    remote_run, local_run = tb_microscope.open_run(url), tb_microscope.open_run(local)
    assert remote_run.name == url and remote_run.steps == local_run.steps == [0, 1, 2]
    assert [n.name for n in remote_run.nodes] == [n.name for n in local_run.nodes]
    assert torch.equal(remote_run.probe_images(), local_run.probe_images())
    a, b = (
        tb_microscope.render(r, 2, "conv2", [0, 3], size=SIZE, iterations=ITERATIONS, device="cpu")
        for r in (remote_run, local_run)
    )
    np.testing.assert_array_equal(a.images, b.images)


def test_the_cli_takes_a_url(logged, s3_server, tmp_path):
    url, _ = logged
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cli-cache")}
    out = run_python("-m", "tb_microscope.cli", "info", url.rsplit("/", 1)[0], env=env).stdout
    assert "exp1  " in out and "steps (3): 0 1 2" in out and "conv2" in out
    render = ["render", url.rsplit("/", 1)[0], "--runs", "exp1", "--steps", "2", "--nodes", "conv2"]
    render += ["--units", "0-1", "--size", str(SIZE), "--iterations", str(ITERATIONS)]
    run_python("-m", "tb_microscope.cli", *render, "--device", "cpu", env=env)
    atlas = ["atlas", url, "--step", "2", "--node", "conv2", "--grid", "2", "--size", str(SIZE)]
    atlas += ["--iterations", str(ITERATIONS), "--layout", "pca", "-o", tmp_path / "atlas.png"]
    run_python("-m", "tb_microscope.cli", *atlas, "--device", "cpu", env=env)
    assert Image.open(tmp_path / "atlas.png").size[0] > 0


def test_a_run_at_a_gs_url_reads_back_as_the_same_run_logged_locally(gcs_server, tmp_path):
    url = f"{gcs_server.bucket('lab-gcs')}/runs/exp1"
    log_run(url)
    log_run(tmp_path / "local" / "exp1")
    remote_run = tb_microscope.open_run(url)
    local_run = tb_microscope.open_run(tmp_path / "local" / "exp1")
    assert remote_run.name == url and remote_run.steps == local_run.steps == [0, 1, 2]
    assert [n.name for n in remote_run.nodes] == [n.name for n in local_run.nodes]
    assert torch.equal(remote_run.probe_images(), local_run.probe_images())
    x = torch.rand(2, 3, 16, 16)
    for step in remote_run.steps:
        assert torch.equal(remote_run.load_model(step)(x), local_run.load_model(step)(x))
    assert find_remote_runs(url.rsplit("/", 2)[0]) == [url]


def test_a_missing_gcs_bucket_is_said_when_the_logger_starts(gcs_server):
    url, x = "gs://no-such-gcs-bucket/runs/x", torch.rand(2, 3, 16, 16)
    for start in (
        lambda: tb_microscope.Logger(url, TinyCNN(), x),
        lambda: tb_microscope.open_run(url),
    ):
        with pytest.raises(RunNotFoundError, match="bucket 'no-such-gcs-bucket' exists") as err:
            start()
        assert "STORAGE_EMULATOR_HOST" in str(err.value) and "AWS" not in str(err.value)


def test_a_missing_bucket_is_said_when_the_logger_starts(s3_server):
    with pytest.raises(RunNotFoundError, match="bucket 'no-such-bucket' exists"):
        tb_microscope.Logger("s3://no-such-bucket/runs/x", TinyCNN(), torch.rand(2, 3, 16, 16))
    with pytest.raises(RunNotFoundError, match="bucket 'no-such-bucket' exists"):
        tb_microscope.open_run("s3://no-such-bucket/runs/x")


def test_missing_credentials_are_said_when_the_logger_starts(s3_server, monkeypatch, tmp_path):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_server.bucket("creds")
    try:
        with pytest.raises(MicroscopeError, match="AWS_ACCESS_KEY_ID"):
            tb_microscope.Logger(f"{bucket}/x", TinyCNN(), torch.rand(2, 3, 16, 16))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_truncated_snapshot_object_is_never_read(s3_server):
    bucket = s3_server.bucket("trunc")
    url = f"{bucket}/runs/cut"
    log_run(url, steps=2)
    import boto3

    s3 = boto3.client("s3")
    key = "runs/cut/plugins/tb_microscope/snapshots/step-{:09d}.safetensors"
    whole = s3.get_object(Bucket="trunc", Key=key.format(1))["Body"].read()
    s3.put_object(Bucket="trunc", Key=key.format(5), Body=whole[: len(whole) // 2])
    run = tb_microscope.open_run(url)
    assert run.steps == [0, 1, 5]  # listed, as a truncated file in a run directory is
    with pytest.raises(CorruptSnapshotError) as err:
        run.load_model(5)
    message = str(err.value)  # as a run directory's (test_faults.py), naming the object
    assert f"snapshot of step 5 in run '{url}'" in message and "truncated" in message
    assert f"({url}/plugins/tb_microscope/snapshots/step-000000005.safetensors: " in message
    assert "other steps are unaffected" in message and "delete this object" in message
    assert not run.store.snapshot_path(5).exists()  # nothing half is kept in the mirror
    run.load_model(1)


def endless_model():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from endless_logger import model
    finally:
        sys.path.remove(str(SCRIPTS))
    return model()


def test_a_store_that_stops_answering_mid_upload_leaves_whole_snapshots(s3_server):
    """The store is stopped (SIGSTOP) while step 0's 128 MB snapshot is going up: training goes
    on, and once the store answers again every step is there whole."""
    bucket = s3_server.bucket("paused")
    url, s3 = f"{bucket}/runs/p", s3_client()
    model, x = endless_model(), torch.rand(2, 4096)
    with tb_microscope.Logger(url, model, x, every=1) as logger:
        logger.log(0)
        deadline = time.monotonic() + 120
        while snapshot_put_in_flight(s3, "paused") is None:
            assert time.monotonic() < deadline, "step 0's upload never began"
            time.sleep(0.01)
        s3_server.pause()
        try:
            for step in (1, 2):
                with torch.no_grad():
                    model[0].bias += 1
                assert logger.log(step)  # training does not wait for the store
            logger.flush()  # written to the staging folder while the store is stopped
        finally:
            s3_server.resume()
    run = tb_microscope.open_run(url)
    assert run.steps == [0, 1, 2]
    bias = endless_model()[0].bias.detach()
    for step in run.steps:
        assert torch.allclose(run.load_state_dict(step)["0.bias"], bias + step, atol=1e-4)


def s3_client():
    import boto3

    return boto3.client("s3")


def snapshot_put_in_flight(s3, bucket: str) -> str | None:
    """The key of a snapshot whose upload has begun and not completed (a 128 MB snapshot goes up
    as an S3 multipart upload: begun, its parts, completed), if there is one."""
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        if "/snapshots/step-" in upload["Key"]:
            return upload["Key"]
    return None


def object_keys(s3, bucket: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_training_killed_mid_upload_leaves_whole_steps_and_the_next_logger_uploads_the_rest(
    s3_server, tmp_path, monkeypatch
):
    """endless_logger.py logs a 128 MB model to s3:// at every step; it is SIGKILLed while a
    snapshot's upload is in flight, once another is uploaded whole. A reader sees only whole
    steps; the next Logger on the URL (same machine, so the same staging folder) uploads the step
    that was cut off."""
    bucket = s3_server.bucket("killed")
    url, s3 = f"{bucket}/runs/k", s3_client()
    train_cache = tmp_path / "train-cache"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "endless_logger.py"), url, "600"],  # 4 snapshots staged
        env={**os.environ, "XDG_CACHE_HOME": str(train_cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    cut = None
    try:
        deadline = time.monotonic() + 300
        while cut is None and time.monotonic() < deadline and proc.poll() is None:
            in_flight = snapshot_put_in_flight(s3, "killed")
            whole = [k for k in object_keys(s3, "killed") if "/snapshots/step-" in k]
            if in_flight is not None and whole and in_flight not in whole:
                cut = in_flight
            else:
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert cut is not None, stderr.decode()[-3000:]
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    step = int(re.search(r"step-(\d+)\.safetensors$", cut).group(1))
    assert cut not in object_keys(s3, "killed")  # the put was cut off: begun, never completed

    bias = endless_model()[0].bias.detach()  # the script adds 1 after each step (float32 sums)

    run = tb_microscope.open_run(url)
    assert run.steps and step not in run.steps  # never half a snapshot: the cut-off one absent
    for s in run.steps:
        assert torch.allclose(run.load_state_dict(s)["0.bias"], bias + s, atol=1e-4)

    monkeypatch.setenv("XDG_CACHE_HOME", str(train_cache))
    with tb_microscope.Logger(url, endless_model(), torch.rand(2, 4096)):
        pass  # nothing logged: it uploads what the killed one staged
    before, run = run, tb_microscope.open_run(url)
    assert run.id == before.id and step in run.steps
    for s in run.steps:
        assert torch.allclose(run.load_state_dict(s)["0.bias"], bias + s, atol=1e-4)


def test_tensorboard_on_an_s3_logdir_renders_a_unit_and_its_examples(logged, tmp_path):
    url, _ = logged
    logdir = url.rsplit("/", 1)[0]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "tb-cache")}
    flags = ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
    with tensorboard(logdir, *flags, env=env) as base:
        deadline = time.monotonic() + 120
        while True:
            status, _, body = http(f"{base}{PLUGIN}/runs")
            runs = json.loads(body) if status == 200 else []
            if any(r["run"] == "exp1" and r.get("steps") == [0, 1, 2] for r in runs):
                break
            assert time.monotonic() < deadline, (status, body)
            time.sleep(0.5)
        png = poll(base, "image?run=exp1&step=2&node=conv2&unit=3")
        assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
        examples = json.loads(poll(base, "examples?run=exp1&step=2&node=conv2&unit=3&count=2"))
        assert len(examples["examples"]) == 2


def poll(base: str, query: str) -> bytes:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, _, body = http(f"{base}{PLUGIN}/{query}")
        if status == 200:
            return body
        assert status == 202, (status, body)
        time.sleep(0.2)
    pytest.fail(f"{query} did not arrive")


def test_ray_workers_read_a_run_at_an_s3_url_and_draw_what_this_process_draws(
    logged, s3_server, tmp_path
):
    """`tb-microscope render … --ray local`: each actor opens the run by its URL, through its
    own mirror, and writes the files an in-process render writes."""
    from test_ray import RAY_ENV

    url, _ = logged
    env = {**os.environ, **RAY_ENV, **s3_server.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    render = ["render", url, "--steps", "1,2", "--nodes", "conv1", "conv2"]
    render += ["--size", str(SIZE), "--iterations", str(ITERATIONS)]
    here = ["--cache-dir", tmp_path / "here", "--device", "cpu"]
    run_python("-m", "tb_microscope.cli", *render, *here, env=env)
    proc = run_python(
        "-m", "tb_microscope.cli", *render, "--cache-dir", tmp_path / "ray", "--ray", "local",
        env=env,
    )  # fmt: skip
    assert "rendering on Ray" in proc.stderr and "48 rendered" in proc.stdout, proc.stdout
    here = {
        p.relative_to(tmp_path / "here"): p.read_bytes() for p in (tmp_path / "here").rglob("*.png")
    }
    ray = {
        p.relative_to(tmp_path / "ray"): p.read_bytes() for p in (tmp_path / "ray").rglob("*.png")
    }
    assert len(here) == 48 and ray == here
