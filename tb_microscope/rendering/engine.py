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
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MicroscopeError
from ..nodes import TOKENS, Node
from ..run import Run
from .heap import kept_heap
from .param import Canvas, FourierImages, InputSpace, RandomTransforms, canvas_for, centred
from .tap import NodeTap, frozen
from .techniques import Technique, channel, class_token, get_technique

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


REDIRECT_ITERATIONS = 16  # lucid's: ReLU gradients are redirected for the first 16 iterations
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
    """Images (uint8, N x H x W x 3); per image, its objective and the unit's mean activation."""

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


def display_bands(channels: int, bands: Sequence[int] | None) -> list[int] | None:
    """Which of an image's channels are shown as red, green and blue: None for grey (one
    channel) and RGB as it is; else `bands`, by default the first three."""
    if channels == 1 or (channels == 3 and bands is None):
        return None
    chosen = list(bands) if bands is not None else [0, 1, min(2, channels - 1)]
    if len(chosen) != 3 or not all(isinstance(b, int) and 0 <= b < channels for b in chosen):
        raise ValueError(
            f"bands must be three channel indexes from 0 to {channels - 1}, got {bands!r}"
        )
    return chosen


class _RedirectedReLU(torch.autograd.Function):
    """ReLU (or, with `high`, a ReLU capped there: MobileNets' ReLU6) whose backward, for a
    sample whose gradient it would block entirely, lets through the gradient that pushes inputs
    below zero up. Decided per sample, so batch-mates never interact."""

    @staticmethod
    def forward(ctx, x, forced, high=None):
        out = x.clamp_min(0) if high is None else x.clamp(0, high)
        ctx.save_for_backward(out)
        ctx.forced = forced if forced is not None and len(forced) == len(x) else None
        ctx.high = high
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if ctx.high is None:
            passed = torch.ops.aten.threshold_backward(grad, out, 0)  # ReLU's own gradient
            return _redirected(ctx, grad, passed, None), None, None
        passed = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.high)  # ReLU6's own
        # raising an input above `high` changes nothing: below zero only
        return _redirected(ctx, grad, passed, out <= 0), None, None


def _redirected(ctx, grad, passed, below):
    # A sample is blocked when none of its gradient passes; then its inputs below the range pass
    # the gradient that raises them too (the loss is minimized: a negative gradient).
    # abs().amax() is the cheapest per-sample test on the CPU (boolean reductions are several
    # times slower, and a flatten copies a channels-last tensor); there, the rare blocked case
    # is only computed when it occurs.
    level = passed.abs()
    if level.dim() > 1:  # reduced over the sample's values in their memory order: no copy
        level = level.amax(dim=tuple(range(1, level.dim())))
    blocked = level == 0
    if ctx.forced is not None:
        blocked = blocked | ctx.forced
    if grad.device.type == "cpu" and not bool(blocked.any()):
        return passed
    redirect = blocked.view(-1, *[1] * (grad.dim() - 1)) & (grad <= 0)
    if below is not None:
        redirect &= below
    return torch.where(redirect, grad, passed)


_RELUS = {
    torch.relu,
    F.relu,
    torch.ops.aten.relu.default,
    torch.relu_,
    F.relu_,
    torch.ops.aten.relu_.default,
}
_HARDTANHS = {F.hardtanh, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}


def _relu6_input(func, args, kwargs) -> torch.Tensor | None:
    """The input of a hardtanh call that is a ReLU6 (from 0 to 6), else None."""
    if func is F.relu6:
        return args[0] if args else kwargs["input"]
    if func not in _HARDTANHS:
        return None
    names = ("input" if func is F.hardtanh else "self", "min_val", "max_val")
    given = dict(zip(names, args)) | kwargs
    if given.get("min_val", -1.0) == 0 and given.get("max_val", 1.0) == 6:
        return given[names[0]]
    return None


