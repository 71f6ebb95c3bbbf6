"""The canvas a model runs at: `canvas_for`'s (param.py), its side grown to the next multiple of
a stride where the model runs at those alone (`fitted_canvas`), and a grey image of it
(`grey_image`) for what is measured on a model before an optimization (its numerics, its bytes
per image).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import MicroscopeError
from ..run import Run
from .memory import is_out_of_memory
from .param import Canvas, InputSpace, canvas_for

# per model: the canvas it runs at, per size
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
            x = torch.full(
                (1, run.input_spec.channels, tried, tried), 0.5, device=device, dtype=torch.float32
            )
            try:
                with torch.no_grad():
                    model(space(x))
            except Exception as e:  # whatever the model raises at a size it does not take
                if is_out_of_memory(e):
                    raise
                first_error = first_error or e
                continue
            fits = Canvas((tried, tried), canvas.image, True, canvas.strength)
            known[size] = canvas if tried == side else fits
            break
        else:
            raise first_error or MicroscopeError(f"no input size fits run '{run.name}'")
    return known[size]


def grey_image(model: nn.Module, run: Run, size: int, device: torch.device) -> torch.Tensor:
    """One mid-grey input of the canvas the engine optimizes at `size`, needing a gradient."""
    canvas = fitted_canvas(model, run, size, device)
    x = torch.full(
        (1, run.input_spec.channels, *canvas.input), 0.5, device=device, dtype=torch.float32
    )
    return x.requires_grad_(True)
