"""2-D embeddings of activation vectors, the place of each in an activation atlas.

UMAP (`umap-learn`, the extra `tb-microscope[atlas]`) with the settings of lucid's activation
atlas notebooks (cosine metric, 20 neighbours, minimum distance 0.01), seeded: the same
activations and seed give the same layout. Without umap-learn, `"auto"` falls back to PCA:
the activations scaled to unit length (so that, as with UMAP's cosine metric, a vector's place
depends on its direction, not its size), centred, projected onto their first two principal
axes. PCA keeps what varies most and draws clusters less apart than UMAP does, but needs
nothing beyond numpy. Either layout is then scaled into [0, 1] as lucid's `normalize_layout`
does: outliers beyond the 1st and 99th percentiles clipped, a margin of a tenth of the range.

A process's first UMAP layout compiles umap-learn's and pynndescent's numba functions, about
half a minute on a CPU (pynndescent's NN-descent, which takes its distance as an argument, is
not kept in numba's disk cache, so every process compiles it again); `warm_up_umap` compiles
them ahead, on random activations of the types and settings an atlas's layouts use.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

from ..errors import MicroscopeError
from ..limits import SettingError

METHODS = ("auto", "umap", "pca")
UMAP_NEIGHBORS = 20  # lucid's activation atlas notebooks
UMAP_MIN_DIST = 0.01
UMAP_METRIC = "cosine"
UMAP_LEAST = 16  # fewer activations than this are laid out by PCA (UMAP's graph needs more)
# From this many activations on, umap-learn finds the neighbours by pynndescent's NN-descent,
# below it exactly (sklearn's pairwise distances): each road compiles functions of its own.
UMAP_APPROXIMATE = 4096
WARM_UP_SIZES = (256, UMAP_APPROXIMATE)  # activations laid out to warm up: one of each road
WARM_UP_DIMENSIONS = 8
WARM_UP_EPOCHS = 2  # the epochs are a Python loop: how many changes no type numba compiles for
PERCENTILES = (1.0, 99.0)  # the layout's outliers beyond these are clipped to them
MARGIN = 0.1  # of the clipped layout's range, added around it

_warned = False


def umap_installed() -> bool:
    """Whether umap-learn is there, without importing it (with numba, seconds)."""
    return importlib.util.find_spec("umap") is not None


def resolve_method(method: str) -> str:
    """`"umap"` or `"pca"`: the method that `method` names here. `"auto"` is UMAP where
    umap-learn is installed, else PCA with a warning (once per process) naming the extra;
    `"umap"` without umap-learn is an error saying what to install."""
    global _warned
    if method not in METHODS:
        raise SettingError(f"layout method {method!r} is not known; methods: {', '.join(METHODS)}")
    if method == "pca":
        return method
    if umap_installed():
        return "umap"
    if method == "umap":
        raise MicroscopeError(
            "an atlas laid out by UMAP needs umap-learn: pip install 'tb-microscope[atlas]' "
            "(or pass layout_method='pca')"
        )
    if not _warned:
        _warned = True
        warnings.warn(
            "umap-learn is not installed: activation atlases are laid out by PCA, which "
            "separates clusters less well; pip install 'tb-microscope[atlas]' for UMAP",
            stacklevel=4,  # activation_atlas's caller, past its restores_torch_state
        )
    return "pca"


def pca_layout(activations: np.ndarray) -> np.ndarray:
    """M x 2: the activations (scaled to unit length, centred) on their first two principal
    axes, each axis's sign fixed so that its largest loading is positive (an SVD's signs are
    otherwise arbitrary)."""
    x = activations.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    x -= x.mean(0, keepdims=True)
    if len(x) < 2 or not np.any(x):
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = np.zeros((2, x.shape[1]))
    axes[: len(vt[:2])] = vt[:2]
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    return x @ axes.T


def umap_layout(activations: np.ndarray, seed: int, epochs: int | None = None) -> np.ndarray:
    """M x 2: UMAP of the activations (cosine metric), seeded (which makes it single-threaded:
    umap-learn's parallel epochs are not reproducible), over `epochs` epochs (default:
    umap-learn's, 500 up to 10,000 activations)."""
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(UMAP_NEIGHBORS, len(activations) - 1),
        min_dist=UMAP_MIN_DIST,
        metric=UMAP_METRIC,
        random_state=seed,
        n_jobs=1,
        n_epochs=epochs,
    )
    return np.asarray(reducer.fit_transform(activations.astype(np.float32)), dtype=np.float64)


def warm_up_umap() -> bool:
    """Compile what a process's first UMAP layout compiles, by laying out random activations
    (float32, as `umap_layout` passes them) with the atlas's settings through both of
    umap-learn's roads to the neighbours (WARM_UP_SIZES), over a few epochs: a layout after
    this compiles nothing. False, doing nothing, without umap-learn (atlases use PCA)."""
    if not umap_installed():
        return False
    rng = np.random.default_rng(0)
    for rows in WARM_UP_SIZES:
        activations = rng.random((rows, WARM_UP_DIMENSIONS), dtype=np.float32)
        umap_layout(activations, seed=0, epochs=WARM_UP_EPOCHS)
    return True


def normalized(layout: np.ndarray) -> np.ndarray:
    """The layout in [0, 1] on both axes, as lucid's `normalize_layout`: clipped at the 1st
    and 99th percentiles widened by a tenth of their range, then scaled; an axis along which
    nothing varies is put at 0.5."""
    if len(layout) == 0:
        return np.zeros((0, 2), np.float32)
    low, high = np.percentile(layout, PERCENTILES, axis=0)
    spread = high - low
    low, high = low - MARGIN * spread, high + MARGIN * spread
    clipped = np.clip(layout, low, high) - low
    span = high - low
    out = np.divide(clipped, span, out=np.full_like(clipped, 0.5), where=span > 0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def embed(activations: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """The activations' places in [0, 1]^2 (M x 2, float32) and the method that placed them:
    `method` as `resolve_method` resolved it, PCA for fewer than UMAP_LEAST activations."""
    if method == "umap" and len(activations) < UMAP_LEAST:
        method = "pca"
    layout = umap_layout(activations, seed) if method == "umap" else pca_layout(activations)
    return normalized(layout), method
