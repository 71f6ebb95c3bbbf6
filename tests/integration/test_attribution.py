"""Attribution (Captum's methods on a unit's channel objective) and caricatures, on runs logged
with the real Logger."""

import sys

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, IntegratedGradients, Saliency
from PIL import Image
from torch import nn

import tb_microscope
from conftest import run_python
from tb_microscope import ImageIndexError, MicroscopeError
from tb_microscope.analysis.attribution import METHODS
from tb_microscope.optvis.engine import RenderCancelled
from tb_microscope.optvis.param import InputSpace
from tb_microscope.optvis.tap import NodeTap

SIZE = 16
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def top_left(height: int, width: int, device=None) -> torch.Tensor:
    """True in the top-left quadrant of a height x width image."""
    rows = torch.arange(height, device=device) < height // 2
    cols = torch.arange(width, device=device) < width // 2
    return rows[:, None] & cols[None, :]


class Corner(nn.Module):
    """Unit 0 reads only the top-left quadrant of the image; units 1 to 3 read all of it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.corner = nn.Conv2d(8, 1, 3, padding=1)
        self.whole = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        inside = top_left(x.shape[-2], x.shape[-1], x.device)
        corner = self.corner(self.relu(self.stem(x * inside)))
        return torch.cat([corner, self.whole(self.relu(self.stem(x)))], 1)


class CornerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Corner()
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.relu(self.block(x)).mean((2, 3)))


def normalized(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def corner(tmp_path_factory):
    """A run of CornerNet (normalized inputs, 6 probe images) and the eager model logged."""
    torch.manual_seed(0)
    model = CornerNet().eval()
    images = torch.rand(6, 3, SIZE, SIZE)
    run_dir = tmp_path_factory.mktemp("runs") / "corner"
    probe = normalized(images)
    with tb_microscope.Logger(
        run_dir, model, probe[:2], steps=[0], probe=probe, normalize=(MEAN, STD)
    ) as logger:
        logger.log(0)
    return tb_microscope.open_run(run_dir), model


def inside_share(attribution: np.ndarray) -> float:
    """The share of the attribution's mass (sum of |values|) in the top-left quadrant."""
    mass = np.abs(attribution)
    return float(mass[top_left(*mass.shape).numpy()].sum() / mass.sum())


@pytest.mark.parametrize("method", METHODS)
def test_the_attribution_of_a_unit_that_sees_a_quadrant_lies_in_that_quadrant(corner, method):
    run, _ = corner
    for image in range(3):
        found = tb_microscope.attribution(run, 0, "block", 0, image, method=method, device="cpu")
        assert found.shape == (SIZE, SIZE) and found.dtype == np.float32
        assert np.abs(found).sum() > 0
        assert inside_share(found) >= 0.9, (method, image, inside_share(found))
        # a unit that reads the whole image is attributed all over it
        whole = tb_microscope.attribution(run, 0, "block", 1, image, method=method, device="cpu")
        assert inside_share(whole) < 0.6, (method, image, inside_share(whole))


class EagerObjective(nn.Module):
    """The unit's channel objective on the eager model, written out: the mean of its map (of
    the node's last call in a forward)."""

    def __init__(self, model: nn.Module, node: str, unit: int):
        super().__init__()
        self.model, self.node, self.unit = model, node, unit

    def forward(self, x):
        found = []
        module = self.model.get_submodule(self.node)
        handle = module.register_forward_hook(lambda m, a, out: found.append(out))
        try:
            self.model(x)
        finally:
            handle.remove()
        return found[-1][:, self.unit].mean((1, 2))


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
@pytest.mark.parametrize("node, unit", [("block", 0), ("block", 2), ("block.relu", 5)])
def test_attributions_are_captums_on_the_eager_model(corner, node, unit):
    run, model = corner
    image = 4
    x = normalized(run.probe_images()[image : image + 1].float() / 255).requires_grad_(True)
    objective = EagerObjective(model, node, unit)
    grey = normalized(torch.full_like(x, 0.5))
    captum = {
        "integrated_gradients": IntegratedGradients(objective).attribute(x, baselines=grey),
        "saliency": Saliency(objective).attribute(x, abs=False),
        "guided_backprop": GuidedBackprop(objective).attribute(x),
    }
    ours = {
        method: tb_microscope.attribution(run, 0, node, unit, image, method=method, device="cpu")
        for method in METHODS
    }
    for method, theirs in captum.items():
        theirs = theirs.detach().sum(1)[0].numpy()
        scale = np.abs(theirs).max()
        assert scale > 0
        np.testing.assert_allclose(ours[method], theirs, rtol=1e-4, atol=1e-5 * scale)
    if node == "block":  # a ReLU module runs before it (at block.relu, the node's own only)
        # guided backprop changed its gradient in the model read back from the run
        assert not np.allclose(ours["guided_backprop"], ours["saliency"])
    # integrated gradients from grey: the pixels add up to the objective's change from grey
    with torch.no_grad():
        change = float(objective(x) - objective(grey))
    assert abs(change) > 1e-3
    assert ours["integrated_gradients"].sum() == pytest.approx(change, rel=0.02, abs=1e-4)


