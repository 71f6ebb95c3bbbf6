"""The rendering engine on a CNN trained on generated stripes and blobs."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision

import tb_microscope
from conftest import run_python
from tb_microscope.demo.train import train
from tb_microscope.execution.cache import RenderCache, RenderKey
from tb_microscope.execution.planner import render_cached
from tb_microscope.optvis.batching import BATCH_CAPS, MEMORY_SHARE, batch_size_for, sample_bytes
from tb_microscope.optvis.canvas import fitted_canvas
from tb_microscope.optvis.engine import (
    CHECKS_PER_PASS,
    QUALITIES,
    RenderCancelled,
    StopChecks,
    learning_rate,
)
from tb_microscope.optvis.numerics import Numerics
from tb_microscope.optvis.param import PAD, InputSpace
from tb_microscope.optvis.probe import probe_activations
from tb_microscope.optvis.tap import NodeTap, frozen

STEPS = 150


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    train(run_dir, steps=STEPS, log=lambda *_: None)
    return tb_microscope.open_run(run_dir)


def _live_units(run, node, count):
    """Units whose activation varies over the probe images (not dead at the last step)."""
    model = run.load_model(STEPS)
    act = probe_activations(run, model, run.node(node), torch.device("cpu"))
    per_image = act.flatten(2).mean(2)
    return [int(u) for u in per_image.max(0).values.argsort(descending=True)[:count]], per_image


def test_renders_excite_their_unit_more_than_any_probe_image(trained):
    units, per_image = _live_units(trained, "conv3", 4)
    result = tb_microscope.render(trained, STEPS, "conv3", units, size=32, iterations=320)
    assert result.images.shape == (4, 32, 32, 3) and result.images.dtype == np.uint8
    best_probe = per_image[:, units].max(0).values.numpy()
    assert (best_probe > 0).all()
    assert (result.activation > best_probe).all(), (result.activation, best_probe)
    # the activation reported is the unit's on the image returned
    space = InputSpace(trained.input_spec, torch.device("cpu"))
    x = torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        act = NodeTap(trained.load_model(STEPS), trained.node("conv3"))(space(x)).maps
    again = act[torch.arange(4), torch.tensor(units)].mean((1, 2)).numpy()
    np.testing.assert_allclose(again, result.activation, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(result.objective, result.activation, rtol=1e-6)


def test_units_silent_on_the_starting_noise_still_get_a_picture(trained):
    # pool1 = max-pool of relu(conv1): on the starting noise most of its units are zero
    # everywhere, so without redirected ReLU gradients their images would never move
    model = trained.load_model(STEPS)
    space = InputSpace(trained.input_spec, torch.device("cpu"))
    with torch.no_grad():
        start = NodeTap(model, trained.node("pool1"))(space(torch.full((1, 3, 32, 32), 0.5))).maps
    silent = [u for u in range(16) if start[0, u].max() <= 0]
    assert len(silent) >= 4, "the test needs units that the starting image leaves silent"
    result = tb_microscope.render(trained, STEPS, "pool1", silent, size=32, iterations=32)
    assert (result.activation > 0).all(), result.activation
    assert all(image.std() > 20 for image in result.images)


def test_a_unit_silent_behind_a_relu6_still_gets_a_picture(tmp_path):
    """MobileNets' ReLU6 (a hardtanh from 0 to 6 in the exported graph) is redirected too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU6())
    with torch.no_grad():
        model[0].bias[0] = -0.5 * model[0].weight[0].sum() - 0.3  # -0.3 on grey: silent
    with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    result = tb_microscope.render(run, 0, "1", [0], size=16, iterations=24)
    assert result.activation[0] > 0 and result.images[0].std() > 20


