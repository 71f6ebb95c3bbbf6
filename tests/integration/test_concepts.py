"""Concepts on runs logged with the real Logger, from a model with a planted dictionary.

The model's first layer detects four colours (red, green, blue, yellow), each a non-negative
feature map; its node `mix` is a fixed non-negative mixture of those four features into twelve
units, so that every unit answers to several colours (polysemantic) and the four concepts are
the mixing matrix's columns, known. Each probe image shows one colour (a quarter of them two),
so each planted direction is active on its own images. At step 1 the mixture is another one: the
same four concepts, in other directions."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tb_microscope
from tb_microscope import MicroscopeError, NodeNotFoundError, StepNotFoundError
from tb_microscope.analysis.concepts import (
    concept_attribution,
    concept_examples,
    render_concepts,
)
from tb_microscope.cli import main
from tb_microscope.execution.cache import RenderCache
from tb_microscope.optvis.engine import RenderCancelled

SIZE = 16  # 8 x 8 positions after the pooling: 64 images give 4,096 activations, all sampled
KINDS = 4
UNITS = 12
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
# colour detectors, ReLU(w . rgb + b): each fires on its colour alone
DETECT_W = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -2]])
DETECT_B = torch.tensor([0.0, 0, 0, -1])


def planted(seed: int, signed: bool = False) -> torch.Tensor:
    """UNITS x KINDS: each unit mixes two to four colours; columns are the planted concepts."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(UNITS, KINDS, generator=g) + 0.2
    weights = weights * (torch.rand(UNITS, KINDS, generator=g) < 0.7)
    weights[:KINDS] += torch.eye(KINDS)  # no concept is left out, however the draw fell
    if signed:
        weights = torch.randn(UNITS, KINDS, generator=g)
    return weights


class Planted(nn.Module):
    """`mix` (channels first, the planted non-negative mixture), `last` (the same, channels
    last), `summary` (its mean over positions: a vector) and `signed` (a signed mixture)."""

    def __init__(self, mixing: torch.Tensor, signed: torch.Tensor):
        super().__init__()
        self.detect = nn.Conv2d(3, KINDS, 1)
        self.pool = nn.AvgPool2d(2)
        self.mix = nn.Conv2d(KINDS, UNITS, 1, bias=False)
        self.last = nn.Linear(UNITS, UNITS)
        self.summary = nn.Linear(UNITS, UNITS)
        self.signed = nn.Conv2d(KINDS, UNITS, 1, bias=False)
        self.head = nn.Linear(3 * UNITS, 2)
        with torch.no_grad():
            self.detect.weight.copy_(DETECT_W[:, :, None, None])
            self.detect.bias.copy_(DETECT_B)
            self.mix.weight.copy_(mixing[:, :, None, None])
            for identity in (self.last, self.summary):
                identity.weight.copy_(torch.eye(UNITS))
                identity.bias.zero_()
            self.signed.weight.copy_(signed[:, :, None, None])

    def forward(self, x):
        features = self.pool(torch.relu(self.detect(x)))
        mixed = self.mix(features)
        last = self.last(mixed.permute(0, 2, 3, 1))  # N x H x W x UNITS
        summary = self.summary(mixed.mean((2, 3)))
        signed = self.signed(features)
        return self.head(torch.cat([summary, last.mean((1, 2)), signed.mean((2, 3))], 1))


