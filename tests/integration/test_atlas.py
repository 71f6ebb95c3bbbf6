"""Activation atlases on runs logged with the real Logger: a small network trained a little on
two kinds of generated images (stripes, smooth blobs), atlases of its channels-first,
channels-last, token and vector nodes."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tb_microscope
from tb_microscope import MicroscopeError, NodeNotFoundError, StepNotFoundError
from tb_microscope.analysis import embedding
from tb_microscope.analysis.atlas import nearest_units, sample_sources
from tb_microscope.cli import main
from tb_microscope.execution.cache import RenderCache
from tb_microscope.optvis.engine import RenderCancelled

SIZE = 32
STEPS = [0, 20]
FAST = {"size": 16, "iterations": 6, "device": "cpu"}  # cheap pictures: the atlas is under test


class Mixed(nn.Module):
    """Convolutions (channels first), a linear layer on their maps laid out channels last, a
    token layer over those positions with a leading summary token, and a vector head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=4, padding=1)  # 8 x 8 positions at 32 px
        self.mix = nn.Linear(16, 12)
        self.summary = nn.Parameter(torch.zeros(1, 1, 12))
        self.tokens = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y = torch.relu(self.mix(y.permute(0, 2, 3, 1)))  # N x H x W x 12
        t = y.flatten(1, 2)
        t = torch.relu(self.tokens(torch.cat([t.mean(1, keepdim=True) + self.summary, t], 1)))
        return self.head(t[:, 0])


