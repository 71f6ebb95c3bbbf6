"""Concepts: a node's activations factored into a dictionary of directions, over training.

A unit of a trained network often answers to several things at once (it is polysemantic); the
things themselves are directions of the node's activation space that several units share.
Concepts are such directions, found as a dictionary fitted to the node's activations on the
run's probe images, sampled at probe positions exactly as an activation atlas samples them
(`atlas.sampled_activations`: a map's positions, a token node's patch tokens, one per image for
a vector node; at most `samples` of them, seeded by `seed` alone):

- "nmf": non-negative matrix factorization (scikit-learn's `NMF`, NNDSVDa start, coordinate
  descent to a tolerance of NMF_TOLERANCE): activations = codes x directions, both
  non-negative. It assumes a node whose activations are non-negative, as after a ReLU. Where
  the negative values hold no more than NEGATIVE_SHARE of the activations' energy (their sum
  of squares; a GELU's small dips) they are clipped at 0 for the fit (the explained variance
  is measured against the activations as they are); more than that is refused with an error
  naming "sae" and "pca": clipping would drop what the node says with its negative values, and
  shifting the activations would make the directions point from an arbitrary origin that the
  pictures never see.
- "sae": a TopK sparse autoencoder (Gao et al., 2024) from Overcomplete: codes are the top
  `count // SAE_SPARSITY` (at least 1) of a linear encoder's ReLU, directions the rows of a
  unit-norm dictionary of any sign, so signed nodes (a ViT's tokens) are fine. It is trained
  on the CPU for SAE_EPOCHS epochs of Adam on the activations scaled to unit mean square, its
  dictionary (and encoder) started from `count` sampled activations spread apart by k-means++'s
  seeding on their directions; everything random is drawn from generators seeded by `seed`.
- "pca": the baseline, principal axes of the centred activations (numpy's SVD; each axis's
  sign chosen so that its largest component is positive). It recovers the subspace concepts
  span, not the concepts: its axes are orthogonal, and the things a node encodes rarely are.

`explained` is the fraction of the sampled activations' variance (about each unit's mean) that
the dictionary's reconstruction keeps: R^2, clipped to [0, 1].

Over training, a dictionary is fitted at every step asked for, on the same probe positions, and
cached per (run id, node, step's snapshot version, method, count, seed, samples). A layer's
basis moves while it trains, so concepts are matched to those of `reference_step` (by default
the last logged step) by what they respond to rather than by their directions: the correlation
of their codes on the same positions at both steps, assigned one to one by
`scipy.optimize.linear_sum_assignment` (as `dynamics.align_units` matches units). The step's
concepts are reordered so that concept k is the reference's concept k; `similarity[k]` is their
code correlation (PCA's axes have no sign: they are matched on its magnitude and flipped where
it is negative). Concept k's picture starts from the same noise at every step, so a filmstrip
of it shows the model change, not the seed.

A concept is shown as a unit is: its picture (`render_concepts`: the whitened direction
objective of an atlas cell, rendered by the engine in batches and cached), its dataset examples
(`Concepts.top`, and `concept_examples` for the crops) and its attribution
(`concept_attribution`).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MicroscopeError
from ..execution.cache import RenderCache, ResultKey
from ..limits import SettingError, check_concepts, check_iterations, check_size
from ..nodes import Node
from ..optvis.engine import default_device
from ..optvis.param import canvas_for
from ..optvis.probe import as_rgb, probe_images
from ..optvis.tap import NodeTap, frozen
from ..optvis.torch_state import restores_torch_state
from ..run import Run, open_run
from .atlas import (
    MAX_SAMPLES,
    QUALITIES,
    check_stop,
    render_directions,
    sampled_activations,
    whitened,
)
from .attribution import attribute, captum_attr, check_method, image_input
from .examples import Example, receptive_boxes

METHODS = ("nmf", "sae", "pca")
TOP_IMAGES = 8  # probe images named per concept in `Concepts.top`
NEGATIVE_SHARE = 0.05  # of the activations' sum of squares: NMF clips up to this, refuses more
NMF_ITERATIONS = 400  # scikit-learn's max_iter; it stops earlier at NMF_TOLERANCE
NMF_TOLERANCE = 1e-3  # scikit-learn's tol: its default, 1e-4, mostly adds iterations
SAE_EPOCHS = 50
SAE_BATCH = 256
SAE_LEARNING_RATE = 5e-3
SAE_SPARSITY = 8  # a TopK autoencoder of `count` concepts keeps count // 8 (at least 1) codes
UNITS_NAMED = 3  # units per concept in `to_dict`: those its direction leans on most
EXTRA = "pip install 'tb-microscope[concepts]'"
CONCEPTS = "concepts"
# 1: the first form. Changes to sampling, the fits or what is stored bump it
CONCEPTS_VERSION = 1
FIT = {"directions", "codes", "sources", "explained", "targets"}  # a cached fit's arrays


@dataclass
class Concepts:
    """A dictionary of `count` concepts of `node` at `step`, matched to `reference_step`.

    `directions` (float32 count x units, unit length, in the node's activation space; zero for a
    concept the fit left empty); `explained`: the fraction of the sampled activations' variance
    the dictionary reconstructs (R^2 in [0, 1]); `top` (int count x k): the probe images on
    which each concept is strongest (its largest code over their sampled positions), strongest
    first; `similarity` (float count): each concept's code correlation with its counterpart at
    `reference_step` (1 at the reference step itself; NaN for a concept whose codes do not vary).
    `codes` (float32 M x count) are the concepts' codes on the sampled activations, whose
    (probe image, row, col) are `sources` (int M x 3, as an atlas's; row and col -1 for a vector
    node); `targets` (float32 count x units) the whitened directions the pictures maximize."""

    directions: np.ndarray
    explained: float
    top: np.ndarray
    similarity: np.ndarray
    step: int
    reference_step: int
    method: str
    node: str
    seed: int
    codes: np.ndarray
    sources: np.ndarray
    targets: np.ndarray

    @property
    def count(self) -> int:
        return len(self.directions)

    def units(self, count: int = UNITS_NAMED) -> np.ndarray:
        """Per concept, the `count` units its direction has the largest components along,
        largest first (int count x min(count, units))."""
        return np.argsort(-self.directions, axis=1, kind="stable")[:, :count]

    def to_dict(self) -> dict:
        """What it is, as JSON can hold it (no directions, codes or pictures): the settings, the
        explained variance and per concept its similarity, top probe images and units."""
        return {
            "step": self.step,
            "reference_step": self.reference_step,
            "node": self.node,
            "method": self.method,
            "count": self.count,
            "seed": self.seed,
            "samples": len(self.sources),
            "explained": round(float(self.explained), 6),
            "similarity": [
                None if not np.isfinite(s) else round(float(s), 6) for s in self.similarity
            ],
            "top": self.top.tolist(),
            "units": self.units().tolist(),
        }


@dataclass
class Dictionary:
    """A dictionary fitted to M activations: `directions` (count x units, unit length or zero),
    `codes` (M x count: activation i ~ codes[i] @ directions, plus the mean for PCA) and the
    fraction of their variance it reconstructs, `explained`."""

    directions: np.ndarray
    codes: np.ndarray
    explained: float


def explained_variance(activations: np.ndarray, reconstruction: np.ndarray) -> float:
    """R^2 of a reconstruction of M x units activations: 1 - its squared error over their
    squared deviation from each unit's mean, clipped to [0, 1] (1 for constant activations
    reconstructed exactly, else 0)."""
    x = np.asarray(activations, np.float64)
    residual = float(np.square(x - np.asarray(reconstruction, np.float64)).sum())
    total = float(np.square(x - x.mean(0)).sum())
    if total <= 0:
        return 1.0 if residual <= 0 else 0.0
    return float(np.clip(1.0 - residual / total, 0.0, 1.0))


def check_concepts_method(method: str) -> str:
    """`method` if it is one of METHODS; else a `SettingError` naming them."""
    if method not in METHODS:
        raise SettingError(
            f"concepts method {method!r} is not known; methods: {', '.join(METHODS)}"
        )
    return method


def _unit_rows(directions: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directions scaled to unit length, codes scaled inversely (a zero direction stays zero)."""
    norms = np.linalg.norm(directions, axis=1)
    scale = np.where(norms > 0, norms, 1.0)
    return directions / scale[:, None], codes * scale[None, :]


