"""Torch's and Python's global settings around a render, without a render: a block puts back what
was changed in it, raised or not; a block still running in another thread keeps its settings; and
the CUDA TF32 switches a render sets (flags only: no GPU needed) leave torch's two TF32 APIs as
they were."""

import threading
import warnings

import pytest
import torch

from tb_microscope.optvis.numerics import Numerics
from tb_microscope.optvis.torch_state import (
    PROCESS_SETTINGS,
    THREAD_SETTINGS,
    read,
    restore,
    restored_torch_state,
)

EVERY = PROCESS_SETTINGS + THREAD_SETTINGS


@pytest.fixture(autouse=True)
def settings_as_they_were():
    """This process's settings put back after each test, whatever it did (with the module's
    `read` and `restore`: a failure of them shows in the tests first)."""
    before = read(EVERY)
    with warnings.catch_warnings():
        yield
    restore(EVERY, before)


def changed_since(before: list) -> list[str]:
    return [s.name for s, old, now in zip(EVERY, before, read(EVERY)) if old != now]


def change_everything() -> None:
    """What a render, or a library it calls, might switch and not put back."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the old API, over a "medium" precision
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.mkldnn.enabled = True
    torch.backends.mkldnn.deterministic = True
    torch.backends.nnpack.set_flags(False)
    torch.backends.cudnn.enabled = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(2 if torch.get_num_threads() == 1 else 1)
    torch.set_default_dtype(torch.float16)
    warnings.simplefilter("error")
    torch.set_grad_enabled(False)
    torch.set_autocast_enabled("cpu", True)
    torch.set_autocast_dtype("cpu", torch.float16)


def test_what_a_block_changes_is_put_back_when_it_raises():
    torch.set_float32_matmul_precision("medium")
    torch.backends.mkldnn.enabled = False
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", message="a filter of the training script")
    before = read(EVERY)
    with pytest.raises(KeyError), restored_torch_state():
        change_everything()
        raise KeyError("conv9")
    assert changed_since(before) == []
    assert torch.get_float32_matmul_precision() == "medium"  # readable again, and as it was
    assert torch.backends.mkldnn.enabled is False and torch.get_num_threads() == 1
    assert torch.get_default_dtype() == torch.float64 and torch.is_grad_enabled()
    assert warnings.filters[0][1].pattern == "a filter of the training script"


def test_a_block_still_running_in_another_thread_keeps_its_settings():
    threads = torch.get_num_threads()
    inside = 2 if threads == 1 else 1
    with restored_torch_state():
        torch.set_num_threads(inside)  # say, oneDNN switched for this thread's render
        done = threading.Event()

        def render_alongside():
            with restored_torch_state():
                pass
            done.set()

        other = threading.Thread(target=render_alongside)
        other.start()
        other.join()
        assert done.is_set() and torch.get_num_threads() == inside  # not put back yet
    assert torch.get_num_threads() == threads  # once the last block ends


def test_a_cuda_render_keeps_a_medium_matmul_precision():
    torch.set_float32_matmul_precision("medium")
    with Numerics(tf32=False).applied(torch.device("cuda")):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"  # no TF32 while it renders
    assert torch.get_float32_matmul_precision() == "medium"  # readable, and as it was


def test_a_cuda_render_runs_where_only_the_new_tf32_api_was_used():
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of"):  # torch refuses to read the old API now
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018
    with Numerics(tf32=False).applied(torch.device("cuda")):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