def test_a_unit_active_only_on_the_canvas_edge_still_gets_a_picture(tmp_path):
    """Unit 0 is relu(11 - the sum of its 27 inputs): -2.5 on grey, but +2 along the edge, where
    the zero padding leaves out a third of its inputs. Its activity there does not depend on the
    image, so its image gets no gradient at all, though no ReLU blocks all of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight[0] = -1.0
        model[0].bias[0] = 11.0
    with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    start, end = (
        tb_microscope.render(run, 0, "1", [0], size=16, iterations=n).objective[0] for n in (1, 24)
    )
    assert start > 0 and end > 2 * start, (start, end)
    together = tb_microscope.render(run, 0, "1", [1, 0], size=16, iterations=24)
    alone = tb_microscope.render(run, 0, "1", [0], size=16, iterations=24)
    assert np.array_equal(together.images[1], alone.images[0])


def test_a_units_picture_does_not_depend_on_how_small_its_activations_are(tmp_path):
    """Bias-free convolutions and ReLUs scale with their weights: scaled down 2^14 and 2^20 per
    layer, the first gradients are far below Adam's eps (as in a freshly initialized GoogLeNet),
    and both models must still draw the same, non-grey picture. Powers of two keep every
    product's digits, so that bf16 (the engine's choice on some CPUs), which rounds the two
    models' activations alike only then, computes the same picture too."""
    images = []
    for scale in (2.0**-14, 2.0**-20):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
            torch.nn.ReLU(),
        )
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        with tb_microscope.Logger(tmp_path / str(scale), model, torch.rand(2, 3, 16, 16)) as log:
            log.log(0)
        run = tb_microscope.open_run(tmp_path / str(scale))
        result = tb_microscope.render(run, 0, "2", [0, 1, 2], size=32, iterations=24)
        images.append(result.images.astype(float))
    assert all(image.std() > 20 for image in images[1]), [i.std() for i in images[1]]
    assert np.abs(images[0] - images[1]).mean() <= 1.0


@pytest.mark.parametrize("convolutional", [False, True])
def test_the_engines_cpu_numerics_compute_a_sample_alike_at_every_batch_size(convolutional):
    """By default PyTorch switches CPU convolutions to NNPACK's for batches of 16 and more,
    and oneDNN's fp32 kernels change with the batch size too; their results differ (about
    1e-5) from the same sample's alone, which an optimization amplifies into different pictures.
    Under the engine's numerics (for a convolutional network, bf16 with oneDNN on a CPU that
    has it) a sample's forward and input gradient are bitwise the same alone and in batches of
    16 and 64."""
    from tb_microscope.optvis.numerics import default_numerics

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3)
    )
    x = torch.randn(64, 64, 8, 8)
    device = torch.device("cpu")
    numerics = default_numerics(device, model if convolutional else None)

    def first_sample(batch):
        xs = x[:batch].clone().requires_grad_(True)
        inputs = xs.contiguous(memory_format=torch.channels_last) if numerics.channels_last else xs
        y = model(inputs).float()
        (grad,) = torch.autograd.grad((y * y).sum(), xs)
        return y[0].detach(), grad[0]

    with numerics.applied(device):
        alone = first_sample(1)
        for batch in (16, 64):
            for got, want in zip(first_sample(batch), alone):
                assert torch.equal(got, want), batch
    assert torch._C._get_nnpack_enabled()  # put back as it was
    assert torch.backends.mkldnn.enabled


