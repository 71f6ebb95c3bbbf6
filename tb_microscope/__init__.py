"""tb_microscope: OpenAI Microscope over training, as a TensorBoard plugin.

`Logger` saves a model's weights at chosen steps into a run directory; `open_run` reads a run back
(steps, nodes, edges) and rebuilds the model at any logged step without the training script;
`render` draws feature visualizations of its units, `dataset_examples`, `attribution`,
`unit_weights` and `unit_history` the other views of a unit; `node_dynamics`, `model_dynamics`
and `align_units` show how nodes and units change over training and match units across runs;
`activation_atlas` draws the space a node's units span together, at any step; `concepts` factors
it into a dictionary of directions, matched over training.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from .errors import (  # noqa: E402
    CorruptSnapshotError,
    IncompatibleRunError,
    MicroscopeError,
    NodeNotFoundError,
    PickleNotAllowedError,
    RunNotFoundError,
    StepNotFoundError,
)

__all__ = [
    "Atlas",
    "Concepts",
    "CorruptSnapshotError",
    "ImageIndexError",
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
    "activation_atlas",
    "align_units",
    "attribution",
    "concepts",
    "dataset_examples",
    "find_runs",
    "model_dynamics",
    "node_dynamics",
    "open_run",
    "render",
    "unit_history",
    "unit_weights",
]

# Each public name and the module it comes from, loaded on first use: `tb-microscope --help`
# and a training script's `import tb_microscope` do not import torch until they need it, nor
# the image and optimization code at all unless they render.
_LAZY = {
    "Logger": "training.logger",
    "SnapshotWriteError": "training.logger",
    "Run": "run",
    "find_runs": "store.paths",
    "open_run": "run",
    "Atlas": "analysis.atlas",
    "activation_atlas": "analysis.atlas",
    "Concepts": "analysis.concepts",
    "concepts": "analysis.concepts",
    "align_units": "analysis.dynamics",
    "model_dynamics": "analysis.dynamics",
    "node_dynamics": "analysis.dynamics",
    "attribution": "analysis.attribution",
    "dataset_examples": "analysis.examples",
    "unit_history": "analysis.history",
    "unit_weights": "analysis.weights",
    "ImageIndexError": "optvis.engine",
    "UnitIndexError": "optvis.engine",
    "render": "optvis.engine",
    "RenderCache": "execution.cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tb_microscope' has no attribute {name!r}")
