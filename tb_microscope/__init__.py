"""tb_microscope: OpenAI Microscope over training, as a TensorBoard plugin.

`Logger` saves a model's weights at chosen steps into a run directory; `open_run` reads a run back
(steps, nodes, edges) and rebuilds the model at any logged step without the training script;
`render` draws feature visualizations of its units, `dataset_examples`, `unit_weights` and
`unit_history` the other views of a unit; `node_dynamics`, `model_dynamics` and `align_units`
show how nodes and units change over training and match units across runs.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CorruptSnapshotError,
    IncompatibleRunError,
    MicroscopeError,
    NodeNotFoundError,
    PickleNotAllowedError,
    RunNotFoundError,
    StepNotFoundError,
)
from .logger import Logger, SnapshotWriteError  # noqa: E402
from .run import Run, find_runs, open_run  # noqa: E402

__all__ = [
    "CorruptSnapshotError",
    "IncompatibleRunError",
    "Logger",
    "MicroscopeError",
    "NodeNotFoundError",
    "PickleNotAllowedError",
    "RenderCache",
    "Run",
    "RunNotFoundError",
    "SnapshotWriteError",
    "StepNotFoundError",
    "UnitIndexError",
    "align_units",
    "dataset_examples",
    "find_runs",
    "model_dynamics",
    "node_dynamics",
    "open_run",
    "render",
    "unit_history",
    "unit_weights",
]

_RENDERING = {
    "RenderCache",
    "UnitIndexError",
    "align_units",
    "dataset_examples",
    "model_dynamics",
    "node_dynamics",
    "render",
    "unit_history",
    "unit_weights",
}


def __getattr__(name: str):
    """The rendering API loads on first use, so a training script importing the Logger stays
    light (no image or optimization code)."""
    if name in _RENDERING:
        from . import rendering

        return getattr(rendering, name)
    raise AttributeError(f"module 'tb_microscope' has no attribute {name!r}")