class _Resampled(torch.nn.Module):
    """Convolutions around an antialiased resize, which has no bf16 kernel on the CPU."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        return self.conv2(x)


def test_a_model_with_an_operation_bf16_lacks_renders_in_fp32(tmp_path):
    torch.manual_seed(0)
    with tb_microscope.Logger(tmp_path, _Resampled(), torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    options = dict(size=16, iterations=4, device="cpu")
    chosen = tb_microscope.render(run, 0, "conv2", [0, 1], **options)
    fp32 = tb_microscope.render(run, 0, "conv2", [0, 1], **options, numerics=Numerics())
    np.testing.assert_array_equal(chosen.images, fp32.images)
    with pytest.raises(NotImplementedError, match="BFloat16"):  # what the fallback stood in for
        tb_microscope.render(
            run, 0, "conv2", [0], **options, numerics=Numerics(autocast=torch.bfloat16)
        )


@pytest.mark.parametrize("size", [16, 26])
def test_a_unit_alone_and_in_a_batch_of_sixteen_gives_the_same_image(trained, size):
    """At 26 px a sample's image (3 x 26 x 26 values) is not a whole number of vectors: in a
    batch its last values are computed by the vector code, alone by the scalar code, and
    PyTorch's sigmoid and Adam's arithmetic round differently in the two."""
    options = dict(size=size, iterations=6, device="cpu")
    batch = tb_microscope.render(trained, STEPS, "conv1", list(range(16)), **options, batch_size=16)
    for unit in range(16):
        alone = tb_microscope.render(trained, STEPS, "conv1", [unit], **options)
        np.testing.assert_array_equal(alone.images[0], batch.images[unit], err_msg=str(unit))
        assert alone.activation[0] == batch.activation[unit], unit  # bit for bit


def test_a_preview_goes_most_of_the_way_a_longer_render_goes(trained):
    """The preview takes larger steps than lucid's 0.05, so that it already looks like what its
    unit becomes rather than like its starting noise."""
    assert learning_rate(512) == learning_rate(4096) == 0.05
    assert learning_rate(32) == pytest.approx(0.2) and learning_rate(1) == pytest.approx(0.4)
    units, quality = list(range(8)), QUALITIES["preview"]
    preview = tb_microscope.render(
        trained, STEPS, "pool2", units, size=quality.size, iterations=quality.iterations
    )
    longer = tb_microscope.render(trained, STEPS, "pool2", units, size=32, iterations=256)
    # with lucid's 0.05 a 32-iteration preview reached about a third of what 256 iterations reach
    assert preview.activation.mean() > 0.55 * longer.activation.mean() > 0


def test_a_cancel_is_heard_within_a_pass_without_a_check_at_every_module():
    model = torchvision.models.resnet18(num_classes=10).eval()
    leaves = [m for m in model.modules() if not next(m.children(), None)]
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    asked = []

    def stop_at_the_sixth():
        asked.append(1)
        return len(asked) >= 6

    with StopChecks(model, stop_at_the_sixth), pytest.raises(RenderCancelled):
        model(x)  # stops in the forward: a cancel does not wait for the pass to end
    assert len(asked) == 6
    asked.clear()
    with StopChecks(model, lambda: asked.append(1) or False) as stop:
        model(x).sum().backward()
        stop.check()
    # asked along the forward and the backward, at most CHECKS_PER_PASS times each way
    assert CHECKS_PER_PASS <= len(asked) <= 2 * CHECKS_PER_PASS + 1 < 2 * len(leaves)
    assert not any(m._forward_hooks for m in model.modules())  # all taken off


HEAP_CHURN = """
import ctypes, json, os
import torch
from tb_microscope.optvis.heap import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, kept_heap, page_faults

# glibc's starting thresholds (128 KiB), pinned: left to adapt, they depend on what the process
# allocated and freed before (the interpreter, torch's import), and so does the count without
# kept_heap; pinned, every 8 MiB block goes back to the kernel when freed, which is what some
# histories give a render
libc = ctypes.CDLL(None)
libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def rounds(count):  # what an optimization does: the same large tensors made and freed
    before = page_faults()
    for _ in range(count):
        maps = [torch.ones(2 << 20) for _ in range(10)]  # 10 x 8 MiB
        del maps
    return page_faults() - before

rounds(1)
plain = rounds(4)
with kept_heap():
    rounds(1)
    kept = rounds(4)  # the heap may grow by a block once while its free space settles
    inside = rss()
