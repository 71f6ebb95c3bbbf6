"""Attribution: which pixels of an image drive a unit, by Captum's methods.

The quantity attributed is the unit's channel objective (`techniques.channel`: the mean of its
feature map, of its feature over the patch tokens, or its value in a vector), as a function of
the model's input; Captum's `IntegratedGradients`, `Saliency` and `GuidedBackprop` attribute it
to the input's values, which are summed over colour channels: one signed number per pixel,
positive where the pixel (against the baseline, for integrated gradients) raises the unit.

Captum is an extra (`pip install 'tb-microscope[attribution]'`), imported only here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import MicroscopeError
from ..limits import SettingError
from ..nodes import Node
from ..optvis.engine import StopChecks, check_images, check_units, default_device
from ..optvis.param import InputSpace
from ..optvis.probe import probe_images
from ..optvis.tap import NodeTap, frozen
from ..optvis.techniques import channel
from ..optvis.torch_state import restores_torch_state
from ..run import Run

METHODS = ("integrated_gradients", "saliency", "guided_backprop")
IG_STEPS = 50  # Captum's default number of steps along the path from the baseline
IG_BATCH = 16  # images of the path per forward and backward: bounds memory on large models
BASELINE_GREY = 0.5  # the baseline image of integrated gradients: mid-grey, in image space
RELU = "torch.nn.modules.activation.ReLU"  # what torch.export records an nn.ReLU module as
# A heat map's colours: red where a pixel raises the unit, blue where it lowers it.
RAISES, LOWERS = (214, 39, 40), (31, 119, 180)
HEAT_QUANTILE = 0.99  # |values| at this quantile and above are drawn at full strength
HEAT_ALPHA = 0.8  # the most opaque a pixel of the heat map is: the image shows through
HEAT_GAMMA = 2.0  # opacity grows as the square of the strength: the strongest pixels stand out


def captum_attr():
    """`captum.attr`, or an error that names the extra to install (the plugin asks before it
    queues an attribution, so that the tab says so at once)."""
    try:
        import captum.attr
    except ImportError:
        raise MicroscopeError(
            "attribution needs Captum: pip install 'tb-microscope[attribution]'"
        ) from None
    # Captum warns of the hooks GuidedBackprop sets at every call: said once here, for good,
    # rather than by a catch_warnings block, which would change every thread's filters
    warnings.filterwarnings("ignore", "Setting backward hooks on ReLU")
    return captum.attr


class UnitObjective(nn.Module):
    """The unit's channel objective as a function of the model's input, one value per batch
    element: the forward function Captum attributes. The forward stops at the node."""

    def __init__(self, model: nn.Module, node: Node, unit: int):
        super().__init__()
        self.model = model
        self.tap = NodeTap(model, node)
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = torch.full((len(x),), self.unit, dtype=torch.long, device=x.device)
        return channel(self.tap(x).float(), units)


def image_input(run: Run, image: int | torch.Tensor) -> torch.Tensor:
    """One image (1 x C x H x W, floats in [0, 1], on the CPU) from a probe image index or from
    an image tensor in image space: uint8, or floats in [0, 1], C x H x W or 1 x C x H x W."""
    if isinstance(image, int) and not isinstance(image, bool):
        probe = probe_images(run)
        (index,) = check_images(run, [image], len(probe))
        return probe[index : index + 1].float() / 255
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            "image must be a probe image index (int) or an image tensor, not "
            f"{type(image).__name__}"
        )
    x = image.detach().cpu()
    if x.dim() == 3:
        x = x[None]
    channels = run.input_spec.channels
    if x.dim() != 4 or len(x) != 1 or x.shape[1] != channels:
        raise SettingError(
            f"an image tensor must be {channels} x H x W or 1 x {channels} x H x W (the run's "
            f"input has {channels} channels), got {tuple(image.shape)}"
        )
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise SettingError(f"an image tensor must be uint8 or floating point, not {x.dtype}")
    low, high = float(x.min()), float(x.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise SettingError(
            f"an image tensor is in image space, floats in [0, 1] (or uint8), as probe images "
            f"are; got values from {low:.3g} to {high:.3g}: pass the image before the model's "
            "normalization, which is applied here from the run's input spec"
        )
    return x.float()


def relu_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of each submodule that was an `nn.ReLU` when the model was logged but is
    not one now: a model restored by torch.export keeps each as a graph module holding one
    ReLU, which Captum's GuidedBackprop does not recognise."""
    found = []
    for path, module in model.named_modules():
        graph = getattr(module, "graph", None)
        if not path or graph is None or isinstance(module, nn.ReLU) or any(module.children()):
            continue
        kinds = {
            entry[1]
            for n in graph.nodes
            for entry in n.meta.get("nn_module_stack", {}).values()
            if entry[0] == path
        }
        if kinds == {RELU}:
            parent, _, name = path.rpartition(".")
            found.append((model.get_submodule(parent), name))
    return found