def check_concepts_request(target: Node, count: int, method: str) -> None:
    """A `SettingError` unless `method` is known and `count` concepts of node `target` can be
    fitted by it (NMF and PCA find no more concepts than the node has units)."""
    check_concepts_method(method)
    check_concepts(count)
    if method != "sae" and count > target.units:
        raise SettingError(
            f"count must be at most the {target.units} units of node {target.name!r} for "
            f"method {method!r}, got {count} (method='sae' may have more concepts than units)"
        )


def _sklearn_nmf():
    try:
        from sklearn.decomposition import NMF
    except ImportError:
        raise MicroscopeError(f"concepts by NMF need scikit-learn: {EXTRA}") from None
    return NMF


_IMPORT_LOCK = threading.Lock()


def overcomplete_sae():
    """Overcomplete's `overcomplete.sae`, or an error naming the extra.

    Overcomplete 0.3.0 builds colour maps with `matplotlib.cm.get_cmap` when its package is
    imported, and matplotlib 3.9 removed that function (KempnerInstitute/overcomplete#12);
    where it is missing, matplotlib's own `matplotlib.colormaps.get_cmap` stands in for it
    while Overcomplete is imported, and is taken away afterwards."""
    with _IMPORT_LOCK:
        try:
            import matplotlib
            import matplotlib.cm
        except ImportError:
            raise MicroscopeError(
                f"concepts by a sparse autoencoder need Overcomplete: {EXTRA}"
            ) from None
        lent = not hasattr(matplotlib.cm, "get_cmap")
        if lent:
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        try:
            import overcomplete.sae
        except ImportError:
            raise MicroscopeError(
                f"concepts by a sparse autoencoder need Overcomplete: {EXTRA}"
            ) from None
        finally:
            if lent:
                del matplotlib.cm.get_cmap
    return overcomplete.sae