class RedirectedReLUs(TorchFunctionMode):
    """Every ReLU (and ReLU6) of the forward pass as `_RedirectedReLU`. An in-place one becomes
    out-of-place: exported graphs use its result, not its mutated input.

    `forced` (one flag per image) redirects an image's gradient at every ReLU of its batch size,
    blocked or not: for a unit whose only activity the image cannot change, so that its image
    got no gradient at all (a first-layer unit that fires only where the convolution's zero
    padding meets the grey canvas, and nowhere on the image)."""

    def __init__(self, forced: torch.Tensor | None = None):
        super().__init__()
        self.forced = forced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            if func in _RELUS:
                x = args[0] if args else kwargs["input"]
                return _RedirectedReLU.apply(x, self.forced)
            x = _relu6_input(func, args, kwargs)
            if x is not None:
                return _RedirectedReLU.apply(x, self.forced, 6.0)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Numerics:
    """How the engine computes, per device (`benchmarks/numerics.py` measures each choice for
    speed and for batch invariance: a unit's picture alone and among others must agree).

    `onednn`: the CPU's convolutions from oneDNN rather than PyTorch's own; `nnpack`: NNPACK's
    for batches of 16 and more (PyTorch's default when oneDNN is off); `channels_last`: the
    input in N x H x W x C memory order; `autocast`: a lower-precision dtype (bf16);
    `tf32`: TF32 matrix products on CUDA."""

    onednn: bool = False
    nnpack: bool = False
    channels_last: bool = False
    autocast: torch.dtype | None = None
    tf32: bool = False

    def _switch(self, device: torch.device) -> Callable[[], None]:
        """Sets the process-wide switches these numerics need on `device`; returns what puts
        them back."""
        if device.type == "cuda":
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

            def restore() -> None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

            return restore
        # set_flags with only `enabled`: torch.backends.mkldnn.flags() also sets oneDNN's TF32
        # switch, which makes this CPU build print a warning about Intel GPUs.
        previous = torch.backends.mkldnn.set_flags(self.onednn, _fp32_precision=None)
        nnpack = torch.backends.nnpack.set_flags(self.nnpack)

        def restore() -> None:
            torch.backends.nnpack.set_flags(*nnpack)
            torch.backends.mkldnn.set_flags(previous[0], _fp32_precision=None)

        return restore

    def _switches(self, device: torch.device) -> tuple:
        return (self.tf32,) if device.type == "cuda" else (self.onednn, self.nnpack)

    @contextmanager
    def applied(self, device: torch.device) -> Iterator[None]:
        """These numerics while the block runs. The switches are process-wide, so workers on
        several devices share them: the first to enter sets them, the last to leave puts them
        back, and one that needs other switches waits until nobody uses the current ones."""
        kind = "cuda" if device.type == "cuda" else "cpu"
        switches = self._switches(device)
        with _SWITCHES:
            while _IN_USE[kind]["count"] and _IN_USE[kind]["switches"] != switches:
                _SWITCHES.wait()
            if not _IN_USE[kind]["count"]:
                _IN_USE[kind].update(switches=switches, restore=self._switch(device))
            _IN_USE[kind]["count"] += 1
        try:
            with torch.autocast(kind, dtype=self.autocast, enabled=bool(self.autocast)):
                yield  # autocast is per thread
        finally:
            with _SWITCHES:
                _IN_USE[kind]["count"] -= 1
                if not _IN_USE[kind]["count"]:
                    _IN_USE[kind]["restore"]()
                    _SWITCHES.notify_all()


_SWITCHES = threading.Condition()  # guards _IN_USE: the numerics switches in use per device kind
_IN_USE = {kind: {"count": 0, "switches": None, "restore": None} for kind in ("cpu", "cuda")}


def default_numerics(device: torch.device, model: nn.Module | None = None) -> Numerics:
    """The fastest choice that keeps pictures batch-invariant, as measured by
    benchmarks/numerics.py (the README's numerics table).

    On a CPU with AVX512-BF16 (and without AMX, whose kernels were not measured), a `model`
    with more than one convolution kernel runs under bf16 autocast with oneDNN's convolutions
    and channels-last input: each sample computed alike at every batch size, and 2x to 8x
    faster than in fp32 (depthwise convolutions most). Transformers, whose one kernel is a
    patch embedding, stay in fp32: torchvision's ViT-B took 1.7x longer in bf16 (its attention
    copies its bf16 inputs around), other ViTs gained 1.1x to 1.3x. Otherwise on the CPU:
    PyTorch's own convolutions without NNPACK. oneDNN's fp32 kernels, and NNPACK's (PyTorch's
    choice for batches of 16 and more when oneDNN is off), compute a sample differently by
    batch size (1e-5 apart), which 32 iterations amplify to pictures 4 to 9 levels apart on
    average; PyTorch's own compute each sample alike. On CUDA (not measured yet): bf16
    autocast and channels-last."""
    if device.type == "cuda":
        return Numerics(channels_last=True, autocast=torch.bfloat16)
    if model is not None and cpu_has_bf16() and convolution_kernels(model) > 1:
        return Numerics(onednn=True, channels_last=True, autocast=torch.bfloat16)
    return Numerics()


