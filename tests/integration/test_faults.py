"""Faults: a killed writer, corrupt files, a full disk, a read-only directory (warned, and
logged with the traceback)."""

import logging
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import tb_microscope
from conftest import SCRIPTS, run_python, train_step
from tb_microscope.store.local import RunStore


def _kill_during_a_write(run_dir) -> list[str]:
    """Start a logger that writes forever; SIGKILL it while a snapshot is being written.

    Returns what the kill left in the snapshot folder besides complete snapshots.
    """
    snapshots = RunStore(run_dir).root / "snapshots"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "endless_logger.py"), str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(snapshots) if snapshots.is_dir() else []
            if any(n.startswith("step-") for n in names) and any(n.startswith(".") for n in names):
                proc.send_signal(signal.SIGKILL)  # a snapshot is being written right now
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    return [n for n in os.listdir(snapshots) if n.startswith(".")]


def test_a_writer_killed_mid_snapshot_leaves_no_partial_snapshot_visible(tmp_path):
    # The write may finish between seeing it and the kill landing: try again then.
    for attempt in range(5):
        run_dir = tmp_path / f"run{attempt}"
        if _kill_during_a_write(run_dir):
            break
    else:
        pytest.fail("five kills in a row did not land during a write")
    snapshots = RunStore(run_dir).root / "snapshots"

    run = tb_microscope.open_run(run_dir)
    assert run.steps and all(
        f"step-{s:09d}.safetensors" in os.listdir(snapshots) for s in run.steps
    )
    for step in run.steps:
        assert run.load_state_dict(step)["0.bias"].shape == (4096,)

    sys.path.insert(0, str(SCRIPTS))
    try:
        from endless_logger import model
    finally:
        sys.path.remove(str(SCRIPTS))
    steps_before = run.steps
    with tb_microscope.Logger(run_dir, model(), torch.rand(2, 4096)) as logger:
        assert not [n for n in os.listdir(snapshots) if n.startswith(".")], "stale temp not swept"
        logger.log(steps_before[-1] + 100, force=True)
    assert run.steps == steps_before + [steps_before[-1] + 100]


def test_a_corrupt_snapshot_fails_alone_with_a_clear_error(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example, every=1) as logger:
        for step in range(4):
            logger.log(step)
            train_step(tiny, example)
    store = RunStore(tmp_path)
    truncated, flipped, garbage = (store.snapshot_path(s) for s in (1, 2, 3))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data: only the checksum can notice
    flipped.write_bytes(bytes(data))
    garbage.write_bytes(b"\xff" * 64 + garbage.read_bytes()[64:])

    run = tb_microscope.open_run(tmp_path)
    assert run.steps == [0, 1, 2, 3]
    for step in (1, 2, 3):
        with pytest.raises(tb_microscope.CorruptSnapshotError) as err:
            run.load_model(step)
        message = str(err.value)
        assert f"snapshot of step {step}" in message and "delete this file" in message
        assert "other steps are unaffected" in message
    x = torch.rand(2, 3, 16, 16)
    assert run.load_model(0)(x).shape == (2, 5)


def test_a_full_disk_warns_and_training_goes_on(tmp_path):
    proc = run_python(SCRIPTS / "limited_disk.py", tmp_path)
    assert "finished training" in proc.stdout
    assert "writing step 1" in proc.stderr and "File too large" in proc.stderr
    assert "free some disk space" in proc.stderr and "Training continues" in proc.stderr
    assert tb_microscope.open_run(tmp_path).steps == [0]
    assert not [p for p in RunStore(tmp_path).root.rglob(".*")], "temporary files left behind"


def test_a_full_disk_raises_with_strict(tmp_path):
    proc = run_python(SCRIPTS / "limited_disk.py", tmp_path, "--strict", check=False)
    assert proc.returncode != 0 and "finished training" not in proc.stdout
    assert "SnapshotWriteError" in proc.stderr and "File too large" in proc.stderr
    assert tb_microscope.open_run(tmp_path).steps == [0]
    assert not [p for p in RunStore(tmp_path).root.rglob(".*")]


@pytest.mark.parametrize("strict", [False, True])
def test_a_permission_error_warns_or_raises_with_strict(tmp_path, tiny, example, read_only, strict):
    logger = tb_microscope.Logger(tmp_path, tiny, example, every=1, strict=strict)
    logger.log(0)
    logger.flush()
    read_only(RunStore(tmp_path).root / "snapshots")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log(1)
        train_step(tiny, example)
        if strict:
            with pytest.raises(tb_microscope.SnapshotWriteError, match="writing step 1"):
                logger.flush()
        else:
            logger.flush()
            message = " ".join(str(w.message) for w in caught)
            assert "writing step 1" in message and "Training continues" in message
            assert "check that the directory is writable" in message
        logger.log(2)
    logger.close(raise_errors=False)
    assert "Operation not permitted" in logger.records[1].error or (
        "Permission denied" in logger.records[1].error
    )
    assert tb_microscope.open_run(tmp_path).steps == [0]


def test_a_failed_write_is_logged_with_its_traceback_where_warnings_are_filtered(
    tmp_path, tiny, example, read_only, caplog
):
    logger = tb_microscope.Logger(tmp_path, tiny, example, every=1)
    logger.log(0)
    logger.flush()
    read_only(RunStore(tmp_path).root / "snapshots")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="tb_microscope"):
        warnings.simplefilter("ignore")  # a script that silences warnings
        logger.log(1)
        logger.flush()
    logger.close(raise_errors=False)
    (record,) = [r for r in caplog.records if "writing step 1" in r.getMessage()]
    assert record.name == "tb_microscope.training.writer" and record.levelno == logging.WARNING
    assert "Training continues" in record.getMessage()
    assert "check that the directory is writable" in record.getMessage()
    assert isinstance(record.exc_info[1], OSError)  # the write's own error, and where it was
    assert "Traceback (most recent call last)" in caplog.text and "write_snapshot" in caplog.text
    assert tb_microscope.open_run(tmp_path).steps == [0]