def test_an_image_tensor_in_image_space_is_attributed_as_its_probe_image(corner):
    run, model = corner
    probe = run.probe_images()[1]
    by_index = tb_microscope.attribution(run, 0, "block", 2, 1, method="saliency", device="cpu")
    for image in (probe, probe[None], probe.float() / 255):
        found = tb_microscope.attribution(
            run, 0, "block", 2, image, method="saliency", device="cpu", model=model
        )
        np.testing.assert_allclose(found, by_index, rtol=1e-5, atol=1e-7)
    larger = torch.rand(3, 24, 20)  # any size the model takes
    assert tb_microscope.attribution(run, 0, "block", 2, larger, device="cpu").shape == (24, 20)
    with pytest.raises(ValueError, match=r"image space, floats in \[0, 1\]"):
        tb_microscope.attribution(run, 0, "block", 2, normalized(probe[None] / 255), device="cpu")
    with pytest.raises(ValueError, match="3 x H x W"):
        tb_microscope.attribution(run, 0, "block", 2, torch.rand(1, SIZE, SIZE), device="cpu")


def test_attribution_errors_say_what_was_wrong(corner, tmp_path, tiny, example):
    run, _ = corner
    with pytest.raises(
        ValueError, match="methods: integrated_gradients, saliency, guided_backprop"
    ):
        tb_microscope.attribution(run, 0, "block", 0, 0, method="gradcam")
    with pytest.raises(ImageIndexError, match="probe image 6 is out of range .* 6 probe images"):
        tb_microscope.attribution(run, 0, "block", 0, 6, device="cpu")
    with pytest.raises(IndexError):
        tb_microscope.attribution(run, 0, "block", 0, -1, device="cpu")
    with pytest.raises(tb_microscope.UnitIndexError, match="unit 4 is out of range"):
        tb_microscope.attribution(run, 0, "block", 4, 0, device="cpu")
    with pytest.raises(TypeError, match="a probe image index .* or an image tensor"):
        tb_microscope.attribution(run, 0, "block", 0, "0", device="cpu")
    with pytest.raises(RenderCancelled):
        tb_microscope.attribution(run, 0, "block", 0, 0, device="cpu", should_stop=lambda: True)
    with tb_microscope.Logger(tmp_path / "bare", tiny, example, steps=[0]) as logger:
        logger.log(0)
    bare = tb_microscope.open_run(tmp_path / "bare")
    with pytest.raises(MicroscopeError, match="has no probe images; pass probe="):
        tb_microscope.attribution(bare, 0, "conv2", 0, 0, device="cpu")
    # an image tensor needs no probe
    found = tb_microscope.attribution(bare, 0, "conv2", 0, example[0], device="cpu")
    assert found.shape == example.shape[2:]


def test_a_missing_captum_is_named_with_the_extra_to_install(corner, monkeypatch):
    run, _ = corner
    monkeypatch.setitem(sys.modules, "captum", None)  # what an environment without it imports
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(MicroscopeError, match=r"pip install 'tb-microscope\[attribution\]'"):
        tb_microscope.attribution(run, 0, "block", 0, 0, device="cpu")


def test_guided_backprop_without_relu_modules_says_it_is_the_gradient(tmp_path, tiny, example):
    # TinyCNN calls torch.relu: no nn.ReLU module for Captum to guide
    with tb_microscope.Logger(tmp_path, tiny, example, steps=[0], probe=example) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    with pytest.warns(UserWarning, match="no nn.ReLU module runs before it"):
        guided = tb_microscope.attribution(run, 0, "conv2", 3, 1, method="guided_backprop")
    plain = tb_microscope.attribution(run, 0, "conv2", 3, 1, method="saliency")
    np.testing.assert_allclose(guided, plain)


