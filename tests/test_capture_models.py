"""Runs logged by a real training script are rebuilt exactly by a process that cannot import it."""

import shutil

import pytest

from conftest import SCRIPTS, run_python

MODELS = ["alexnet", "googlenet", "resnet18", "mobilenet_v3_small", "custom", "branchy"]


@pytest.mark.parametrize("model", MODELS)
def test_rebuilt_model_matches_eager_activations_and_input_gradients(model, tmp_path):
    run_dir, ref = tmp_path / "runs" / model, tmp_path / "reference.pt"
    train = run_python(SCRIPTS / "train_and_reference.py", model, run_dir, ref)
    assert "logged steps [0, 1, 2, 3, 5]" in train.stdout

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(SCRIPTS / "check_run.py", elsewhere)
    args = ["check_run.py", run_dir, ref] + (["--allow-pickle"] if model == "branchy" else [])
    check = run_python(*args, cwd=elsewhere)
    expected = "pickle" if model == "branchy" else "export"
    assert f"ok: architecture={expected} steps=[0, 1, 2, 3, 5]" in check.stdout
    if model == "branchy":
        assert "torch.export could not capture Branchy" in train.stderr


def test_pickled_architecture_is_refused_without_allow_pickle(tmp_path):
    run_dir, ref = tmp_path / "run", tmp_path / "reference.pt"
    run_python(SCRIPTS / "train_and_reference.py", "branchy", run_dir, ref, "--steps", "2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(SCRIPTS / "check_run.py", elsewhere)
    check = run_python("check_run.py", run_dir, ref, cwd=elsewhere, check=False)
    assert check.returncode != 0
    assert "PickleNotAllowedError" in check.stderr
    assert (
        "allow_pickle=True" in check.stderr and "runs code from the log directory" in check.stderr
    )
