"""The optimization engine: feature visualization of a run's units at a step.

`engine.py` runs lucid's recipe (`render`); `param.py` the image parameterization and
transforms; `techniques.py` the objectives; `tap.py` the node tap that stops the forward at a
node; `relu.py` redirected ReLUs; `numerics.py`, `batching.py`, `canvas.py`, `memory.py` and
`heap.py` precision, batch sizes, canvases and memory; `torch_state.py` torch's global settings
put back after every render and analysis; `probe.py` the run's probe images.
"""

from .engine import ENGINE_VERSION, ImageIndexError, RenderResult, UnitIndexError, render
from .techniques import TECHNIQUES, get_technique

__all__ = [
    "ENGINE_VERSION",
    "ImageIndexError",
    "RenderResult",
    "TECHNIQUES",
    "UnitIndexError",
    "get_technique",
    "render",
]