def _non_negative(activations: np.ndarray, where: str) -> np.ndarray:
    """The activations clipped at 0 where their negative values hold at most NEGATIVE_SHARE of
    their sum of squares; else an error saying what to use instead."""
    negative = float(np.square(np.minimum(activations, 0)).sum(dtype=np.float64))
    total = float(np.square(activations).sum(dtype=np.float64))
    if total > 0 and negative > NEGATIVE_SHARE * total:
        raise MicroscopeError(
            f"NMF needs non-negative activations (a node after a ReLU), but {negative / total:.0%} "
            f"of {where}'s activations' energy (their sum of squares) is in negative values; "
            "use method='sae' (non-negative codes, directions of any sign) or method='pca'"
        )
    return np.maximum(activations, 0)


def _fit_nmf(x: np.ndarray, count: int, seed: int, where: str) -> Dictionary:
    nmf = _sklearn_nmf()(
        n_components=count,
        init="nndsvda",
        max_iter=NMF_ITERATIONS,
        tol=NMF_TOLERANCE,
        random_state=seed,
    )
    codes = nmf.fit_transform(_non_negative(x, where))
    directions, codes = _unit_rows(nmf.components_, codes)
    return Dictionary(directions, codes, explained_variance(x, codes @ directions))


def _fit_pca(x: np.ndarray, count: int) -> Dictionary:
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, _, axes = np.linalg.svd(x - mean, full_matrices=False)
    directions = axes[:count]
    largest = directions[np.arange(len(directions)), np.abs(directions).argmax(1)]
    directions = directions * np.where(largest < 0, -1.0, 1.0)[:, None]
    codes = (x - mean) @ directions.T
    return Dictionary(directions, codes, explained_variance(x, mean + codes @ directions))


