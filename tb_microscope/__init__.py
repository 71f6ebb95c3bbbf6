"""tb_microscope: OpenAI Microscope over training, as a TensorBoard plugin.

`Logger` saves a model's weights at chosen steps into a run directory; `open_run` reads a run back
(steps, nodes, edges) and rebuilds the model at any logged step without the training script.
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
    "Run",
    "RunNotFoundError",
    "SnapshotWriteError",
    "StepNotFoundError",
    "find_runs",
    "open_run",
]
