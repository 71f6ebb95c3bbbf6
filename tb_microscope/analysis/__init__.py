"""Analyses of a run beyond one unit's picture, computed from its snapshots and probe images:
dataset examples (`examples.py`), a unit's strongest weights (`weights.py`), activation
histories (`history.py`), dynamics and unit matching across steps and runs (`dynamics.py`,
with `embedding.py`'s layouts), attribution with Captum (`attribution.py`), activation
atlases (`atlas.py`) and concepts, dictionaries of a node's directions (`concepts.py`). Their
pictures go through `optvis`; their results through the render cache.
"""

from .atlas import Atlas, activation_atlas
from .attribution import attribution
from .concepts import Concepts, concepts
from .dynamics import (
    Alignment,
    ModelDynamics,
    NodeDynamics,
    align_units,
    model_dynamics,
    node_dynamics,
)
from .examples import Example, dataset_examples
from .history import unit_history
from .weights import Connection, unit_weights

__all__ = [
    "Alignment",
    "Atlas",
    "Concepts",
    "Connection",
    "Example",
    "ModelDynamics",
    "NodeDynamics",
    "activation_atlas",
    "align_units",
    "attribution",
    "concepts",
    "dataset_examples",
    "model_dynamics",
    "node_dynamics",
    "unit_history",
    "unit_weights",
]