def kinds(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images, half of thin horizontal stripes, half of smooth colour blobs, and their
    kinds (0: stripes, 1: blobs)."""
    half = count // 2
    rows = torch.arange(SIZE).view(1, 1, SIZE, 1)
    phase = torch.randint(0, 4, (half, 1, 1, 1), generator=generator)
    on = 0.6 + 0.4 * torch.rand(half, 3, 1, 1, generator=generator)
    off = 0.2 * torch.rand(half, 3, 1, 1, generator=generator)
    stripes = torch.where(((rows + phase) // 2) % 2 == 1, on, off).expand(-1, -1, -1, SIZE)
    stripes = stripes + 0.05 * torch.rand(half, 3, SIZE, SIZE, generator=generator)
    coarse = torch.rand(count - half, 3, 3, 3, generator=generator)
    blobs = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic")
    images = torch.cat([stripes.clamp(0, 1), blobs.clamp(0, 1)])
    return images, torch.cat([torch.zeros(half), torch.ones(count - half)]).long()


def log_run(run_dir, probe: torch.Tensor | None, labels: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Mixed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with tb_microscope.Logger(run_dir, model, torch.rand(2, 3, SIZE, SIZE), steps=STEPS,
                              probe=probe) as logger:  # fmt: skip
        for step in range(STEPS[-1] + 1):
            logger.log(step)
            loss = nn.functional.cross_entropy(model(images_for_training), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


images_for_training, training_kinds = kinds(64, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run with 64 probe images (32 of each kind), logged at steps 0 and 20; their kinds."""
    probe, probe_kinds = kinds(64, torch.Generator().manual_seed(2))
    run_dir = tmp_path_factory.mktemp("runs") / "mixed"
    log_run(run_dir, probe, training_kinds)
    return tb_microscope.open_run(run_dir), probe_kinds.numpy()


@pytest.fixture(scope="module")
def cache(logged, tmp_path_factory):
    return RenderCache(logged[0], tmp_path_factory.mktemp("cache"))


def test_an_atlas_has_the_interfaces_shapes_and_types(logged, cache):
    run, _ = logged
    atlas = tb_microscope.activation_atlas(
        run, 20, "conv2", grid=6, layout_method="pca", cache_dir=cache, **FAST
    )
    assert isinstance(atlas, tb_microscope.Atlas)
    assert atlas.image.dtype == np.uint8 and atlas.image.shape == (6 * 16, 6 * 16, 3)
    m = len(atlas.coords)
    assert atlas.coords.dtype == np.float32 and atlas.coords.shape == (m, 2)
    assert 0 <= atlas.coords.min() and atlas.coords.max() <= 1
    assert atlas.sources.shape == (m, 3) and np.issubdtype(atlas.sources.dtype, np.integer)
    assert m == 64 * 64  # 8 x 8 positions of each of 64 images: all of them
    assert set(atlas.sources[:, 0]) == set(range(64))
    assert atlas.sources[:, 1:].min() >= 0 and atlas.sources[:, 1:].max() < 8
    assert (atlas.step, atlas.layout_step, atlas.layout_method, atlas.grid) == (20, 20, "pca", 6)
    assert atlas.cells and sum(c.count for c in atlas.cells) <= m
    places = {(c.row, c.col) for c in atlas.cells}
    assert len(places) == len(atlas.cells)
    for cell in atlas.cells:
        assert 0 <= cell.row < 6 and 0 <= cell.col < 6 and cell.count >= 3
        assert cell.direction.shape == (16,) and cell.image.shape == (16, 16, 3)
        assert cell.image.dtype == np.uint8
        tile = atlas.image[cell.row * 16 : cell.row * 16 + 16, cell.col * 16 : cell.col * 16 + 16]
        assert np.array_equal(tile, cell.image)
        assert len(set(cell.examples)) == len(cell.examples) and cell.examples
        assert len(set(cell.units)) == 3 and all(0 <= u < 16 for u in cell.units)
        # the direction is the mean activation of the cell's samples
        inside = np.all(atlas.sample_cells() == (cell.row, cell.col), axis=1)
        assert inside.sum() == cell.count
        assert set(cell.examples) == set(atlas.sources[inside, 0])
    empty = [(r, c) for r in range(6) for c in range(6) if (r, c) not in places]
    for r, c in empty:
        assert (atlas.image[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] == 255).all()
    as_json = json.loads(json.dumps(atlas.to_dict()))
    assert len(as_json["cells"]) == len(atlas.cells) and len(as_json["sources"]) == m
    assert [c["units"] for c in as_json["cells"]] == [c.units for c in atlas.cells]
    # the plain mean direction, unwhitened, draws other pictures of the same cells
    plain = tb_microscope.activation_atlas(
        run, 20, "conv2", grid=6, layout_method="pca", whiten=False, cache_dir=cache, **FAST
    )
    assert [(c.row, c.col) for c in plain.cells] == [(c.row, c.col) for c in atlas.cells]
    assert not np.array_equal(plain.image, atlas.image)


def test_a_cells_nearest_units_are_those_it_lies_furthest_above_the_mean_along():
    rng = np.random.default_rng(0)
    activations = rng.normal(size=(300, 6))
    activations[:, 0] += 10  # fires strongly everywhere
    activations[:50, 3] += 4  # a cluster raised on unit 3, less on unit 5
    activations[:50, 5] += 2
    activations[:, 4] *= 0.01  # barely varies
    directions = np.stack([activations[:50].mean(0), activations[50:].mean(0)])
    nearest = nearest_units(directions, activations)
    assert nearest.shape == (2, 3) and nearest[0, :2].tolist() == [3, 5]
    assert 0 not in nearest[0, :2]  # the mean is the origin, not zero
    assert nearest_units(directions, activations, count=10).shape == (2, 6)


def test_the_layout_is_kept_over_training_and_only_pictures_and_directions_change(logged, cache):
    run, _ = logged
    early, late = (
        tb_microscope.activation_atlas(
            run, step, "conv2", grid=6, layout_method="pca", cache_dir=cache, **FAST
        )
        for step in (0, 20)
    )
    assert early.layout_step == late.layout_step == 20
    assert np.array_equal(early.coords, late.coords)
    assert np.array_equal(early.sources, late.sources)
    assert [(c.row, c.col, c.count) for c in early.cells] == [
        (c.row, c.col, c.count) for c in late.cells
    ]
    assert [set(c.examples) for c in early.cells] == [set(c.examples) for c in late.cells]
    assert not np.allclose(
        np.stack([c.direction for c in early.cells]), np.stack([c.direction for c in late.cells])
    )
    assert not np.array_equal(early.image, late.image)
    # a layout fitted at step 0 places the same samples elsewhere
    other = tb_microscope.activation_atlas(
        run, 20, "conv2", grid=6, layout_method="pca", layout_step=0, cache_dir=cache, **FAST
    )
    assert np.array_equal(other.sources, late.sources)
    assert not np.allclose(other.coords, late.coords)


def test_atlases_are_deterministic_and_cached(logged, tmp_path):
    run, _ = logged
    options = dict(grid=5, layout_method="pca", seed=3, **FAST)
    first = tb_microscope.activation_atlas(
        run, 0, "conv2", cache_dir=str(tmp_path / "a"), **options
    )
    again = tb_microscope.activation_atlas(
        run, 0, "conv2", cache_dir=str(tmp_path / "b"), **options
    )
    assert np.array_equal(first.image, again.image)
    assert np.array_equal(first.coords, again.coords)
    # the same call again reads the cache: nothing is computed, so nothing asks to stop
    cached = tb_microscope.activation_atlas(
        run, 0, "conv2", cache_dir=str(tmp_path / "a"), should_stop=lambda: True, **options
    )
    assert np.array_equal(cached.image, first.image)
    assert [c.examples for c in cached.cells] == [c.examples for c in first.cells]
    assert all(np.array_equal(a.direction, b.direction) for a, b in zip(cached.cells, first.cells))
    # another seed samples other positions
    seeded = sample_sources(64, (8, 8), 4, 1024)
    assert not np.array_equal(seeded, sample_sources(64, (8, 8), 3, 1024))
    assert np.array_equal(seeded, sample_sources(64, (8, 8), 4, 1024))


def test_progress_and_cancelling(logged, tmp_path):
    run, _ = logged
    heard = []
    tb_microscope.activation_atlas(
        run, 0, "mix", grid=4, layout_method="pca", cache_dir=str(tmp_path), progress=heard.append,
        **FAST,
    )  # fmt: skip
    assert heard[0] == 0 and heard[-1] == 1 and heard == sorted(heard)
    asked = []
    with pytest.raises(RenderCancelled):
        tb_microscope.activation_atlas(
            run, 0, "mix", grid=5, layout_method="pca", cache_dir=str(tmp_path),
            should_stop=lambda: asked.append(1) or len(asked) > 3, **FAST,
        )  # fmt: skip


@pytest.mark.parametrize(
    "node, units, positions",
    [("mix", 12, (8, 8)), ("tokens", 12, (8, 8)), ("head", 2, None)],
)
def test_channels_last_token_and_vector_nodes(logged, cache, node, units, positions):
    run, _ = logged
    layout = {"mix": "channels_last", "tokens": "tokens", "head": "vector"}[node]
    assert run.node(node).layout == layout
    atlas = tb_microscope.activation_atlas(
        run, 20, node, grid=4, layout_method="pca", min_count=1, cache_dir=cache, **FAST
    )
    assert atlas.cells and atlas.image.shape == (64, 64, 3)
    assert all(c.direction.shape == (units,) for c in atlas.cells)
    if positions is None:  # one activation per image, no position
        assert len(atlas.sources) == 64 and (atlas.sources[:, 1:] == -1).all()
    else:
        assert len(atlas.sources) == 64 * 64
        assert atlas.sources[:, 1].max() == positions[0] - 1
    assert sum(c.count for c in atlas.cells) == len(atlas.coords)  # min_count=1: every sample


def purity(atlas, probe_kinds: np.ndarray) -> float:
    """The share of sampled activations whose cell holds more of their own kind than of the
    other."""
    kind = probe_kinds[atlas.sources[:, 0]]
    where = atlas.sample_cells()
    flat = where[:, 0] * atlas.grid + where[:, 1]
    return sum(np.bincount(kind[flat == cell]).max() for cell in np.unique(flat)) / len(flat)


def test_umap_lays_the_two_kinds_apart(logged, cache):
    run, probe_kinds = logged
    atlas = tb_microscope.activation_atlas(
        run, 20, "conv2", grid=8, samples=1024, cache_dir=cache, **FAST
    )
    assert atlas.layout_method == "umap" and len(atlas.coords) == 1024
    assert purity(atlas, probe_kinds) > 0.9
    # a cell's most typical example is of the kind most of its samples are
    kind = probe_kinds[atlas.sources[:, 0]]
    where = atlas.sample_cells()
    agree = [
        probe_kinds[cell.examples[0]]
        == np.bincount(kind[np.all(where == (cell.row, cell.col), axis=1)]).argmax()
        for cell in atlas.cells
    ]
    assert np.mean(agree) >= 0.9
    again = tb_microscope.activation_atlas(
        run, 0, "conv2", grid=8, samples=1024, cache_dir=cache, **FAST
    )
    assert np.array_equal(again.coords, atlas.coords)  # the layout at step 20, kept


def test_pca_without_umap_also_lays_the_two_kinds_apart(logged, cache):
    run, probe_kinds = logged
    atlas = tb_microscope.activation_atlas(
        run, 20, "conv2", grid=8, layout_method="pca", cache_dir=cache, **FAST
    )
    assert atlas.layout_method == "pca" and purity(atlas, probe_kinds) > 0.9


def test_without_umap_learn_auto_falls_back_to_pca_and_says_so(logged, cache, monkeypatch):
    run, _ = logged
    monkeypatch.setitem(sys.modules, "umap", None)  # what Python does for a module not there
    monkeypatch.setattr(embedding, "_warned", False)
    with pytest.warns(UserWarning, match=r"tb-microscope\[atlas\]"):
        atlas = tb_microscope.activation_atlas(run, 20, "mix", grid=4, cache_dir=cache, **FAST)
    assert atlas.layout_method == "pca"
    with pytest.raises(MicroscopeError, match=r"umap-learn.*tb-microscope\[atlas\]"):
        tb_microscope.activation_atlas(run, 20, "mix", layout_method="umap", **FAST)


def test_mistakes_are_told(logged, tmp_path):
    run, _ = logged
    for grid in (1, 51, 2.5):
        with pytest.raises(ValueError, match="grid must be"):
            tb_microscope.activation_atlas(run, 20, "conv2", grid=grid, **FAST)
    with pytest.raises(NodeNotFoundError):
        tb_microscope.activation_atlas(run, 20, "conv9", **FAST)
    with pytest.raises(StepNotFoundError):
        tb_microscope.activation_atlas(run, 7, "conv2", **FAST)
    with pytest.raises(StepNotFoundError):
        tb_microscope.activation_atlas(run, 20, "conv2", layout_step=7, **FAST)
    with pytest.raises(ValueError, match="layout method"):
        tb_microscope.activation_atlas(run, 20, "conv2", layout_method="tsne", **FAST)
    bare = tmp_path / "bare"
    log_run(bare, None, training_kinds)
    with pytest.raises(MicroscopeError, match="no probe images.*probe="):
        tb_microscope.activation_atlas(tb_microscope.open_run(bare), 20, "conv2", **FAST)


def test_the_cli_writes_the_atlas_as_a_png(logged, tmp_path, capsys):
    run, _ = logged
    out = tmp_path / "atlas.png"
    argv = ["atlas", str(run.path), "--step", "0", "--node", "tokens", "--grid", "5"]
    argv += ["--size", "16", "--iterations", "4", "--layout", "pca", "--device", "cpu"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    assert main(argv) == 0
    with Image.open(out) as png:
        assert png.size == (80, 80) and png.mode == "RGB"
    assert "tokens at step 0" in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "atlas.jpg")]) == 2
    assert main([*argv[:2], "--step", "0", "--node", "tokens", "--grid", "60", "-o", str(out)]) == 2
    assert "grid must be" in capsys.readouterr().err
