"""Architecture capture (training side) and restore (reading side).

A run must be rebuilt by a process that cannot import the training script. The primary capture is
`torch.export` with a dynamic batch dimension and, for images, dynamic height and width; it is
restored with `torch.export.unflatten`, which gives back the module hierarchy so forward hooks on
named submodules fire (the program is stored without weights: `architecture.py`). Models that do
not export (data-dependent Python control flow, say) fall back to a cloudpickled copy of the
module with its weights on the `meta` device; reading that back runs code from the log
directory, so readers must opt in.
"""

from .child import CaptureProcessError, ChildCapture, capture_in_child
from .discovery import (
    discover_nodes,
    eval_mode,
    innermost_edges,
    original_forward,
    select_nodes,
    unwrap,
)
from .export import Capture, ExportTimeout, capture, exported_edges, program_nodes, time_limit
from .pickled import pickle_architecture

__all__ = [
    "Capture",
    "CaptureProcessError",
    "ChildCapture",
    "ExportTimeout",
    "capture",
    "capture_in_child",
    "discover_nodes",
    "eval_mode",
    "exported_edges",
    "innermost_edges",
    "original_forward",
    "pickle_architecture",
    "program_nodes",
    "select_nodes",
    "time_limit",
    "unwrap",
]