print(json.dumps({"plain": plain, "kept": kept, "inside": inside, "after": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap: Linux only")
def test_a_cpu_render_reuses_freed_memory_and_gives_it_back_when_done():
    # a fresh interpreter: glibc's thresholds are the process's, set by the first render
    figures = json.loads(run_python("-c", HEAP_CHURN).stdout)
    pages = (80 << 20) // 4096  # what one round touches
    assert figures["plain"] > 3 * pages  # the pages given back, and touched again, every round
    assert figures["kept"] < pages // 2  # kept: the same pages again, a block's worth at most
    assert figures["inside"] - figures["after"] > 60 << 20  # trimmed when the render ends


def test_batches_are_sized_by_the_devices_free_memory(trained):
    cpu = torch.device("cpu")
    model, node = frozen(trained.load_model(STEPS)), trained.node("conv3")
    small, large = (sample_bytes(model, trained, node, size, cpu) for size in (16, 64))
    pixels = ((64 + PAD * 2) / (16 + PAD * 2)) ** 2  # the canvas's area grows by this much
    assert 0.7 * pixels < large / small < 1.3 * pixels
    assert batch_size_for(model, trained, node, 16, cpu, free=int(3.5 * small / MEMORY_SHARE)) == 3
    assert batch_size_for(model, trained, node, 16, cpu, free=1) == 1
    assert batch_size_for(model, trained, node, 16, cpu, free=1 << 40) == BATCH_CAPS["cpu"]


def test_a_runs_model_loads_in_several_threads_at_once(trained):
    """Render workers on several devices load programs at the same time (torch.export's
    deserializer is not thread-safe on its own)."""
    runs = [tb_microscope.open_run(trained.path) for _ in range(6)]  # each its own program cache
    barrier = threading.Barrier(len(runs))

    def load(run):
        barrier.wait()
        return run.load_model(STEPS)

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        models = list(pool.map(load, runs))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        outputs = [model(x) for model in models]
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_trained_units_differ_from_their_step_zero_noise(trained):
    early = tb_microscope.render(trained, 0, "conv2", [0, 1], size=32, iterations=48)
    late = tb_microscope.render(trained, STEPS, "conv2", [0, 1], size=32, iterations=48)
    difference = np.abs(early.images.astype(int) - late.images.astype(int)).mean()
    assert difference > 10


@pytest.mark.parametrize("technique", ["channel", "neuron", "negative_channel", "diversity"])
def test_a_unit_rendered_alone_or_in_a_batch_gives_the_same_image(trained, technique):
    alone = tb_microscope.render(trained, STEPS, "conv2", [5], technique, size=24, iterations=12)
    batch = tb_microscope.render(
        trained, STEPS, "conv2", [3, 5, 9], technique, size=24, iterations=12
    )
    per_unit = len(alone.images)
    np.testing.assert_array_equal(alone.images, batch.images[per_unit : 2 * per_unit])
    again = tb_microscope.render(trained, STEPS, "conv2", [5], technique, size=24, iterations=12)
    np.testing.assert_array_equal(alone.images, again.images)
    other_seed = tb_microscope.render(
        trained, STEPS, "conv2", [5], technique, size=24, iterations=12, seed=1
    )
    assert not np.array_equal(alone.images, other_seed.images)


def test_diversity_gives_distinct_images_and_negative_lowers_the_unit(trained):
    diverse = tb_microscope.render(
        trained, STEPS, "conv2", [4], "diversity", size=24, iterations=48
    )
    assert len(diverse.images) == 4 and diverse.units == [4, 4, 4, 4]
    pairs = [
        np.abs(diverse.images[i].astype(int) - diverse.images[j]).mean()
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert min(pairs) > 5
    negative = tb_microscope.render(
        trained, STEPS, "conv2", [4], "negative_channel", size=24, iterations=48
    )
    positive = tb_microscope.render(trained, STEPS, "conv2", [4], size=24, iterations=48)
    assert negative.activation[0] < positive.activation[0]
    dream = tb_microscope.render(trained, STEPS, "conv2", [], "deepdream", size=24, iterations=8)
    assert dream.images.shape == (1, 24, 24, 3)


def test_bad_arguments_say_what_is_allowed(trained):
    with pytest.raises(
        tb_microscope.UnitIndexError, match=r"unit 64 is out of range .* \(0 … 31\)"
    ):
        tb_microscope.render(trained, STEPS, "conv2", [1, 64], iterations=1)
    with pytest.raises(tb_microscope.UnitIndexError):
        tb_microscope.render(trained, STEPS, "conv2", [-1], iterations=1)
    with pytest.raises(ValueError, match="techniques: channel, neuron"):
        tb_microscope.render(trained, STEPS, "conv2", [1], "wobble", iterations=1)
    with pytest.raises(tb_microscope.NodeNotFoundError, match="nodes: conv1"):
        tb_microscope.render(trained, STEPS, "conv9", [1], iterations=1)
    with pytest.raises(tb_microscope.StepNotFoundError):
        tb_microscope.render(trained, 4, "conv2", [1], iterations=1)
    with pytest.raises(ValueError, match="size must be"):
        tb_microscope.render(trained, STEPS, "conv2", [1], size=10**6, iterations=1)


def test_cache_returns_the_engines_pixels_without_rendering_again(trained, tmp_path):
    cache = RenderCache(trained, tmp_path / "cache")
    options = dict(size=24, iterations=10)
    first = render_cached(cache, trained, STEPS, "conv1", [2, 7], **options)
    direct = tb_microscope.render(trained, STEPS, "conv1", [2, 7], **options)
    np.testing.assert_array_equal(first[7][0].image, direct.images[1])
    assert first[7][0].activation == pytest.approx(float(direct.activation[1]))
    version = trained.snapshot_version(STEPS)
    paths = [
        cache.path(RenderKey(STEPS, version, "conv1", u, "channel", 24, 10, 0)) for u in (2, 7)
    ]
    stamps = [p.stat().st_mtime_ns for p in paths]
    second = render_cached(cache, trained, STEPS, "conv1", [2, 7], **options)
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    np.testing.assert_array_equal(second[2][0].image, first[2][0].image)
    other = RenderKey(STEPS, version, "conv1", 2, "channel", 24, 11, 0)
    assert other not in cache and cache.path(other) != paths[0]


def test_cache_moves_to_the_user_cache_dir_when_the_run_is_read_only(
    trained, tmp_path, monkeypatch, read_only
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    plugin = trained.store.root
    (plugin / "cache").mkdir(exist_ok=True)
    read_only(plugin / "cache")
    cache = RenderCache(trained)
    assert cache.root == tmp_path / "xdg" / "tb_microscope" / trained.id


def test_dataset_examples_are_the_strongest_probe_images_with_their_receptive_field(trained):
    examples = tb_microscope.dataset_examples(trained, STEPS, "conv2", [3, 8], count=5)
    model = trained.load_model(STEPS)
    act = probe_activations(trained, model, trained.node("conv2"), torch.device("cpu"))
    for unit, found in examples.items():
        peaks = act[:, unit].flatten(1).max(1).values
        assert [e.index for e in found] == peaks.argsort(descending=True)[:5].tolist()
        assert [e.activation for e in found] == pytest.approx(
            peaks.sort(descending=True).values[:5].tolist()
        )
        for e in found:
            top, left, bottom, right = e.box
            assert e.image.shape == (32, 32, 3) and e.crop.shape == (bottom - top, right - left, 3)
            # conv1 (5x5) -> pool1 (2) -> conv2 (3x3): a 10-pixel receptive field inside the image
            assert bottom - top <= 10 and right - left <= 10


def test_dataset_examples_of_a_run_without_probe_images_say_how_to_get_them(tmp_path, tiny):
    with tb_microscope.Logger(tmp_path, tiny, torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    with pytest.raises(tb_microscope.MicroscopeError, match="no probe images; pass probe="):
        tb_microscope.dataset_examples(tb_microscope.open_run(tmp_path), 0, "conv1", [3])


def test_weights_next_to_a_convolution_are_its_kernel(trained):
    source, connections, strength = tb_microscope.unit_weights(trained, STEPS, "conv2", 6)
    assert source == "pool1"  # conv2 reads pooled conv1 units
    kernel = trained.load_state_dict(STEPS)["conv2.weight"][6].flatten(1)
    expected = (kernel.norm(dim=1) * torch.sign(kernel.sum(1))).numpy()
    np.testing.assert_allclose(strength, expected, rtol=1e-4, atol=1e-6)
    assert [c.unit for c in connections] == np.argsort(-np.abs(expected))[:8].tolist()
    source3, _, strength3 = tb_microscope.unit_weights(trained, STEPS, "conv3", 0)
    assert source3 == "pool2" and strength3.shape == (32,)
    _, _, through_relu = tb_microscope.unit_weights(trained, STEPS, "fc", 1, source="conv3")
    fc = trained.load_state_dict(STEPS)["fc.weight"][1]
    # fc reads the spatial mean of relu(conv3): linearized, a kernel of fc[1, c] / (8 * 8) each
    np.testing.assert_allclose(through_relu, (fc / 8).numpy(), rtol=1e-4, atol=1e-6)


def test_weights_from_a_module_called_twice_come_from_its_call_before_the_unit(tmp_path):
    class SharedPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 6, 3, padding=1)
            self.conv3 = torch.nn.Conv2d(6, 5, 3, padding=1)
            self.pool = torch.nn.MaxPool2d(2)

        def forward(self, x):
            return self.conv3(self.pool(self.conv2(self.pool(self.conv1(x)))))

    with tb_microscope.Logger(tmp_path, SharedPool(), torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    assert run.node("pool").calls == 2
    source, _, strength = tb_microscope.unit_weights(run, 0, "conv3", 1, source="pool")
    assert source == "pool" and strength.shape == (6,)  # the second call, after conv2, feeds it


class TwoPaths(torch.nn.Module):
    """Five stride-2 convolutions added to a 32 px average pool: they round odd sizes up, the
    pool down, so only some sizes run (multiples of 32 among them), as in DLA and HRNet."""

    def __init__(self):
        super().__init__()
        convs = [torch.nn.Conv2d(3 if i == 0 else 4, 4, 3, 2, 1) for i in range(5)]
        self.convs = torch.nn.Sequential(*convs)
        self.skip = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        fused = self.convs(x) + torch.nn.functional.avg_pool2d(self.skip(x), 32)
        return self.fc(fused.mean((2, 3)))


def test_a_model_that_runs_at_multiples_of_its_stride_only_is_rendered_on_a_larger_canvas(
    tmp_path,
):
    torch.manual_seed(0)
    model = TwoPaths()
    with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 64, 64)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    side = 128 + 2 * PAD
    with pytest.raises(RuntimeError, match="must match the size"):
        model(torch.rand(1, 3, side, side))  # the canvas a 128 px picture takes elsewhere
    rebuilt = run.load_model(0)
    canvas = fitted_canvas(rebuilt, run, 128, torch.device("cpu"))
    assert canvas.input == (160, 160) and canvas.image == 128 and canvas.padded
    result = tb_microscope.render(run, 0, "fc", [0, 1], size=128, iterations=2, model=rebuilt)
    assert result.images.shape == (2, 128, 128, 3) and np.isfinite(result.objective).all()


def test_unit_history_shows_the_unit_settling(trained):
    history = tb_microscope.unit_history(trained, "conv2", 3)
    assert [h["step"] for h in history] == trained.steps
    assert history[0]["weight_cosine"] is None and history[0]["activation_correlation"] is None
    cosines = [h["weight_cosine"] for h in history[1:]]
    assert all(-1 <= c <= 1 for c in cosines)
    assert cosines[-1] > cosines[0] or cosines[-1] > 0.99
    assert all(h["activation_correlation"] is not None for h in history[1:])


def test_render_command_is_resumable_and_ctrl_c_leaves_no_partial_file(trained, tmp_path):
    args = [
        "-m",
        "tb_microscope.cli",
        "render",
        trained.path.parent,
        "--steps",
        "0,150",
        "--nodes",
        "conv1",
        "--units",
        "0-3",
        "--size",
        "24",
        "--iterations",
        "8",
        "--cache-dir",
        tmp_path / "cache",
    ]
    first = run_python(*args)
    assert "8 units: 8 rendered, 0 were already cached" in first.stdout
    assert "units/s" in first.stderr
    again = run_python(*args)
    assert "8 units: 0 rendered, 8 were already cached" in again.stdout
    # two workers (as on two GPUs), each taking the next (step, node): the same files, bytes
    two = run_python(*args[:-1], tmp_path / "two", "--device", "cpu,cpu")
    assert "8 units: 8 rendered" in two.stdout
    counts = re.search(r"cpu \(worker 1\): (\d+), cpu \(worker 2\): (\d+)", two.stderr)
    assert counts and int(counts[1]) + int(counts[2]) == 8, two.stderr
    files = {
        p.relative_to(tmp_path / "cache"): p.read_bytes()
        for p in (tmp_path / "cache").rglob("*.png")
    }
    assert files == {
        p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.png")
    }

    slow = [str(a) for a in args[:-1]] + [
        str(tmp_path / "slow"),
        "--iterations",
        "400",
        "--batch-size",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, *slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job inherits SIGINT ignored; a person's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "slow").rglob("*.png")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "again to resume" in err
    leftovers = [p for p in (tmp_path / "slow").rglob("*") if p.name.startswith(".")]
    assert not leftovers
    done = list((tmp_path / "slow").rglob("*.png"))
    assert 1 <= len(done) < 8
    from PIL import Image

    for path in done:
        with Image.open(path) as png:
            assert png.size == (24, 24) and "tb_microscope" in png.text


def test_render_command_quality_preview_renders_the_tabs_previews(trained, tmp_path):
    from PIL import Image

    from tb_microscope.optvis.engine import QUALITIES

    args = ["-m", "tb_microscope.cli", "render", trained.path.parent, "--steps", "150"]
    args += ["--nodes", "conv1", "--units", "0-1", "--cache-dir", tmp_path]
    run_python(*args, "--quality", "preview", "--iterations", "4")
    (first, second) = sorted(tmp_path.rglob("*.png"))
    for path in (first, second):
        with Image.open(path) as png:
            assert png.size == (QUALITIES["preview"].size,) * 2
            assert json.loads(png.text["tb_microscope"])["key"]["iterations"] == 4
    refused = run_python(*args, "--quality", "best", check=False)
    assert refused.returncode == 2 and "invalid choice: 'best'" in refused.stderr


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--nodes", "nope"], "node 'nope' is not in run 'demo'; nodes: conv1"),
        (["--units", "abc"], "--units takes numbers and ranges"),
        (["--technique", "examples"], "draws no image"),
        (["--size", "3"], "--size must be a whole number of pixels from 8 to 1024, got 3"),
        (["--steps", "9999"], "matches no logged step (logged steps: demo: 0 1 2"),
    ],
)
def test_render_command_refuses_bad_arguments_before_rendering(trained, tmp_path, extra, words):
    proc = run_python(
        "-m",
        "tb_microscope.cli",
        "render",
        trained.path.parent,
        *extra,
        "--cache-dir",
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_a_restarted_servers_disk_budget_counts_every_cached_file_and_evicts_the_oldest(tmp_path):
    from tb_microscope.execution.cache import DiskBudget

    old, a, b, c = "1" * 32, "a" * 32, "b" * 32, "c" * 32
    sizes = {
        f"results/{old}.npz": 4000,
        f"step-3/{a}.png": 1000,
        f"results/{b}.json": 500,
        f"results/{c}.npz": 3000,
    }
    for age, (name, size) in enumerate(sizes.items()):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))  # oldest first
    (tmp_path / ".tmp-123").write_bytes(b"x" * 9999)  # not a cached file: not counted
    budget = DiskBudget(max_bytes=10_000)
    budget.track(tmp_path)
    assert budget.total == sum(sizes.values())  # the atlases' arrays too
    smaller = DiskBudget(max_bytes=6000)
    smaller.track(tmp_path)
    assert not (tmp_path / f"results/{old}.npz").exists()
    assert (tmp_path / f"results/{c}.npz").exists()
    assert smaller.total == 4500


FLOAT64_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_default_dtype(torch.float64)  # as a script that computes in double precision does
import tb_microscope
from tb_microscope.analysis.concepts import render_concepts
run = tb_microscope.open_run(sys.argv[1])
a = tb_microscope.render(run, 2, "conv2", [0, 1], size=16, iterations=4, device="cpu")
b = tb_microscope.render(
    run, 2, "conv2", [0], technique="diversity", size=16, iterations=4, device="cpu"
)
found = tb_microscope.concepts(run, 2, "pool2", count=3, cache_dir=sys.argv[2])
pictures = render_concepts(run, found, size=16, iterations=4, cache_dir=sys.argv[2])
print(a.images.dtype, a.images.shape, b.images.shape, pictures.shape)
"""


def test_rendering_works_where_the_default_dtype_is_float64(tmp_path):
    """torch.set_default_dtype is the process's: the images optimized are float32 whatever it
    is, as the model is (the script runs in a process of its own, not to change the tests')."""
    train(tmp_path / "demo", steps=2, log=lambda *_: None)
    proc = run_python("-c", FLOAT64_SCRIPT, tmp_path / "demo", tmp_path / "cache")
    assert proc.stdout.split("\n")[0] == "uint8 (2, 16, 16, 3) (4, 16, 16, 3) (3, 16, 16, 3)"
