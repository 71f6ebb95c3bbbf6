"""Feeding a run's probe images (the Logger's `probe=`) through the model at a step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MicroscopeError
from ..nodes import Node
from ..run import Run
from .param import InputSpace, display_bands
from .tap import NodeTap


def probe_images(run: Run) -> torch.Tensor:
    images = run.probe_images()
    if images is None:
        raise MicroscopeError(
            f"run '{run.name}' has no probe images; pass probe= (a few hundred training inputs) "
            "to tb_microscope.Logger to get dataset examples and activation histories"
        )
    return images


def as_rgb(image: torch.Tensor, bands: Sequence[int] | None = None) -> np.ndarray:
    """A probe image (uint8 C x H x W) as uint8 H x W x 3: grey as grey, RGB as it is, other
    channel counts through `bands` (by default the first three; see `display_bands`)."""
    chosen = display_bands(image.shape[0], bands)
    if chosen is None:
        chosen = [0, 0, 0] if image.shape[0] == 1 else [0, 1, 2]
    return image[chosen].permute(1, 2, 0).contiguous().numpy()


def probe_count(run: Run) -> int:
    """How many probe images the run has: its manifest says, without reading them (else its
    store); none is `probe_images`' error saying how to log them."""
    probe = run.manifest.probe
    return probe.count if probe is not None else len(probe_images(run))


def probe_activations(
    run: Run, model: nn.Module, node: Node, device: torch.device, batch: int = 64
) -> torch.Tensor:
    """The node's activations on every probe image, on the CPU: its tap's maps (N x C x H x W,
    tokens on their grid, or N x F)."""
    images = probe_images(run)
    space, tap = InputSpace(run.input_spec, device), NodeTap(model, node)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device).float() / 255
            out.append(tap(space(x)).maps.float().cpu())
    return torch.cat(out)