@contextmanager
def relus_as_modules(model: nn.Module):
    """The model with each ReLU module torch.export restored as a graph module (`relu_modules`)
    an `nn.ReLU` again while the block runs (its own in-place flag aside: the graph uses the
    result), so that Captum's GuidedBackprop finds and hooks it as it would in the model that
    was logged."""
    swapped = [(parent, name, parent._modules[name]) for parent, name in relu_modules(model)]
    try:
        for parent, name, _ in swapped:
            parent._modules[name] = nn.ReLU()
        yield
    finally:
        for parent, name, original in swapped:
            parent._modules[name] = original


def _guided_backprop(
    model: nn.Module, node: Node, make_objective: Callable[[], nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, str | None]:
    """Captum's GuidedBackprop, which overrides the gradient of the model's `nn.ReLU` modules
    (only: a ReLU called as a function passes its plain gradient, as in Captum); with a note
    where no ReLU module ran before the node, which makes it the plain gradient."""
    attr = captum_attr()
    calls = []
    with relus_as_modules(model):
        objective = make_objective()  # its tap on the node as it is now
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in relus]
        try:
            result = attr.GuidedBackprop(objective).attribute(x)
        finally:
            for handle in handles:
                handle.remove()
    note = None
    if not calls:
        note = (
            f"guided backprop on node {node.name!r}: no nn.ReLU module runs before it, so its "
            "attribution is the plain gradient (saliency); Captum's GuidedBackprop changes "
            "only nn.ReLU modules' gradients"
        )
    return result, note


