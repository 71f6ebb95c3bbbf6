"""Sweeps on a real Ray cluster: the same files as in-process, a killed actor, a resumed sweep."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tb_microscope
from conftest import TinyCNN, free_port, http, run_python, tensorboard, train_step

RENDER = ["--size", "24", "--iterations", "8"]
# A cluster started by `ray start` checks a token (Ray >= 2.59); its drivers must say so and
# hold the token. The tests' own, so that nothing depends on a ~/.ray/auth_token of the machine.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
# the fault tests' sweep: long enough (small groups, more iterations) to be hit mid-way
SLOW = ["--runs", "a", "--nodes", "conv2", "--size", "24", "--iterations", "40"]
SLOW += ["--batch-size", "4"]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.png")}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """Two runs of the tests' TinyCNN, each logged at steps 0, 2 and 4."""
    root = tmp_path_factory.mktemp("logs")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model, x = TinyCNN(), torch.rand(4, 3, 16, 16)
        with tb_microscope.Logger(root / name, model, x, steps=[0, 2, 4]) as logger:
            for step in range(5):
                logger.log(step)
                train_step(model, x)
    return root


def render(logdir, cache: Path, *extra, check=True, env=None):
    return run_python(
        "-m", "tb_microscope.cli", "render", logdir, "--steps", "0,2,4", "--cache-dir", cache,
        *extra, check=check, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster of 2 CPUs on loopback (`ray start --head`), stopped after the module."""
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    command = [ray, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1"]
    command += ["--port", str(port), "--include-dashboard", "false", "--disable-usage-stats"]
    command += ["--temp-dir", str(temp)]
    started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=RAY_ENV)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def test_a_sweep_on_a_local_ray_cluster_writes_exactly_the_in_process_files(
    logdir, cluster, tmp_path
):
    everything = ["--nodes", "conv1", "conv2", *RENDER]
    render(logdir, tmp_path / "here", *everything)
    proc = render(logdir, tmp_path / "ray", *everything, "--ray", "local")
    assert "rendering on Ray: 2 actors (cpu)" in proc.stderr
    # 2 runs x 3 steps x (8 + 16 units)
    assert "144 units: 144 rendered, 0 were already cached" in proc.stdout
    workers = re.search(r"rendered on ray actor 1: (\d+), ray actor 2: (\d+)", proc.stderr)
    assert workers and int(workers.group(1)) + int(workers.group(2)) == 144
    reference = files(tmp_path / "here")
    assert len(reference) == 144 and files(tmp_path / "ray") == reference

    # a render that fails on an actor stops the sweep with the actor's error, not Ray's traceback
    broken = tmp_path / "broken"
    shutil.copytree(logdir, broken)
    snapshot = next((broken / "b").rglob("step-000000002.safetensors"))
    data = bytearray(snapshot.read_bytes())
    data[-10] ^= 0xFF  # the contents no longer match the checksum written with them
    snapshot.write_bytes(bytes(data))
    proc = render(
        broken, tmp_path / "bad", "--nodes", "conv1", *RENDER, "--ray", cluster, check=False,
        env=RAY_ENV,
    )  # fmt: skip
    assert proc.returncode != 0
    assert re.search(
        r"Ray actor \d could not render conv1 units 0-7 at step 2 of .*/b: ", proc.stderr
    )
    assert "CorruptSnapshotError: the snapshot of step 2" in proc.stderr
    assert "delete this file to drop the step" in proc.stderr and "Traceback" not in proc.stderr


def actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::RenderActor"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def start(logdir, cache: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tb_microscope.cli", "render", str(logdir)]
    command += ["--steps", "0,2,4", "--cache-dir", str(cache), *SLOW, "--ray", address]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV
    )


def wait_for_files(cache: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while len(list(cache.rglob("*.png"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_killed_actor_is_replaced_and_a_stopped_sweep_resumes(logdir, cluster, tmp_path):
    render(logdir, tmp_path / "here", *SLOW)
    reference = files(tmp_path / "here")
    total = len(reference)  # 3 steps x 16 units of conv2, 12 groups of 4
    assert total == 48

    # an actor killed mid-sweep: a new one takes its place, every unit is stored once
    proc = start(logdir, tmp_path / "killed", cluster)
    wait_for_files(tmp_path / "killed", 8, proc)
    pids = actor_pids()
    assert pids, "no actor process to kill"
    os.kill(pids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "died (ActorDiedError); a new one takes its place" in err
    assert f"{total} units: {total} rendered, 0 were already cached" in out
    assert files(tmp_path / "killed") == reference

    # Ctrl-C stops the cluster's work; the same command again renders only what is missing
    proc = start(logdir, tmp_path / "resumed", cluster)
    wait_for_files(tmp_path / "resumed", 8, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "run the same command again to resume" in err
    done = len(files(tmp_path / "resumed"))
    assert 8 <= done < total
    deadline = time.monotonic() + 30  # its actors were stopped with it (their processes end)
    while actor_pids():
        assert time.monotonic() < deadline, actor_pids()
        time.sleep(0.1)
    proc = start(logdir, tmp_path / "resumed", cluster)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{total} units: {total - done} rendered, {done} were already cached" in out
    assert files(tmp_path / "resumed") == reference


def test_tensorboard_sends_the_tabs_renders_to_the_cluster(logdir, cluster, tmp_path):
    flags = ["--microscope_ray_address", cluster, "--microscope_size", "24"]
    flags += ["--microscope_iterations", "8", "--microscope_preview_size", "0"]
    flags += ["--microscope_cache_dir", str(tmp_path / "tab")]
    with tensorboard(logdir, *flags, env=RAY_ENV) as base:
        status, _, body = http(f"{base}/data/plugin/tb_microscope/status")
        assert json.loads(body)["ray"] == "Ray: 2 actors (cpu)"
        query = "run=b&step=2&node=conv2&unit=5"
        deadline = time.monotonic() + 180
        while (got := http(f"{base}/data/plugin/tb_microscope/image?{query}"))[0] == 202:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert got[0] == 200, got[2]
        assert actor_pids()  # rendered by an actor of the cluster
    # the same picture, byte for byte, as the command line renders here
    render(logdir, tmp_path / "here", "--runs", "b", "--nodes", "conv2", "--units", "5", *RENDER)
    (here,) = [p for p in (tmp_path / "here").rglob("*.png") if "step-2" in str(p)]
    assert got[2] == here.read_bytes()