def spread_rows(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` unit-length rows of `x` pointing apart (k-means++'s seeding, with one minus the
    cosine as the distance), drawn by a generator seeded by `seed`; seeded random directions
    fill in where `x` has too few non-zero rows."""
    rng = np.random.default_rng([seed, 0xC0C])
    norms = np.linalg.norm(x, axis=1)
    rows = x[norms > 0] / norms[norms > 0, None]
    picked: list[int] = []
    if len(rows):
        picked.append(int(rng.integers(len(rows))))
        distance = 1.0 - rows @ rows[picked[0]]
        while len(picked) < min(count, len(rows)):
            weight = np.square(np.clip(distance, 0, None))
            if weight.sum() <= 0:
                break
            picked.append(int(rng.choice(len(rows), p=weight / weight.sum())))
            distance = np.minimum(distance, 1.0 - rows @ rows[picked[-1]])
    extra = rng.normal(size=(count - len(picked), x.shape[1]))
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.concatenate([rows[picked], extra]).astype(np.float32)


class _Encoder(nn.Module):
    """The autoencoder's encoder, as Overcomplete's SAEs call it: (pre-codes, ReLU codes)."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(start.shape[1], start.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(start)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.linear(x)
        return pre, torch.relu(pre)


class _Batches:
    """The data in batches of SAE_BATCH, shuffled anew at every pass (every epoch) by a
    generator seeded by `seed`: what `train_sae` iterates over, without a DataLoader's cost per
    sample."""

    def __init__(self, data: torch.Tensor, seed: int):
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=self.generator)
        return iter(self.data[order].split(SAE_BATCH))


def _squared_error(x, x_hat, pre_codes, codes, dictionary) -> torch.Tensor:
    return (x - x_hat).square().mean()


@contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 in the calling thread (OpenMP's count is per thread)
    while the block runs, then restored: an autoencoder's operations are too small to share,
    and on a busy 2-core machine two threads made its fit 6 to 20 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_sae(x: np.ndarray, count: int, seed: int) -> Dictionary:
    sae = overcomplete_sae()
    scale = float(np.sqrt(np.square(x, dtype=np.float64).mean())) or 1.0
    data = torch.from_numpy((x / scale).astype(np.float32))
    start = spread_rows(data.numpy(), count, seed)
    with torch.random.fork_rng(devices=[]):  # layers' own initialization, overwritten: the
        model = sae.TopKSAE(  # caller's random stream is left as it was
            x.shape[1],
            count,
            top_k=max(1, count // SAE_SPARSITY),
            encoder_module=_Encoder(torch.from_numpy(start)),
            dictionary_params={"initializer": start},
            device="cpu",
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=SAE_LEARNING_RATE)
    batches = _Batches(data, seed)
    with _one_thread():
        sae.train_sae(model, batches, _squared_error, optimizer, nb_epochs=SAE_EPOCHS, monitoring=0)
        model.eval()
        with torch.no_grad():
            _, codes, reconstruction = model(data)
            dictionary = model.get_dictionary().detach()
    directions, codes = _unit_rows(dictionary.double().numpy(), codes.double().numpy() * scale)
    return Dictionary(directions, codes, explained_variance(x, reconstruction.numpy() * scale))


def fit_dictionary(
    activations: np.ndarray, count: int, method: str, seed: int, where: str = "the node"
) -> Dictionary:
    """A dictionary of `count` concepts of M x units `activations` by `method` (see this
    module's notes), deterministic for `seed`; `where` names the activations in errors."""
    check_concepts_method(method)
    x = np.asarray(activations, np.float32)
    most = x.shape[1] if method != "sae" else None
    if most is not None and count > most:
        raise SettingError(
            f"count must be at most {where}'s {most} units for method {method!r}, got {count} "
            "(method='sae' may have more concepts than units)"
        )
    if count > len(x):
        raise SettingError(
            f"count must be at most the {len(x)} sampled activations of {where}, got {count}"
        )
    if method == "nmf":
        fitted = _fit_nmf(x, count, seed, where)
    elif method == "sae":
        fitted = _fit_sae(x, count, seed)
    else:
        fitted = _fit_pca(x, count)
    return Dictionary(
        fitted.directions.astype(np.float32), fitted.codes.astype(np.float32), fitted.explained
    )


def code_correlations(codes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pearson's correlation of every reference concept's codes (columns of `reference`, M x K)
    with every concept's (columns of `codes`, M x K') on the same M activations: K x K', NaN
    where either does not vary."""

    def standardized(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(c, np.float64)
        c = c - c.mean(0)
        norms = np.linalg.norm(c, axis=0)
        return c / np.where(norms > 0, norms, 1.0), norms > 0

    a, live_a = standardized(codes)
    b, live_b = standardized(reference)
    matrix = np.clip(b.T @ a, -1.0, 1.0)
    return np.where(live_b[:, None] & live_a[None, :], matrix, np.nan)


def match_codes(
    codes: np.ndarray, reference: np.ndarray, signed: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each reference concept's counterpart among `codes`' concepts (both M x K, on the same
    activations): `order[k]`, the one-to-one assignment with the largest total code correlation
    (`linear_sum_assignment`; a concept that does not vary counts as -1), its correlation
    `similarity[k]`, and `signs[k]`: 1, or, where not `signed` (PCA's axes, whose sign is
    arbitrary), -1 where the pair correlates negatively (matched on the magnitude; the
    similarity is then that of the flipped concept)."""
    from scipy.optimize import linear_sum_assignment

    matrix = code_correlations(codes, reference)
    score = matrix if signed else np.abs(matrix)
    rows, cols = linear_sum_assignment(np.nan_to_num(score, nan=-1.0), maximize=True)
    order = np.full(matrix.shape[0], -1, np.int64)
    order[rows] = cols
    similarity = matrix[np.arange(len(order)), order]
    signs = np.ones(len(order))
    if not signed:
        signs = np.where(similarity < 0, -1.0, 1.0)
    return order, similarity * signs, signs


def strongest_images(codes: np.ndarray, sources: np.ndarray, count: int = TOP_IMAGES) -> np.ndarray:
    """Per concept (column of `codes`, M x K), the probe images (`sources[:, 0]`) with its
    largest code over their sampled positions, largest first, each once: int K x min(count,
    images sampled)."""
    images, index = np.unique(sources[:, 0], return_inverse=True)
    best = np.full((len(images), codes.shape[1]), -np.inf)
    np.maximum.at(best, index, codes)
    order = np.argsort(-best.T, axis=1, kind="stable")[:, : min(count, len(images))]
    return images[order].astype(np.int64)


def _no_probe(run: Run) -> MicroscopeError:
    return MicroscopeError(
        f"run '{run.name}' has no probe images, on which concepts are found: pass probe= (a few "
        "hundred training inputs) to tb_microscope.Logger"
    )


def _fit_key(
    run: Run, node: str, step: int, method: str, count: int, seed: int, samples: int
) -> ResultKey:
    probe = run.manifest.probe
    options = (
        ("version", CONCEPTS_VERSION),
        ("method", method),
        ("count", count),
        ("seed", seed),
        ("samples", samples),
        ("probe", probe.count if probe else 0),
    )
    return ResultKey(CONCEPTS, node, 0, options, ((step, run.snapshot_version(step)),))


def needs_library(method: str) -> None:
    """The method's library, imported now: a missing extra is said before any work."""
    if method == "nmf":
        _sklearn_nmf()
    elif method == "sae":
        overcomplete_sae()


@restores_torch_state
def concepts(
    run: Run | str,
    step: int,
    node: str,
    *,
    count: int = 16,
    method: str = "nmf",
    seed: int = 0,
    device: str | torch.device | None = None,
    reference_step: int | None = None,
    samples: int = MAX_SAMPLES,
    cache_dir: str | RenderCache | None = None,
    model: nn.Module | None = None,
    reference_model: nn.Module | None = None,
    load_model: Callable[[int], nn.Module] | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Concepts:
    """`count` concepts of `node` at `step` (see `Concepts` and this module's notes): a
    dictionary fitted by `method` ("nmf", "sae" or "pca") to up to `samples` of the node's
    activations on the run's probe images, matched to the concepts at `reference_step`
    (default: the last logged step) by their codes, so that concept k is the same concept at
    every step.

    Each step's fit is cached with the run's renders (or under `cache_dir`), so a filmstrip
    fits the reference once and asking again loads no model. `model` and `reference_model` may
    pass the models at `step` and `reference_step` already loaded, or `load_model(step)` load
    them; `device` runs the probe images through them (the dictionary is fitted on the CPU).
    `progress` hears the fraction done; `should_stop` is asked often, and `RenderCancelled`
    raised once it returns True. Needs the run's probe images (the Logger's `probe=`); "nmf"
    needs scikit-learn and "sae" Overcomplete (the `[concepts]` extra)."""
    run = run if isinstance(run, Run) else open_run(run)
    target = run.node(node)
    check_concepts_request(target, count, method)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise SettingError(f"samples must be a whole number from 2 up, got {samples!r}")
    run.snapshot_version(step)  # an unknown step: StepNotFoundError
    if reference_step is None:
        reference_step = run.steps[-1]
    run.snapshot_version(reference_step)
    if run.manifest.probe is None:
        raise _no_probe(run)
    needs_library(method)
    cache = cache_dir if isinstance(cache_dir, RenderCache) else RenderCache(run, cache_dir)
    device = torch.device(device) if device is not None else default_device()
    given = {step: model, reference_step: reference_model if reference_step != step else model}
    images: list[torch.Tensor] = []

    def report(fraction: float) -> None:
        if progress is not None:
            progress(fraction)

    def fitted(at: int) -> dict[str, np.ndarray]:
        key = _fit_key(run, target.name, at, method, count, seed, samples)
        stored = cache.get_arrays(key)
        if stored is not None and FIT <= set(stored):
            return stored
        if not images:
            found = run.probe_images()
            if found is None:
                raise _no_probe(run)
            images.append(found)
        loaded = given.get(at)
        if loaded is None:
            loaded = load_model(at) if load_model is not None else run.load_model(at, device)
        activations, sources = sampled_activations(
            run, frozen(loaded), target, images[0], seed, device, samples, should_stop
        )
        check_stop(should_stop, "the concepts")
        where = f"node {target.name!r} at step {at}"
        fit = fit_dictionary(activations, count, method, seed, where)
        arrays = {
            "directions": fit.directions,
            "codes": fit.codes,
            "sources": sources,
            "explained": np.array(fit.explained),
            "targets": whitened(fit.directions, activations).astype(np.float32),
        }
        cache.put_arrays(key, arrays)
        return arrays

    report(0.0)
    here = fitted(step)
    report(0.5)
    signs = np.ones(count)
    if reference_step == step:
        order, similarity = np.arange(count), np.ones(count)
    else:
        reference = fitted(reference_step)
        if not np.array_equal(here["sources"], reference["sources"]):
            raise MicroscopeError(
                f"node {target.name!r} was sampled at other positions at steps {step} and "
                f"{reference_step}, so its concepts cannot be matched by their codes"
            )
        order, similarity, signs = match_codes(
            here["codes"], reference["codes"], signed=method != "pca"
        )
    report(1.0)
    codes = here["codes"][:, order] * signs.astype(np.float32)
    return Concepts(
        directions=here["directions"][order] * signs.astype(np.float32)[:, None],
        explained=float(here["explained"]),
        top=strongest_images(codes, here["sources"]),
        similarity=similarity.astype(np.float64),
        step=step,
        reference_step=reference_step,
        method=method,
        node=target.name,
        seed=seed,
        codes=codes,
        sources=here["sources"],
        targets=here["targets"][order] * signs.astype(np.float32)[:, None],
    )


def _pictures_key(run: Run, concepts: Concepts, size: int, iterations: int) -> ResultKey:
    targets = np.ascontiguousarray(concepts.targets, np.float32)
    options = (
        ("version", CONCEPTS_VERSION),
        ("targets", hashlib.sha256(targets.tobytes()).hexdigest()[:32]),
        ("shape", targets.shape),
        ("size", size),
        ("iterations", iterations),
        ("seed", concepts.seed),
    )
    step = concepts.step
    return ResultKey(
        "concept-pictures", concepts.node, 0, options, ((step, run.snapshot_version(step)),)
    )


@restores_torch_state
def render_concepts(
    run: Run,
    concepts: Concepts,
    *,
    size: int | None = None,
    iterations: int | None = None,
    preview: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | RenderCache | None = None,
    model: nn.Module | None = None,
    batch_size: int | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The concepts' pictures at their step (uint8 count x size x size x 3), rendered as an
    atlas's cells are: each maximizes its whitened direction (`Concepts.targets`) at the centre
    position of the node's map by dot x cosine, all in batches by the engine. Concept k is
    seeded by (seed, node, k), so it starts from the same noise at every step. `size` and
    `iterations` default to the atlas's qualities (64 px and 128 iterations; with
    `preview=True` 32 px and 24). Cached with the run's renders (or under `cache_dir`), keyed by
    the step's snapshot, the targets and the settings; `model` may pass the model at the step
    already loaded; `batch_size`, `progress` and `should_stop` as for `render`."""
    quality = QUALITIES["preview" if preview else "full"]
    size = check_size(quality.size if size is None else size)
    iterations = check_iterations(quality.iterations if iterations is None else iterations)
    canvas_for(run, size)  # refuses sizes the model cannot take, before any work
    target = run.node(concepts.node)
    cache = cache_dir if isinstance(cache_dir, RenderCache) else RenderCache(run, cache_dir)
    key = _pictures_key(run, concepts, size, iterations)
    stored = cache.get_arrays(key)
    if stored is not None and "images" in stored:
        return stored["images"]
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(concepts.step, device))
    pictures = render_directions(
        model,
        run,
        target,
        list(range(concepts.count)),
        np.asarray(concepts.targets, np.float32),
        size=size,
        iterations=iterations,
        seed=concepts.seed,
        device=device,
        batch_size=batch_size,
        progress=progress,
        should_stop=should_stop,
    )
    cache.put_arrays(key, {"images": pictures})
    return pictures


@restores_torch_state
def concept_examples(
    run: Run,
    concepts: Concepts,
    *,
    count: int = TOP_IMAGES,
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
) -> list[list[Example]]:
    """Per concept, its `count` top probe images (`Concepts.top`) as dataset examples: each
    with its largest code there (`activation`), the sampled position it is at, and the box of
    pixels that position's activation along the concept's direction depends on (from one
    batched backward, as `dataset_examples` finds a unit's)."""
    target = run.node(concepts.node)
    images = probe_images(run)
    sources, codes = concepts.sources, concepts.codes
    chosen = []  # (concept, image, code, position)
    for k, top in enumerate(concepts.top):
        for image in top[:count]:
            rows = np.flatnonzero(sources[:, 0] == image)
            best = rows[np.argmax(codes[rows, k])]
            row, col = int(sources[best, 1]), int(sources[best, 2])
            chosen.append((k, int(image), float(codes[best, k]), None if row < 0 else (row, col)))
    out: list[list[Example]] = [[] for _ in range(concepts.count)]
    if not chosen:
        return out
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(concepts.step, device))
    weights = torch.from_numpy(np.asarray(concepts.directions, np.float32)[[c[0] for c in chosen]])
    boxes = receptive_boxes(
        model,
        run,
        target,
        images[[c[1] for c in chosen]],
        weights,
        [c[3] or (0, 0) for c in chosen],
        device,
    )
    for (k, image, value, position), box in zip(chosen, boxes):
        picture = as_rgb(images[image])
        top, left, bottom, right = box
        crop = picture[top:bottom, left:right].copy()
        out[k].append(Example(image, value, position, box, picture, crop))
    return out


class ConceptObjective(nn.Module):
    """A concept's objective as a function of the model's input, one value per batch element:
    the node's activations projected on its direction, averaged over positions (over the patch
    tokens for tokens), as a unit's channel objective is its axis's. The forward stops at the
    node."""

    def __init__(self, model: nn.Module, node: Node, direction: torch.Tensor):
        super().__init__()
        self.model = model
        self.tap = NodeTap(model, node)
        self.register_buffer("direction", direction.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.tap(x).maps.float()
        direction = self.direction.to(maps.device)
        if maps.dim() == 2:
            return maps @ direction
        return torch.einsum("nchw,c->n", maps, direction) / (maps.shape[2] * maps.shape[3])


def concept_attribution(
    run: Run,
    concepts: Concepts,
    concept: int,
    image: int | torch.Tensor,
    *,
    method: str = "integrated_gradients",
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """How much each pixel of `image` drives concept `concept`: `attribution` (same methods,
    same image forms, same result: float32 H x W, signed) of `ConceptObjective`, the node's
    activations projected on the concept's direction. The projection, not the code: an NMF code
    is a non-negative least-squares fit and an SAE's a top-k of a ReLU, both 0 (with no
    gradient) wherever the concept is absent; for NMF's non-negative directions and the SAE's
    linear encoder the projection is what the code grows with. Needs the `[attribution]` extra."""
    values, notes = concept_attribution_and_notes(
        run, concepts, concept, image, method=method, device=device, model=model,
        should_stop=should_stop,
    )  # fmt: skip
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return values


@restores_torch_state
def concept_attribution_and_notes(
    run: Run,
    concepts: Concepts,
    concept: int,
    image: int | torch.Tensor,
    *,
    method: str = "integrated_gradients",
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """`concept_attribution`'s values, and the notes it would warn of, for a caller that shows
    them itself (the plugin's tab)."""
    check_method(method)
    captum_attr()
    if isinstance(concept, bool) or not isinstance(concept, int | np.integer):
        raise TypeError(f"concept must be an index (int), not {type(concept).__name__}")
    if not 0 <= concept < concepts.count:
        raise SettingError(
            f"concept {concept} is out of range: there are {concepts.count} (0 to "
            f"{concepts.count - 1})"
        )
    target = run.node(concepts.node)
    pixels = image_input(run, image)
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(concepts.step, device))
    direction = torch.from_numpy(np.asarray(concepts.directions[int(concept)], np.float32))
    return attribute(
        run, model, target, lambda: ConceptObjective(model, target, direction), pixels,
        method=method, device=device, should_stop=should_stop,
    )  # fmt: skip