def attribution(
    run: Run,
    step: int,
    node: str,
    unit: int,
    image: int | torch.Tensor,
    *,
    method: str = "integrated_gradients",
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """How much each pixel of `image` drives `unit` of `node` at `step`: float32, H x W at the
    image's size, signed (positive: the pixel raises the unit's channel objective), Captum's
    attribution summed over the colour channels.

    `image` is a probe image index, or an image tensor in image space (uint8, or floats in
    [0, 1]; C x H x W or 1 x C x H x W), fed to the model with the run's normalization. The
    attribution is to the model's input (the normalized values), as Captum is used on a model:
    - `integrated_gradients`: Captum's `IntegratedGradients` from a mid-grey baseline (0.5 in
      image space, normalized as the image is), IG_STEPS steps: (input - baseline) x the
      average gradient along the path; the pixels sum (to Captum's approximation of the path
      integral) to the objective's change from grey to the image;
    - `saliency`: Captum's `Saliency` with `abs=False`, the signed gradient;
    - `guided_backprop`: Captum's `GuidedBackprop`, the gradient with every `nn.ReLU` module
      passing back only positive gradients (a model restored by torch.export has its ReLU
      modules made `nn.ReLU` again for it; a ReLU called as a function is not changed, as in
      Captum).
    Computed in float32, whatever the engine's numerics. `model` may pass the model at `step`
    already loaded (used by one call at a time: hooks are set on it); `should_stop` is asked
    often, and `RenderCancelled` raised once it returns True. What the caller should know of
    the result (guided backprop that could guide nothing) is said as a warning.
    """
    values, notes = attribution_and_notes(
        run, step, node, unit, image, method=method, device=device, model=model,
        should_stop=should_stop,
    )  # fmt: skip
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return values


@restores_torch_state
def attribution_and_notes(
    run: Run,
    step: int,
    node: str,
    unit: int,
    image: int | torch.Tensor,
    *,
    method: str = "integrated_gradients",
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """`attribution`'s values, and the notes it would warn of, for a caller that shows them
    itself (the plugin's tab): no warning is raised, so no warning filter need be touched."""
    check_method(method)
    captum_attr()
    target = run.node(node)
    (unit,) = check_units(target, [unit])
    pixels = image_input(run, image)
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    return attribute(
        run, model, target, lambda: UnitObjective(model, target, unit), pixels, method=method,
        device=device, should_stop=should_stop,
    )  # fmt: skip


def check_method(method: str) -> str:
    """`method` if it is one of METHODS; else a SettingError (a ValueError) naming them."""
    if method not in METHODS:
        raise SettingError(
            f"attribution method {method!r} is not known; methods: {', '.join(METHODS)}"
        )
    return method


def attribute(
    run: Run,
    model: nn.Module,
    node: Node,
    make_objective: Callable[[], nn.Module],
    pixels: torch.Tensor,
    *,
    method: str,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Captum's `method` (see `attribution`) on the objective `make_objective()` builds (a module
    from the model's input to one value per image whose forward stops at `node`; built anew
    inside guided backprop's swap of ReLU modules) at `pixels` (1 x C x H x W, [0, 1], on the
    CPU): H x W summed over the colour channels, and the notes `attribution` would warn of."""
    notes: list[str] = []
    attr = captum_attr()
    space = InputSpace(run.input_spec, device)
    x = space(pixels.to(device)).requires_grad_(True)
    with StopChecks(model, should_stop) as stop:
        stop.check()
        if method == "integrated_gradients":
            baseline = space(torch.full_like(pixels, BASELINE_GREY).to(device))
            result = attr.IntegratedGradients(make_objective()).attribute(
                x, baselines=baseline, n_steps=IG_STEPS, internal_batch_size=IG_BATCH
            )
        elif method == "saliency":
            result = attr.Saliency(make_objective()).attribute(x, abs=False)
        else:
            result, note = _guided_backprop(model, node, make_objective, x)
            notes += [note] if note else []
    return result.detach().sum(1)[0].float().cpu().numpy(), notes


def heat_map(values: np.ndarray) -> np.ndarray:
    """An attribution (H x W, signed) as an overlay for its image: uint8 H x W x 4 (RGBA), red
    where a pixel raises the unit and blue where it lowers it, transparent where it is zero.
    A pixel's strength is its magnitude against the 99th percentile of the magnitudes (so that
    a few extreme pixels do not wash out the rest), at most 1; its opacity HEAT_ALPHA x
    strength ** HEAT_GAMMA, so that the strongest pixels stand out and the image shows through
    the rest (attributions are often dense: on the demo's conv2, the median pixel had 40% of the
    99th percentile's magnitude). Each map is scaled on its own: its colours say where, its
    values how much."""
    values = np.asarray(values, dtype=np.float32)
    magnitude = np.abs(values)
    scale = float(np.quantile(magnitude, HEAT_QUANTILE)) if magnitude.size else 0.0
    scale = scale if scale > 0 else float(magnitude.max(initial=0.0))
    strength = np.clip(magnitude / scale, 0, 1) if scale > 0 else np.zeros_like(magnitude)
    out = np.empty((*values.shape, 4), np.uint8)
    out[..., :3] = np.where(values[..., None] >= 0, RAISES, LOWERS)
    out[..., 3] = np.round(255 * HEAT_ALPHA * strength**HEAT_GAMMA)
    return out