class Edges(nn.Module):
    """Two valid convolutions with zero-mean filters and no bias: grey and flat images leave
    the node silent, so the cosine of two images' activations says how alike they are."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight -= conv.weight.mean((1, 2, 3), keepdim=True)
                conv.bias.zero_()

    def forward(self, x):
        return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))).mean((2, 3)))


def waves(count: int, size: int) -> torch.Tensor:
    """Coloured waves of random direction and frequency, each with a blob: probe images that
    differ from one another."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(count):
        angle, frequency = torch.rand(2, generator=g) * torch.tensor([3.14, 0.4]) + 0.2
        wave = torch.sin(frequency * (xs * torch.cos(angle) + ys * torch.sin(angle)))
        colour = torch.rand(3, 1, 1, generator=g)
        y, x = torch.randint(0, size, (2,), generator=g)
        blob = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 40.0)
        out.append((0.5 + 0.25 * wave * colour + 0.4 * blob * (colour - 0.5)).clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("runs") / "edges"
    probe = waves(6, 32)
    with tb_microscope.Logger(run_dir, Edges(), probe[:2], steps=[0], probe=probe) as logger:
        logger.log(0)
    return tb_microscope.open_run(run_dir)


def test_a_caricature_has_its_probe_images_activations_exaggerated(edges):
    run = edges
    model = run.load_model(0)
    tap = NodeTap(model, run.node("conv2"))
    space = InputSpace(run.input_spec, torch.device("cpu"))

    def activations(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tap(space(images)).maps.flatten(1)

    probe = run.probe_images().float() / 255
    noise = activations(torch.rand(8, 3, 32, 32))
    for image in (0, 2):
        result = tb_microscope.render(
            run, 0, "conv2", [], "caricature", image=image, size=32, iterations=64, device="cpu"
        )
        assert result.units == [image] and result.technique == "caricature"
        picture = torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255
        target = activations(probe[image : image + 1])
        got = activations(picture)
        cosine = float(torch.cosine_similarity(got, target))
        # measured 0.88 for both (0.81 to 0.88 over the six probe images); noise images 0.06
        # at most; other probe images up to 0.95 (two of the six are alike)
        assert cosine > 0.75, cosine
        assert torch.cosine_similarity(noise, target).max() < 0.3
        assert got.norm() > target.norm()  # exaggerated: the same direction, stronger
        assert result.activation[0] == pytest.approx(cosine, abs=0.02)  # what it reports
    again = tb_microscope.render(
        run, 0, "conv2", [2], "caricature", size=32, iterations=64, device="cpu"
    )
    np.testing.assert_array_equal(again.images, result.images)  # image=i is units=[i]


def test_a_caricature_is_deterministic_per_seed_node_and_image_and_needs_one(
    edges, tmp_path, tiny, example
):
    run = edges
    first, second = (
        tb_microscope.render(
            run, 0, "conv2", [], "caricature", image=1, size=24, iterations=8, device="cpu"
        )
        for _ in range(2)
    )
    np.testing.assert_array_equal(first.images, second.images)
    pair = tb_microscope.render(
        run, 0, "conv2", [0, 1], "caricature", size=24, iterations=8, device="cpu"
    )
    assert pair.units == [0, 1]
    np.testing.assert_array_equal(pair.images[1], first.images[0])  # whatever its batch-mates
    other = tb_microscope.render(
        run, 0, "conv2", [], "caricature", image=1, size=24, iterations=8, seed=1, device="cpu"
    )
    assert not np.array_equal(other.images, first.images)  # the seed is part of its noise
    with pytest.raises(ImageIndexError, match="probe image 6 is out of range"):
        tb_microscope.render(run, 0, "conv2", [], "caricature", image=6, size=24, iterations=8)
    with pytest.raises(ValueError, match="needs a probe image: pass image="):
        tb_microscope.render(run, 0, "conv2", [], "caricature", size=24, iterations=8)
    with pytest.raises(ValueError, match="image= names the probe image of a caricature"):
        tb_microscope.render(run, 0, "conv2", [0], "channel", image=1, size=24, iterations=8)
    with tb_microscope.Logger(tmp_path, tiny, example, steps=[0]) as logger:
        logger.log(0)
    bare = tb_microscope.open_run(tmp_path)
    with pytest.raises(MicroscopeError, match="has no probe images"):
        tb_microscope.render(bare, 0, "conv2", [], "caricature", image=0, size=24, iterations=8)


def test_the_render_command_draws_caricatures_of_the_probe_images_named_by_units(
    edges, tmp_path, tiny, example
):
    args = ["-m", "tb_microscope.cli", "render", edges.path, "--technique", "caricature"]
    args += ["--nodes", "conv2", "--units", "1,4", "--size", "24", "--iterations", "8"]
    args += ["--cache-dir", tmp_path / "c"]
    proc = run_python(*args)
    assert "2 units: 2 rendered, 0 were already cached" in proc.stdout, proc.stdout
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in (tmp_path / "c").rglob("*.png")]
    engine = tb_microscope.render(
        edges, 0, "conv2", [1, 4], "caricature", size=24, iterations=8, device="cpu"
    )
    assert len(pictures) == 2
    assert any(np.array_equal(p, engine.images[0]) for p in pictures)
    assert any(np.array_equal(p, engine.images[1]) for p in pictures)
    with tb_microscope.Logger(tmp_path / "bare", tiny, example, steps=[0]) as logger:
        logger.log(0)
    refused = run_python(*args[:3], tmp_path / "bare", *args[4:], check=False)
    assert refused.returncode == 2, refused.stderr
    assert "--technique caricature draws probe images" in refused.stderr
    assert "has no probe images" in refused.stderr