def probe_images(count: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """`count` images on black, each a rectangle of one colour at varying strength (the last
    quarter with a second colour's band below it), and which colours each shows (count x
    KINDS, bool)."""
    g = torch.Generator().manual_seed(7)
    images = torch.zeros(count, 3, SIZE, SIZE)
    kinds = np.arange(count) % KINDS
    shows = np.eye(KINDS, dtype=bool)[kinds]
    for i, kind in enumerate(kinds):
        top, left = torch.randint(0, 5, (2,), generator=g).tolist()
        strength = 0.7 + 0.3 * torch.rand(1, SIZE, SIZE, generator=g)
        images[i, :, top : top + 10, left : left + 10] = (COLOURS[kind][:, None, None] * strength)[
            :, top : top + 10, left : left + 10
        ]
        if i >= 3 * count // 4:
            other = (kind + 1 + i % (KINDS - 1)) % KINDS
            images[i, :, 11:, :] = COLOURS[other][:, None, None] * strength[:, 11:, :]
            shows[i, other] = True
    return images, shows


MIXING = {0: planted(0), 1: planted(1)}
SIGNED = planted(2, signed=True)
FAST = {"size": 16, "iterations": 4, "device": "cpu"}


def log_run(run_dir, probe: torch.Tensor | None) -> None:
    model = Planted(MIXING[0], SIGNED)
    with tb_microscope.Logger(
        run_dir, model, torch.rand(2, 3, SIZE, SIZE), steps=[0, 1], probe=probe
    ) as logger:
        logger.log(0)
        with torch.no_grad():  # another mixture of the same concepts
            model.mix.weight.copy_(MIXING[1][:, :, None, None])
        logger.log(1)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    probe, shows = probe_images()
    run_dir = tmp_path_factory.mktemp("runs") / "planted"
    log_run(run_dir, probe)
    return tb_microscope.open_run(run_dir), shows


@pytest.fixture(scope="module")
def cache(logged, tmp_path_factory):
    return RenderCache(logged[0], tmp_path_factory.mktemp("cache"))


def cosines(directions: np.ndarray, mixing: torch.Tensor) -> np.ndarray:
    """count x KINDS: each concept's cosine with each planted direction."""
    columns = mixing.numpy().T
    columns = columns / np.linalg.norm(columns, axis=1, keepdims=True)
    return directions @ columns.T


@pytest.mark.parametrize("method", ["nmf", "sae"])
def test_nmf_and_the_sparse_autoencoder_recover_the_planted_directions(logged, cache, method):
    run, shows = logged
    found = tb_microscope.concepts(run, 1, "mix", count=KINDS, method=method, cache_dir=cache)
    assert isinstance(found, tb_microscope.Concepts)
    assert (found.step, found.reference_step, found.method, found.node) == (1, 1, method, "mix")
    assert found.directions.shape == (KINDS, UNITS) and found.directions.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(found.directions, axis=1), 1, atol=1e-5)
    assert (found.directions >= -1e-6).all() or method == "sae"
    cos = cosines(found.directions, MIXING[1])
    planted_of = cos.argmax(1)
    assert sorted(planted_of) == list(range(KINDS))  # one concept per planted direction
    assert cos.max(1).min() > 0.97, cos
    assert found.explained > 0.95
    np.testing.assert_array_equal(found.similarity, np.ones(KINDS))  # at the reference itself
    assert found.top.shape == (KINDS, 8) and np.issubdtype(found.top.dtype, np.integer)
    for concept, top in enumerate(found.top):  # its strongest images show its colour
        assert shows[top, planted_of[concept]].all()
    assert found.codes.shape == (64 * 64, KINDS) and found.sources.shape == (64 * 64, 3)
    assert (found.codes >= 0).all()
    assert found.targets.shape == (KINDS, UNITS)
    as_dict = found.to_dict()
    assert as_dict["count"] == KINDS and len(as_dict["units"][0]) == 3
    assert as_dict["similarity"] == [1.0] * KINDS


def test_pca_recovers_the_planted_subspace_not_the_directions(logged, cache):
    run, _ = logged
    found = tb_microscope.concepts(run, 1, "mix", count=KINDS, method="pca", cache_dir=cache)
    assert found.explained > 0.999  # four axes span the activations exactly
    columns = MIXING[1].numpy().T
    columns = columns / np.linalg.norm(columns, axis=1, keepdims=True)
    inside = np.linalg.norm(columns @ found.directions.T, axis=1)  # the projections' lengths
    assert inside.min() > 0.999
    # but its axes are orthogonal and the planted directions are not: some planted direction
    # is no axis
    assert cosines(found.directions, MIXING[1]).max(0).min() < 0.95
    np.testing.assert_allclose(found.directions @ found.directions.T, np.eye(KINDS), atol=1e-5)


def test_concepts_are_matched_over_training_by_their_codes_not_their_directions(logged, cache):
    run, _ = logged
    for method in ("nmf", "sae"):
        final = tb_microscope.concepts(run, 1, "mix", count=KINDS, method=method, cache_dir=cache)
        early = tb_microscope.concepts(run, 0, "mix", count=KINDS, method=method, cache_dir=cache)
        assert early.reference_step == 1 and early.step == 0
        assert early.similarity.min() > 0.97, (method, early.similarity)
        # concept k is the same concept at both steps: it responds to the same positions
        for k in range(KINDS):
            assert np.corrcoef(early.codes[:, k], final.codes[:, k])[0, 1] > 0.97
        # the same planted concept, in each step's own mixture
        np.testing.assert_array_equal(
            cosines(early.directions, MIXING[0]).argmax(1),
            cosines(final.directions, MIXING[1]).argmax(1),
        )
        # though its direction moved
        moved = np.sum(early.directions * final.directions, axis=1)
        assert moved.max() < 0.9, (method, moved)
    # PCA's axes are matched too (flipped where their codes anticorrelate), but they are not
    # the concepts: each step's axes mix the concepts as that step's geometry has it
    early = tb_microscope.concepts(run, 0, "mix", count=KINDS, method="pca", cache_dir=cache)
    assert (early.similarity >= 0).all() and early.similarity.min() < 0.9
    # a reference of step 0 matches step 1 to it
    onto_zero = tb_microscope.concepts(
        run, 1, "mix", count=KINDS, reference_step=0, cache_dir=cache
    )
    assert onto_zero.reference_step == 0 and onto_zero.similarity.min() > 0.99


