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
from ..nodes import Node
from ..run import Run
from .engine import StopChecks, check_images, check_units, default_device
from .param import InputSpace
from .probe import probe_images
from .tap import NodeTap, frozen
from .techniques import channel

METHODS = ("integrated_gradients", "saliency", "guided_backprop")
IG_STEPS = 50  # Captum's default number of steps along the path from the baseline
IG_BATCH = 16  # images of the path per forward and backward: bounds memory on large models
BASELINE_GREY = 0.5  # the baseline image of integrated gradients: mid-grey, in image space
RELU = "torch.nn.modules.activation.ReLU"  # what torch.export records an nn.ReLU module as


def _captum():
    """`captum.attr`, or an error that names the extra to install."""
    try:
        import captum.attr
    except ImportError:
        raise MicroscopeError(
            "attribution needs Captum: pip install 'tb-microscope[attribution]'"
        ) from None
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
        raise ValueError(
            f"an image tensor must be {channels} x H x W or 1 x {channels} x H x W (the run's "
            f"input has {channels} channels), got {tuple(image.shape)}"
        )
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise ValueError(f"an image tensor must be uint8 or floating point, not {x.dtype}")
    low, high = float(x.min()), float(x.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
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


def _guided_backprop(model: nn.Module, node: Node, unit: int, x: torch.Tensor) -> torch.Tensor:
    """Captum's GuidedBackprop, which overrides the gradient of the model's `nn.ReLU` modules
    (only: a ReLU called as a function passes its plain gradient, as in Captum); warns where no
    ReLU module ran before the node, which makes it the plain gradient."""
    attr = _captum()
    calls = []
    with relus_as_modules(model):
        objective = UnitObjective(model, node, unit)  # its tap on the node as it is now
        relus = [m for m in objective.modules() if isinstance(m, nn.ReLU)]
        handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in relus]
        try:
            with warnings.catch_warnings():  # Captum warns of its hooks at every call
                warnings.filterwarnings("ignore", "Setting backward hooks on ReLU")
                result = attr.GuidedBackprop(objective).attribute(x)
        finally:
            for handle in handles:
                handle.remove()
    if not calls:
        warnings.warn(
            f"guided backprop on node {node.name!r}: no nn.ReLU module runs before it, so its "
            "attribution is the plain gradient (saliency); Captum's GuidedBackprop changes "
            "only nn.ReLU modules' gradients",
            stacklevel=3,
        )
    return result


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
    often, and `RenderCancelled` raised once it returns True.
    """
    if method not in METHODS:
        raise ValueError(
            f"attribution method {method!r} is not known; methods: {', '.join(METHODS)}"
        )
    attr = _captum()
    target = run.node(node)
    (unit,) = check_units(target, [unit])
    pixels = image_input(run, image)
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    space = InputSpace(run.input_spec, device)
    x = space(pixels.to(device)).requires_grad_(True)
    with StopChecks(model, should_stop) as stop:
        stop.check()
        if method == "integrated_gradients":
            baseline = space(torch.full_like(pixels, BASELINE_GREY).to(device))
            result = attr.IntegratedGradients(UnitObjective(model, target, unit)).attribute(
                x, baselines=baseline, n_steps=IG_STEPS, internal_batch_size=IG_BATCH
            )
        elif method == "saliency":
            result = attr.Saliency(UnitObjective(model, target, unit)).attribute(x, abs=False)
        else:
            result = _guided_backprop(model, target, unit, x)
    return result.detach().sum(1)[0].float().cpu().numpy()
