"""How many images one optimization takes: as many as fit in a share of the device's free
memory (`batch_size_for`), an image's share measured on the forward pass to the node
(`sample_bytes`), at most BATCH_CAPS's per device type.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..nodes import Node
from ..run import Run
from .canvas import grey_image
from .memory import free_memory
from .numerics import Numerics, usable_numerics
from .param import InputSpace
from .tap import NodeTap

BATCH_CAPS = {"cuda": 32, "cpu": 16}  # the most units per optimization, per device type
MEMORY_SHARE = 0.5  # of the device's free memory, one optimization may plan to use

# per model: an image's bytes, per node, size, device and numerics
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