def test_fits_are_deterministic_for_a_seed_and_cached(logged, tmp_path):
    run, _ = logged
    for method in ("nmf", "sae"):
        first, again = (
            tb_microscope.concepts(
                run, 0, "mix", count=6, method=method, seed=3, cache_dir=str(tmp_path / name)
            )
            for name in (f"{method}-a", f"{method}-b")
        )
        np.testing.assert_array_equal(first.directions, again.directions)
        np.testing.assert_array_equal(first.codes, again.codes)
        np.testing.assert_array_equal(first.similarity, again.similarity)
        # the same call again reads both fits back: nothing is computed, nothing asks to stop
        cached = tb_microscope.concepts(
            run, 0, "mix", count=6, method=method, seed=3, cache_dir=str(tmp_path / f"{method}-a"),
            should_stop=lambda: True,
        )  # fmt: skip
        np.testing.assert_array_equal(cached.directions, first.directions)
        np.testing.assert_array_equal(cached.top, first.top)
    other = tb_microscope.concepts(
        run, 0, "mix", count=6, method="sae", seed=4, cache_dir=str(tmp_path / "sae-a")
    )
    assert not np.array_equal(other.directions, first.directions)
    asked = []
    with pytest.raises(RenderCancelled):
        tb_microscope.concepts(
            run, 0, "mix", count=5, cache_dir=str(tmp_path / "stop"),
            should_stop=lambda: asked.append(1) or len(asked) > 1,
        )  # fmt: skip


@pytest.mark.parametrize("node, layout", [("last", "channels_last"), ("summary", "vector")])
def test_channels_last_and_vector_nodes(logged, cache, node, layout):
    run, _ = logged
    assert run.node(node).layout == layout
    found = tb_microscope.concepts(run, 1, node, count=KINDS, cache_dir=cache)
    assert cosines(found.directions, MIXING[1]).max(1).min() > 0.97
    if layout == "vector":  # one activation per image, no position
        assert len(found.sources) == 64 and (found.sources[:, 1:] == -1).all()
    else:
        assert len(found.sources) == 64 * 64


def test_nmf_refuses_signed_activations_which_the_autoencoder_and_pca_take(logged, cache):
    run, _ = logged
    with pytest.raises(MicroscopeError, match=r"non-negative.*method='sae'.*method='pca'"):
        tb_microscope.concepts(run, 1, "signed", count=KINDS, cache_dir=cache)
    found = tb_microscope.concepts(run, 1, "signed", count=KINDS, method="sae", cache_dir=cache)
    assert np.abs(cosines(found.directions, SIGNED)).max(1).min() > 0.95
    assert found.explained > 0.9
    pca = tb_microscope.concepts(run, 1, "signed", count=KINDS, method="pca", cache_dir=cache)
    assert pca.explained > 0.999


def test_mistakes_are_told(logged, tmp_path, monkeypatch):
    run, _ = logged
    with pytest.raises(ValueError, match="concepts method 'ica' is not known; methods: nmf"):
        tb_microscope.concepts(run, 1, "mix", count=KINDS, method="ica")
    for count in (0, 257, 2.5):
        with pytest.raises(ValueError, match="count must be a whole number of concepts"):
            tb_microscope.concepts(run, 1, "mix", count=count)
    with pytest.raises(ValueError, match=r"at most the 12 units of node 'mix'.*method='sae'"):
        tb_microscope.concepts(run, 1, "mix", count=13)
    with pytest.raises(NodeNotFoundError):
        tb_microscope.concepts(run, 1, "mixer")
    with pytest.raises(StepNotFoundError):
        tb_microscope.concepts(run, 7, "mix", count=KINDS)
    with pytest.raises(StepNotFoundError):
        tb_microscope.concepts(run, 1, "mix", count=KINDS, reference_step=7)
    bare = tmp_path / "bare"
    log_run(bare, None)
    with pytest.raises(MicroscopeError, match="no probe images.*probe="):
        tb_microscope.concepts(tb_microscope.open_run(bare), 1, "mix", count=KINDS)
    monkeypatch.setitem(sys.modules, "overcomplete.sae", None)  # as for a module not there
    with pytest.raises(
        MicroscopeError, match=r"Overcomplete: pip install 'tb-microscope\[concepts"
    ):
        tb_microscope.concepts(run, 1, "mix", method="sae", cache_dir=str(tmp_path / "c"))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)
    with pytest.raises(
        MicroscopeError, match=r"scikit-learn: pip install 'tb-microscope\[concepts"
    ):
        tb_microscope.concepts(run, 1, "mix", count=KINDS, cache_dir=str(tmp_path / "c"))


