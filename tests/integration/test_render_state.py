"""Rendering in a process that also trains: a render, dataset examples and an attribution of a
really logged run leave torch's and Python's global settings as the training script had them,
whether they finish, are cancelled or are refused, and run from a training script's
`torch.no_grad()` block."""

import warnings

import pytest
import torch
from torch import nn

import tb_microscope
from tb_microscope.optvis.engine import RenderCancelled
from tb_microscope.optvis.torch_state import PROCESS_SETTINGS, THREAD_SETTINGS, read, restore

EVERY = PROCESS_SETTINGS + THREAD_SETTINGS
SCRIPTS_FILTER = "a filter of the training script"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-convolution model logged at one step, with probe images (a couple of seconds)."""
    path = tmp_path_factory.mktemp("state") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    probe = torch.rand(6, 3, 16, 16)
    with tb_microscope.Logger(path, model, torch.rand(2, 3, 16, 16), steps=[0], probe=probe) as log:
        log.log(0)
    return tb_microscope.open_run(path)


@pytest.fixture
def script_settings():
    """A training script's unusual settings (yielded as `read` has them), and this process's own
    put back after the test."""
    before = read(EVERY)
    with warnings.catch_warnings():
        torch.set_float32_matmul_precision("medium")
        torch.backends.mkldnn.enabled = False
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", message=SCRIPTS_FILTER)
        yield read(EVERY)
    restore(EVERY, before)


def changed_since(before: list) -> list[str]:
    return [s.name for s, old, now in zip(EVERY, before, read(EVERY)) if old != now]


def meddle(_fraction: float) -> None:
    """Code a render calls (its progress callback here; a library elsewhere) that switches
    settings and does not put them back."""
    torch.backends.mkldnn.enabled = True
    torch.backends.cuda.matmul.allow_tf32 = False  # the old TF32 API, over "medium"
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")


def assert_as_the_script_had_them(settings: list) -> None:
    assert changed_since(settings) == []
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.mkldnn.enabled is False and torch.get_num_threads() == 1
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.is_deterministic_algorithms_warn_only_enabled() and torch.is_grad_enabled()
    assert warnings.filters[0][1].pattern == SCRIPTS_FILTER


def test_a_render_and_the_analyses_leave_the_scripts_settings_as_they_were(run, script_settings):
    with torch.no_grad():  # as in a training script's evaluation, or a validation hook
        result = tb_microscope.render(
            run, 0, "2", [0, 1], size=16, iterations=2, device="cpu", progress=meddle
        )
        examples = tb_microscope.dataset_examples(run, 0, "2", [0], count=2, device="cpu")
    # Captum's guided backprop: attribution silences Captum's warning of its hooks
    values = tb_microscope.attribution(run, 0, "2", 0, 0, method="guided_backprop", device="cpu")
    assert result.images.shape == (2, 16, 16, 3) and len(examples[0]) == 2
    assert values.shape == (16, 16)
    assert_as_the_script_had_them(script_settings)


def test_a_cancelled_or_refused_render_leaves_them_as_well(run, script_settings):
    meddled = []

    def progress(fraction):
        meddle(fraction)
        meddled.append(fraction)

    with pytest.raises(RenderCancelled):
        tb_microscope.render(
            run, 0, "2", [0, 1], size=16, iterations=64, device="cpu", progress=progress,
            should_stop=lambda: bool(meddled),
        )  # fmt: skip
    assert meddled
    assert_as_the_script_had_them(script_settings)
    with pytest.raises(tb_microscope.UnitIndexError):
        tb_microscope.render(run, 0, "2", [99], size=16, iterations=2, device="cpu")
    assert_as_the_script_had_them(script_settings)