def usable_numerics(
    model: nn.Module, run: Run, node: Node, size: int, device: torch.device
) -> Numerics:
    """`default_numerics`, unless the model has an operation without a kernel for its lower
    precision on this device (an antialiased resize has no bf16 one on the CPU): then fp32.
    Found by one image's forward and backward to the node; remembered per model, node and
    size."""
    chosen = default_numerics(device, model)
    if not chosen.autocast:
        return chosen
    key = ("numerics", node.name, node.calls, size, str(device))
    known = _MEASURED.setdefault(model, {})
    if key not in known:
        x = grey_image(model, run, size, device)
        try:
            with chosen.applied(device):
                maps = NodeTap(model, node)(InputSpace(run.input_spec, device)(x)).maps
                maps.float().sum().backward()
            known[key] = chosen
        except RuntimeError as e:  # NotImplementedError among them
            if str(chosen.autocast).removeprefix("torch.") not in str(e).lower():
                raise
            known[key] = Numerics()
    return known[key]


def grey_image(model: nn.Module, run: Run, size: int, device: torch.device) -> torch.Tensor:
    """One mid-grey input of the canvas the engine optimizes at `size`, needing a gradient."""
    canvas = fitted_canvas(model, run, size, device)
    x = torch.full((1, run.input_spec.channels, *canvas.input), 0.5, device=device)
    return x.requires_grad_(True)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively in the kernels the numerics were measured on."""
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(native and not amx and torch.backends.mkldnn.is_available())


def convolution_kernels(model: nn.Module) -> int:
    """How many of `model`'s weights are convolution kernels (three or more dimensions)."""
    return sum(
        1 for name, p in model.named_parameters() if name.endswith("weight") and p.dim() >= 3
    )


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
) -> RenderResult:
    """One optimization of all `units` (times the technique's images per unit) as one batch.

    `progress`, if given, is called with the fraction of iterations done, every 16 iterations;
    `should_stop` is asked often (see `StopChecks`) and raises `RenderCancelled` when true.
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
            redirected = iteration < REDIRECT_ITERATIONS
            redirect = RedirectedReLUs(forced) if redirected else nullcontext()
            with numerics.applied(device), redirect:
                act = tap(x).float()
                loss = -technique.value(act, unit_index).sum()
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
        objective = technique.value(act, unit_index)
        measure = class_token if technique.class_token else channel
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


BATCH_CAPS = {"cuda": 32, "cpu": 16}  # the most units per optimization, per device type
MEMORY_SHARE = 0.5  # of the device's free memory, one optimization may plan to use


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: CUDA's free memory plus what PyTorch holds unused;
    on the CPU, Linux's MemAvailable. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# per model: what was measured on it (an image's bytes, the numerics it can run under)
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CANVASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
STRIDES = (8, 16, 32, 64)  # the multiples a canvas's side grows to where the model needs one


def fitted_canvas(model: nn.Module, run: Run, size: int, device: torch.device) -> Canvas:
    """`canvas_for`'s canvas, with a side the model runs at.

    Some models take only multiples of their stride: DLA and HRNet add feature maps from paths
    that round odd sizes differently, and run at multiples of 32 px alone. Where a forward pass
    fails at the canvas's side, the side grows to the next multiple of 8, 16, 32 or 64 that
    runs (the image keeps its size, with more grey around it). Tried once per model and size;
    a model of one fixed input size has nothing to try."""
    canvas = canvas_for(run, size)
    height, width = run.input_spec.dim("height"), run.input_spec.dim("width")
    if height["size"] is not None or width["size"] is not None:
        return canvas
    known = _CANVASES.setdefault(model, {})
    if size not in known:
        least = max(height["min"] or 1, width["min"] or 1)
        most = min(height["max"] or 1 << 30, width["max"] or 1 << 30)
        side = canvas.input[0]
        sides = [side] + [-(-side // m) * m for m in STRIDES]
        space = InputSpace(run.input_spec, device)
        first_error = None
        for tried in dict.fromkeys(s for s in sides if least <= s <= most):
            x = torch.full((1, run.input_spec.channels, tried, tried), 0.5, device=device)
            try:
                with torch.no_grad():
                    model(space(x))
            except Exception as e:  # whatever the model raises at a size it does not take
                if _is_out_of_memory(e):
                    raise
                first_error = first_error or e
                continue
            fits = Canvas((tried, tried), canvas.image, True, canvas.strength)
            known[size] = canvas if tried == side else fits
            break
        else:
            raise first_error or MicroscopeError(f"no input size fits run '{run.name}'")
    return known[size]


def sample_bytes(
    model: nn.Module,
    run: Run,
    node: Node,
    size: int,
    device: torch.device,
    numerics: Numerics | None = None,
) -> int:
    """Memory one image takes in an optimization of `node` at `size`: what the forward pass to
    the node keeps for the backward (measured on one image, with the numerics the engine uses;
    the model's weights are not counted), twice over for the gradients the backward makes.
    Remembered per model, node and size."""
    numerics = numerics or usable_numerics(model, run, node, size, device)
    key = (node.name, node.calls, size, str(device), numerics)
    known = _MEASURED.setdefault(model, {})
    if key not in known:
        x = grey_image(model, run, size, device)
        storages: dict[int, int] = {}
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # the same for any batch: not per image
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with numerics.applied(device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            maps = NodeTap(model, node)(InputSpace(run.input_spec, device)(x)).maps
        known[key] = 2 * (sum(storages.values()) + maps.numel() * maps.element_size())
    return known[key]


def batch_size_for(
    model: nn.Module,
    run: Run,
    node: Node,
    size: int,
    device: torch.device,
    numerics: Numerics | None = None,
    free: int | None = None,
) -> int:
    """How many images one optimization takes on `device`: as many as fit in MEMORY_SHARE of
    its free memory (`free` bytes, by default `free_memory(device)`), at most BATCH_CAPS's
    (beyond which the first pictures only come later), at least one."""
    cap = BATCH_CAPS.get(device.type, BATCH_CAPS["cpu"])
    free = free_memory(device) if free is None else free
    if free is None:
        return cap
    fits = int(free * MEMORY_SHARE) // sample_bytes(model, run, node, size, device, numerics)
    return max(1, min(cap, fits))


def _scaled(progress, done: int, chunk: int, total: int):
    """A chunk's progress callback, reporting the fraction of the whole render."""
    if progress is None:
        return None
    return lambda fraction: progress((done + fraction * chunk) / total)


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    cpu_words = "can't allocate memory"
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or cpu_words in text


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
) -> RenderResult:
    """Feature visualizations of `units` of `node` at `step`.

    Returns uint8 images (N x H x W x 3) with, per image, its objective's final value and the
    unit's mean activation on it. A model of one input channel gives grey images; one of more
    than three shows `bands` (three channel indexes; by default the first three) as RGB. A
    model that takes only its training size is rendered at that size and shown at `size`.
    `diversity` gives several images per unit (consecutive); `deepdream` one image for the whole
    node (units are ignored). Units are optimized together in batches of `batch_size` images (by
    default as many as the device's free memory holds, at most 32 on CUDA and 16 on the CPU:
    `batch_size_for`); an out-of-memory error halves the batch and retries. `model` may
    pass a model already loaded for this step; `numerics` overrides the device's default
    (`default_numerics`); `progress` is called now and then with the
    fraction of the work done; `should_stop` is asked often, and `RenderCancelled` raised once
    it returns True; `on_chunk` hears each batch's result as soon as it is done.
    """
    spec = get_technique(technique)
    if spec.objective is None:
        other = {"examples": "dataset_examples", "weights": "unit_weights"}[technique]
        raise ValueError(
            f"technique {technique!r} is not an image optimization; use "
            f"tb_microscope.{other}() instead"
        )
    target = run.node(node)
    units = [0] if spec.whole_node else check_units(target, units)
    check_technique(spec, target)
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise ValueError(f"size must be a whole number of pixels from 8 to 1024, got {size!r}")
    if not isinstance(iterations, int) or not 1 <= iterations <= 100_000:
        raise ValueError(f"iterations must be from 1 to 100000, got {iterations!r}")
    display_bands(run.input_spec.channels, bands)  # refuses bad bands before any work
    canvas_for(run, size)  # and sizes the model cannot take
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    numerics = numerics or usable_numerics(model, run, target, size, device)
    if batch_size is None:
        batch_size = batch_size_for(model, run, target, size, device, numerics)
    batch = max(1, batch_size // spec.images_per_unit)
    results, start = [], 0
    with kept_heap() if device.type == "cpu" else nullcontext():
        while start < len(units):
            chunk = units[start : start + batch]
            try:
                result = optimize(
                    model,
                    run,
                    target,
                    chunk,
                    spec,
                    size=size,
                    iterations=iterations,
                    seed=seed,
                    device=device,
                    bands=bands,
                    numerics=numerics,
                    progress=_scaled(progress, start, len(chunk), len(units)),
                    should_stop=should_stop,
                )
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_out_of_memory(e) or batch == 1:
                    raise
                batch = max(1, batch // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results.append(result)
            if on_chunk is not None:
                on_chunk(result)
            start += len(chunk)
    return RenderResult(
        images=np.concatenate([r.images for r in results]),
        objective=np.concatenate([r.objective for r in results]),
        activation=np.concatenate([r.activation for r in results]),
        units=[u for r in results for u in r.units],
        technique=technique,
    )