def test_pictures_examples_and_attribution_of_concepts(logged, cache):
    run, shows = logged
    found = tb_microscope.concepts(run, 1, "mix", count=KINDS, cache_dir=cache)
    pictures = render_concepts(run, found, size=16, iterations=48, device="cpu", cache_dir=cache)
    assert pictures.shape == (KINDS, 16, 16, 3) and pictures.dtype == np.uint8
    # each concept's picture is drawn in its colour: red, green, blue or yellow
    colour_of = cosines(found.directions, MIXING[1]).argmax(1)
    for picture, colour in zip(pictures, colour_of):
        mean = picture.reshape(-1, 3).astype(float).mean(0)
        wanted = COLOURS[colour].numpy() > 0
        assert mean[wanted].min() > mean[~wanted].max(), (colour, mean)
    again = render_concepts(
        run, found, size=16, iterations=48, cache_dir=cache, should_stop=lambda: True
    )
    np.testing.assert_array_equal(again, pictures)  # from the cache
    examples = concept_examples(run, found, count=3, device="cpu")
    assert [len(e) for e in examples] == [3] * KINDS
    for concept, shown in enumerate(examples):
        assert [e.index for e in shown] == found.top[concept][:3].tolist()
        assert all(shows[e.index, colour_of[concept]] for e in shown)
        for e in shown:
            top, left, bottom, right = e.box
            assert 0 <= top < bottom <= SIZE and 0 <= left < right <= SIZE
            assert e.crop.shape == (bottom - top, right - left, 3) and e.activation > 0
            assert e.box != (0, 0, SIZE, SIZE)  # a position's pixels, not the whole image
    image = int(found.top[0][0])
    heat = concept_attribution(run, found, 0, image, method="saliency", device="cpu")
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32 and np.abs(heat).max() > 0
    probe = run.probe_images()[image]
    lit = probe.float().sum(0) > 0
    assert np.abs(heat)[lit.numpy()].sum() > np.abs(heat)[~lit.numpy()].sum()
    with pytest.raises(ValueError, match="concept 4 is out of range"):
        concept_attribution(run, found, 4, image)


def test_concepts_are_made_inside_a_callers_no_grad_block(logged, tmp_path):
    """As every analysis: called from `torch.no_grad()` (a notebook, a validation hook), the
    pictures' optimization and the examples' boxes still have gradients to follow."""
    run, _ = logged
    found = tb_microscope.concepts(run, 1, "mix", count=KINDS, cache_dir=tmp_path / "a")
    pictures = render_concepts(run, found, size=16, iterations=4, cache_dir=tmp_path / "a")
    examples = concept_examples(run, found, count=2, device="cpu")
    with torch.no_grad():
        again = tb_microscope.concepts(run, 1, "mix", count=KINDS, cache_dir=tmp_path / "b")
        redrawn = render_concepts(run, again, size=16, iterations=4, cache_dir=tmp_path / "b")
        boxes = concept_examples(run, again, count=2, device="cpu")
        heat = concept_attribution(run, again, 0, 0, method="saliency", device="cpu")
    np.testing.assert_array_equal(redrawn, pictures)
    assert [[e.box for e in c] for c in boxes] == [[e.box for e in c] for c in examples]
    assert np.abs(heat).max() > 0
    assert torch.is_grad_enabled()


def test_the_cli_writes_the_concepts_as_a_png_grid(logged, tmp_path, capsys):
    run, _ = logged
    out = tmp_path / "concepts.png"
    argv = ["concepts", str(run.path), "--step", "0", "--node", "mix", "--count", "5"]
    argv += ["--size", "16", "--iterations", "4", "--device", "cpu"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    assert main(argv) == 0
    with Image.open(out) as png:
        assert png.size == (3 * 16, 2 * 16) and png.mode == "RGB"
    printed = capsys.readouterr().out
    assert "5 concepts of mix at step 0 by nmf" in printed and "explain" in printed
    assert main([*argv[:-1], str(tmp_path / "concepts.jpg")]) == 2
    assert main([*argv[:6], "--count", "300", "-o", str(out)]) == 2
    assert "count must be" in capsys.readouterr().err
