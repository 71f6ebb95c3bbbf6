"""The rendering engine: feature visualizations of many units of one node in one optimization.

lucid's recipe (Fourier-space image with decorrelated colour, Adam at lr 0.05, padding, jitter,
scale and rotation), driven by our own loop rather than lucent's `render_vis`:
- a render of fewer than 512 iterations (a preview) takes larger steps (`learning_rate`), so
  that its picture already looks like the full render's rather than like its starting noise;
- batch element i is unit i, so one forward/backward serves a whole batch of units;
- the forward pass stops as soon as the target node's output is captured;
- each unit's starting image and every random transform it sees are drawn from a generator
  seeded by (seed, node, unit) alone, and transforms are applied per sample with one affine grid,
  so a unit's image never depends on which units share its batch, and the same unit at two steps
  starts from the same noise;
- for the first iterations, a ReLU that would block a sample's whole gradient lets through the
  part that pushes its negative inputs up (lucid's redirected ReLU gradient), so that a unit
  silent on the starting noise, common in small models, still gets a picture;
- CUDA when present (bf16 autocast, channels_last), the CPU otherwise (bf16 with oneDNN for
  convolutional networks where the CPU computes bf16 natively, fp32 otherwise).

This module is the optimization loop and `render`; its parts are their own modules: the
redirected ReLU (`relu.py`), the numerics (`numerics.py`), the canvas a model runs at
(`canvas.py`), batch sizes (`batching.py`) and the device's memory (`memory.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MicroscopeError
from ..limits import SettingError, check_iterations, check_size
from ..nodes import TOKENS, Node
from ..run import Run
from .batching import batch_size_for
from .canvas import fitted_canvas
from .heap import kept_heap
from .memory import is_out_of_memory
from .numerics import Numerics, usable_numerics
from .param import FourierImages, InputSpace, RandomTransforms, canvas_for, centred, display_bands
from .probe import probe_count, probe_images
from .relu import REDIRECT_ITERATIONS, RedirectedReLUs
from .tap import NodeTap, frozen
from .techniques import Objective, Technique, channel, class_token, cosine, get_technique
from .torch_state import restores_torch_state

# 2: redirected ReLU gradients; 3: our frequency grid (odd sizes), no NNPACK; 4: a small fixed
# input holds a larger image, with lucid's pad and jitters in proportion; larger steps below 512
# iterations; 5: each image its own tensor (a batch-mate changed images of some sizes); 6: tiny
# gradients lifted to GRADIENT_FLOOR (deep units of a freshly initialized GoogLeNet stayed grey),
# an image without any gradient redirected at every ReLU (`RedirectedReLUs`); 7: convolutional
# networks in bf16 with oneDNN on CPUs with AVX512-BF16 (`default_numerics`); 8: fused Adam, the
# images' gradient written out, the warps' grids and the input's normalization computed with fewer
# operations (each rounded differently)
ENGINE_VERSION = 8
LEARNING_RATE = 0.05  # lucid's, for renders of FULL_ITERATIONS and more
FULL_ITERATIONS = 512
MAX_STEP_GAIN = 8.0


def learning_rate(iterations: int) -> float:
    """Adam's learning rate for a render of `iterations`: lucid's 0.05 from 512 iterations up;
    below, 0.05 x sqrt(512 / iterations), at most 8 times 0.05 (0.23 for the 24-iteration
    preview). Measured on the demo CNN's pool2 (8 units, 32 px): of the mean activation 256
    iterations reach, 32 iterations reached 34% at 0.05 and 70% at 0.2, 24 iterations 64%; the
    preview's colours and shapes are the full render's, where at 0.05 they were mostly noise."""
    gain = min(MAX_STEP_GAIN, (FULL_ITERATIONS / max(iterations, 1)) ** 0.5)
    return LEARNING_RATE * max(1.0, gain)


# Adam moves a value by about its step size whatever its gradient's scale, unless the gradient is
# near Adam's eps (1e-8): then it hardly moves. Measured as the mean |gradient| over an image's
# spectrum at the first iteration (8-iteration 32 px renders): 1e-6 to 4e-4 for the demo CNN,
# torchvision's AlexNet and ResNeXt-50 and timm's DeiT; but 7e-11 at GoogLeNet's inception4c and
# 2e-14 at its fc, 5e-13 at MobileNetV2's classifier, freshly initialized (weights of std 0.01,
# batch norms with unit variance: each layer shrinks what passes), whose pictures stayed the grey
# they started as. An image whose first gradient is below GRADIENT_FLOOR has all its gradients
# multiplied by one number, fixed then, that lifts it to the floor: the direction of every step
# is unchanged, the pictures of every model above the floor too.
GRADIENT_FLOOR = 1e-6


def gradient_gains(
    spectra: list[torch.Tensor], images: Sequence[int]
) -> tuple[list[tuple[int, float]], list[int]]:
    """Of `images`: (index, gain) for each whose gradient is below GRADIENT_FLOOR, not zero; and
    those whose gradient is zero (a silent unit: see `RedirectedReLUs`)."""
    means = torch.stack([spectra[i].grad.abs().mean() for i in images]).tolist()
    gains = [(i, GRADIENT_FLOOR / m) for i, m in zip(images, means) if 0 < m < GRADIENT_FLOOR]
    return gains, [i for i, m in zip(images, means) if m == 0]


CHECKS_PER_PASS = 16  # how many times a forward (and a backward) asks whether to stop


@dataclass(frozen=True)
class Quality:
    """An image size and a number of iterations: `full` is what a unit looks like; `preview` a
    first look at about 1/150 of the cost (benchmarks/preview_latency.py), shown until
    the full render replaces it."""

    size: int
    iterations: int


QUALITIES = {"full": Quality(128, FULL_ITERATIONS), "preview": Quality(32, 24)}


class UnitIndexError(MicroscopeError, IndexError):
    """A unit index outside the node's units."""


