"""Dataset examples: the probe images that most excite a unit, with the crop around its peak."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nodes import Node
from ..optvis.engine import check_units, default_device
from ..optvis.param import InputSpace
from ..optvis.probe import as_rgb, probe_activations, probe_images
from ..optvis.tap import NodeTap, frozen
from ..optvis.torch_state import restores_torch_state
from ..run import Run


@dataclass
class Example:
    index: int  # which probe image
    activation: float  # the unit's strongest activation on it (over positions)
    position: tuple[int, int] | None  # (row, column) of that peak in the node's grid
    box: tuple[int, int, int, int]  # (top, left, bottom, right): the pixels the peak depends on
    image: np.ndarray  # uint8 H x W x 3, the whole probe image
    crop: np.ndarray  # uint8, the image inside `box`


def receptive_boxes(
    model: nn.Module,
    run: Run,
    node: Node,
    images: torch.Tensor,
    weights: torch.Tensor,
    positions: Sequence[tuple[int, int]],
    device: torch.device,
) -> list[tuple[int, int, int, int]]:
    """The input pixels each image's activation at its position, weighted by its row of
    `weights` (N x units: one-hot for a unit, a concept's direction), depends on, from one
    batched backward: (top, left, bottom, right) per image (uint8 N x C x H x W)."""
    space, tap = InputSpace(run.input_spec, device), NodeTap(model, node)
    x = (images.to(device).float() / 255).requires_grad_(True)
    act = tap(space(x)).maps.float()
    index = torch.arange(len(images), device=device)
    if act.dim() == 4:
        rows = torch.tensor([p[0] for p in positions], device=device)
        cols = torch.tensor([p[1] for p in positions], device=device)
        picked = act[index, :, rows, cols]
    else:
        picked = act
    (picked * weights.to(device).float()).sum().backward()
    weight = x.grad.abs().sum(1).cpu()  # N x H x W
    boxes = []
    for w in weight:
        mask = w > 1e-3 * w.max() if w.max() > 0 else torch.ones_like(w, dtype=torch.bool)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append((int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
    return boxes


@restores_torch_state
def dataset_examples(
    run: Run,
    step: int,
    node: str,
    units: Sequence[int],
    *,
    count: int = 8,
    negative: bool = False,
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
) -> dict[int, list[Example]]:
    """For each unit, the `count` probe images with its strongest (or, `negative`, weakest)
    activation, strongest first, each with the box of pixels its peak position depends on."""
    target = run.node(node)
    units = check_units(target, units)
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    images = probe_images(run)
    act = probe_activations(run, model, target, device)
    sign = -1.0 if negative else 1.0
    chosen = []  # (unit, image index, activation, position)
    for unit in units:
        maps = sign * act[:, unit]
        flat = maps.flatten(1) if maps.dim() == 3 else maps[:, None]
        peak, where = flat.max(1)
        for i in peak.argsort(descending=True)[: min(count, len(images))].tolist():
            position = divmod(int(where[i]), maps.shape[2]) if maps.dim() == 3 else None
            chosen.append((unit, i, sign * float(peak[i]), position))
    boxes = receptive_boxes(
        model,
        run,
        target,
        images[[c[1] for c in chosen]],
        F.one_hot(torch.tensor([c[0] for c in chosen]), target.units),
        [c[3] or (0, 0) for c in chosen],
        device,
    )
    out: dict[int, list[Example]] = {u: [] for u in units}
    for (unit, i, value, position), box in zip(chosen, boxes):
        picture = as_rgb(images[i])
        top, left, bottom, right = box
        out[unit].append(
            Example(i, value, position, box, picture, picture[top:bottom, left:right].copy())
        )
    return out