class ImageIndexError(MicroscopeError, IndexError):
    """A probe image index outside the run's probe images."""


class RenderCancelled(MicroscopeError):
    """The caller's `should_stop` said to stop: nobody waits for this render any more."""


class StopChecks:
    """Checks `should_stop` between iterations and, so that a cancel lands within a fraction of
    one iteration, after the forward of up to CHECKS_PER_PASS leaf modules spread along the
    model and as their gradients flow back (a hook on every module of a ResNet-50 cost 5% of a
    small render's time)."""

    def __init__(self, model: nn.Module, should_stop: Callable[[], bool] | None):
        self.should_stop = should_stop
        self.handles = []
        if should_stop is not None:
            leaves = [m for m in model.modules() if not next(m.children(), None)]
            for module in leaves[:: -(-len(leaves) // CHECKS_PER_PASS) or 1]:
                self.handles.append(module.register_forward_hook(self._forward))

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise RenderCancelled("the render was cancelled: nobody is waiting for it")

    def _backward(self, grad):
        self.check()

    def _forward(self, module, args, output):
        self.check()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward)

    def __enter__(self) -> StopChecks:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class RenderResult:
    """Images (uint8, N x H x W x 3); per image, its objective and the unit's mean activation
    (for a caricature, whose units are probe images: the cosine similarity of the node's
    activations on it to those on its probe image)."""

    images: np.ndarray
    objective: np.ndarray
    activation: np.ndarray
    units: list[int]
    technique: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[torch.device]:
    """Every CUDA device, else the CPU: where work runs when no device is named."""
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def unit_seed(seed: int, node: str, unit: int, image: int, stream: str) -> int:
    """A 63-bit seed that depends only on what identifies one image of one unit."""
    digest = hashlib.sha256(f"{seed}\0{node}\0{unit}\0{image}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_technique(technique: Technique, node: Node) -> None:
    if technique.class_token and not (node.layout == TOKENS and node.prefix):
        raise MicroscopeError(
            f"technique 'class_token' needs a node of tokens with a class token; node "
            f"{node.name!r} is {node.layout.replace('_', ' ')}"
            + (" without leading tokens" if node.layout == TOKENS else "")
        )


def check_units(node: Node, units: Sequence[int]) -> list[int]:
    units = list(units)
    bad = [
        u for u in units if not isinstance(u, int) or isinstance(u, bool) or not 0 <= u < node.units
    ]
    if bad:
        raise UnitIndexError(
            f"unit {bad[0]!r} is out of range for node {node.name!r}, which has {node.units} "
            f"units (0 … {node.units - 1})"
        )
    return units


def units_of(
    run: Run, node: Node, technique: Technique, units: Sequence[int], image: int | None
) -> list[int]:
    """What a render of `technique` optimizes, checked: `units` of the node; [0] for a
    whole-node technique; probe image indexes for one of probe images, `image` standing for
    `units=[image]`."""
    if image is not None and not technique.compares:
        raise SettingError(
            f"image= names the probe image of a caricature; technique {technique.name!r} "
            "renders units: pass them as units"
        )
    if technique.compares:
        if image is not None:
            if list(units) not in ([], [image]):
                raise SettingError(
                    f"technique {technique.name!r} renders probe images: pass image={image} or "
                    f"units=[{image}], not both (units={list(units)!r})"
                )
            units = [image]
        if not units:
            raise SettingError(
                f"technique {technique.name!r} needs a probe image: pass image= (an index of "
                f"run '{run.name}'s probe images)"
            )
        return check_images(run, units)
    return [0] if technique.whole_node else check_units(node, units)


def check_images(run: Run, images: Sequence[int], count: int | None = None) -> list[int]:
    """Probe image indexes, checked against the run's probe images (which it must have; `count`
    of them, where the caller read them already)."""
    images = list(images)
    count = probe_count(run) if count is None else count
    bad = [i for i in images if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count]
    if bad:
        raise ImageIndexError(
            f"probe image {bad[0]!r} is out of range for run '{run.name}', which has {count} "
            f"probe images (0 … {count - 1})"
        )
    return images


def probe_pictures(run: Run, images: list[int], side: int, device: torch.device) -> torch.Tensor:
    """Probe `images` in [0, 1] on `device`, resized to side x side: the image the engine
    optimizes (lucid resizes the image to the model's size likewise)."""
    pictures = probe_images(run)[images].to(device).float() / 255
    if pictures.shape[-2:] != (side, side):
        pictures = F.interpolate(pictures, size=(side, side), mode="bilinear", antialias=True)
    return pictures


def node_maps(tap: NodeTap, x: torch.Tensor, numerics: Numerics, device: torch.device):
    """The node's maps (float) on inputs `x`, with no gradient: a caricature's target."""
    with torch.no_grad(), numerics.applied(device):
        return tap(x).maps.float()


def optimize(
    model: nn.Module,
    run: Run,
    node: Node,
    units: list[int],
    technique: Technique,
    *,
    size: int,
    iterations: int,
    seed: int,
    device: torch.device,
    bands: Sequence[int] | None = None,
    numerics: Numerics | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    measure: Objective | None = None,
) -> RenderResult:
    """One optimization of all `units` (times the technique's images per unit) as one batch.

    For a technique of probe images (`caricature`), `units` are probe image indexes and the
    objective compares the node's activations with those on the images: at every iteration, on
    the image seen through the same random transforms as its picture, as in lucid's recipe
    (against the untransformed image's alone, pictures ended further from it); at the end, both
    untransformed.
    `progress`, if given, is called with the fraction of iterations done, every 16 iterations;
    `should_stop` is asked often (see `StopChecks`) and raises `RenderCancelled` when true.
    `measure`, if given, is what `activation` reports in place of the unit's channel mean (an
    atlas cell's cosine with its direction, whose units are cells, not channels).
    """
    per_unit = technique.images_per_unit
    targets = [u for u in units for _ in range(per_unit)]
    images_of = [k for _ in units for k in range(per_unit)]
    init = [unit_seed(seed, node.name, u, k, "init") for u, k in zip(targets, images_of)]
    moves = [unit_seed(seed, node.name, u, k, "transform") for u, k in zip(targets, images_of)]
    canvas = fitted_canvas(model, run, size, device)
    space = InputSpace(run.input_spec, device)
    bands = display_bands(space.channels, bands)
    param = FourierImages(init, space.channels, canvas.image, device)
    transforms = RandomTransforms(
        moves, iterations, canvas.image, canvas.input, device, canvas.strength
    )
    tap = NodeTap(model, node)
    unit_index = torch.tensor(targets, device=device)
    # one fused kernel per image (CPU and CUDA): a quarter of the for-loop Adam's time for 16
    fused = True if device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.Adam(param.spectra, lr=learning_rate(iterations), fused=fused)
    numerics = numerics or usable_numerics(model, run, node, size, device)
    channels_last = numerics.channels_last and node.kind == "spatial"
    # the objective while optimizing and on the final image, and what `activation` reports
    optimized = measured = technique
    measure = measure or (class_token if technique.class_token else channel)
    pictures = None
    if technique.compares:  # a caricature: the node's activations on its probe image
        pictures = probe_pictures(run, targets, canvas.image, device)
        probe = centred(pictures, canvas.input) if canvas.padded else pictures
        seen = node_maps(tap, space(probe), numerics, device)  # as the final picture is measured
        measured, measure = technique.bound(seen), cosine(seen)
    gains: list[tuple[int, float]] = []
    silent: list[int] = list(range(len(param.spectra)))  # images whose gradient was all zero
    forced = None
    with StopChecks(model, should_stop) as stop:
        for iteration in range(iterations):
            stop.check()
            if progress is not None and iteration % 16 == 0:
                progress(iteration / iterations)
            optimizer.zero_grad(set_to_none=True)
            x = space(transforms(param(), iteration), centred=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if pictures is not None:  # the probe image through its picture's transforms
                aims = space(transforms(pictures, iteration), centred=True)
                optimized = technique.bound(node_maps(tap, aims, numerics, device))
            redirected = iteration < REDIRECT_ITERATIONS
            redirect = RedirectedReLUs(forced) if redirected else nullcontext()
            with numerics.applied(device), redirect:
                act = tap(x).float()
                loss = -optimized.value(act, unit_index).sum()
                loss.backward()
            if silent and redirected:  # a host sync: mostly at the first iteration only
                lifted, silent = gradient_gains(param.spectra, silent)
                gains += lifted
                if iteration == 0 and silent:  # redirected for all of the first iterations
                    forced = torch.zeros(len(param.spectra), dtype=torch.bool, device=device)
                    forced[silent] = True
            for i, gain in gains:
                param.spectra[i].grad.mul_(gain)
            optimizer.step()
    with torch.no_grad():
        images = param()  # full precision: only the model runs under the numerics' autocast
        shown = centred(images, canvas.input) if canvas.padded else images
        with numerics.applied(device):
            act = tap(space(shown)).float()
        objective = measured.value(act, unit_index)
        activation = measure(act, unit_index)  # the unit's mean (or class token) activation
    if canvas.image != size:  # optimized at the size the model takes: shown at the one asked
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if bands is not None:
        pixels = pixels[:, bands]
    elif pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return RenderResult(
        images=pixels.permute(0, 2, 3, 1).cpu().numpy(),
        objective=objective.cpu().numpy(),
        activation=activation.cpu().numpy(),
        units=targets,
        technique=technique.name,
    )


def _scaled(progress, done: int, chunk: int, total: int):
    """A chunk's progress callback, reporting the fraction of the whole render."""
    if progress is None:
        return None
    return lambda fraction: progress((done + fraction * chunk) / total)


def in_batches(
    count: int,
    batch: int,
    device: torch.device,
    optimize_chunk: Callable[[int, int, Callable[[float], None] | None], RenderResult],
    progress: Callable[[float], None] | None = None,
    on_chunk: Callable[[RenderResult], None] | None = None,
) -> list[RenderResult]:
    """`optimize_chunk(start, stop, progress)` over [0, count) in batches of `batch` pictures,
    the batch halved when the device runs out of memory; on the CPU with the C heap's freed
    memory kept for the next iteration (`heap.kept_heap`). `on_chunk` hears each result."""
    results: list[RenderResult] = []
    start = 0
    with kept_heap() if device.type == "cpu" else nullcontext():
        while start < count:
            stop = min(start + batch, count)
            try:
                result = optimize_chunk(start, stop, _scaled(progress, start, stop - start, count))
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e) or batch == 1:
                    raise
                batch = max(1, batch // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results.append(result)
            if on_chunk is not None:
                on_chunk(result)
            start = stop
    return results


@restores_torch_state
def render(
    run: Run,
    step: int,
    node: str,
    units: Sequence[int],
    technique: str = "channel",
    *,
    size: int = 128,
    iterations: int = 512,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    model: nn.Module | None = None,
    bands: Sequence[int] | None = None,
    numerics: Numerics | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_chunk: Callable[[RenderResult], None] | None = None,
    image: int | None = None,
) -> RenderResult:
    """Feature visualizations of `units` of `node` at `step`.

    Returns uint8 images (N x H x W x 3) with, per image, its objective's final value and the
    unit's mean activation on it. A model of one input channel gives grey images; one of more
    than three shows `bands` (three channel indexes; by default the first three) as RGB. A
    model that takes only its training size is rendered at that size and shown at `size`.
    `diversity` gives several images per unit (consecutive); `deepdream` one image for the whole
    node (units are ignored); `caricature` one image per probe image, whose indexes are its
    units (`image=i` is `units=[i]`). Units are optimized together in batches of `batch_size`
    images (by default as many as the device's free memory holds, at most 32 on CUDA and 16 on
    the CPU: `batch_size_for`); an out-of-memory error halves the batch and retries. `model` may
    pass a model already loaded for this step; `numerics` overrides the device's default
    (`default_numerics`); `progress` is called now and then with the
    fraction of the work done; `should_stop` is asked often, and `RenderCancelled` raised once
    it returns True; `on_chunk` hears each batch's result as soon as it is done.
    """
    spec = get_technique(technique)
    if spec.objective is None:
        other = {"examples": "dataset_examples", "weights": "unit_weights"}[technique]
        raise SettingError(
            f"technique {technique!r} is not an image optimization; use "
            f"tb_microscope.{other}() instead"
        )
    target = run.node(node)
    units = units_of(run, target, spec, units, image)
    check_technique(spec, target)
    check_size(size)
    check_iterations(iterations)
    display_bands(run.input_spec.channels, bands)  # refuses bad bands before any work
    canvas_for(run, size)  # and sizes the model cannot take
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    numerics = numerics or usable_numerics(model, run, target, size, device)
    if batch_size is None:
        batch_size = batch_size_for(model, run, target, size, device, numerics)
    batch = max(1, batch_size // spec.images_per_unit)

    def chunk(start: int, stop: int, scaled) -> RenderResult:
        return optimize(
            model, run, target, units[start:stop], spec, size=size, iterations=iterations,
            seed=seed, device=device, bands=bands, numerics=numerics, progress=scaled,
            should_stop=should_stop,
        )  # fmt: skip

    results = in_batches(len(units), batch, device, chunk, progress, on_chunk)
    return RenderResult(
        images=np.concatenate([r.images for r in results]),
        objective=np.concatenate([r.objective for r in results]),
        activation=np.concatenate([r.activation for r in results]),
        units=[u for r in results for u in r.units],
        technique=technique,
    )
