"""Evolution: how much a unit changed from each logged step to the next.

Two measures per step, each against the previous logged step: the cosine similarity of the
unit's incoming weights (its row of the nearest convolution or linear layer at or before its
node), and the correlation of its activations over the probe images. Both approach 1 once the
unit has "settled".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..optvis.engine import RenderCancelled, check_units, default_device
from ..optvis.probe import probe_activations
from ..optvis.tap import frozen
from ..optvis.torch_state import restores_torch_state
from ..run import Run
from .weights import predecessors


def incoming_weight_key(run: Run, node: str) -> str | None:
    """The state-dict key of the weight whose rows are `node`'s units' incoming weights."""
    shapes = run.manifest.model.weights
    preds = predecessors(run)
    todo, seen = [node], set()
    while todo:
        name = todo.pop(0)
        if name in seen or name == "input":
            continue
        seen.add(name)
        key = f"{name}.weight"
        units = run.node(node).units
        if key in shapes and len(shapes[key][1]) >= 2 and shapes[key][1][0] == units:
            return key
        if run.node(name).units == units:  # per-unit layers (relu, batch norm) pass through
            todo.extend(preds.get(name, []))
    return None


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a * b).sum() / denominator) if denominator > 0 else None


@restores_torch_state
def unit_history(
    run: Run,
    node: str,
    unit: int,
    *,
    steps: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict]:
    """Per logged step: `weight_cosine` and `activation_correlation` against the previous step
    (None at the first), plus `weight_norm` and `mean_activation` (over the probe images;
    activations are None when the run has no probe). `should_stop` is asked before each step;
    `RenderCancelled` is raised once it returns True."""
    target = run.node(node)
    (unit,) = check_units(target, [unit])
    device = torch.device(device) if device is not None else default_device()
    key = incoming_weight_key(run, node)
    has_probe = run.manifest.probe is not None
    history, previous_weight, previous_act = [], None, None
    for step in steps if steps is not None else run.steps:
        if should_stop is not None and should_stop():
            raise RenderCancelled("the history was cancelled: nobody is waiting for it")
        entry = {
            "step": step,
            "weight_cosine": None,
            "activation_correlation": None,
            "weight_norm": None,
            "mean_activation": None,
        }
        model = frozen(run.load_model(step, device)) if has_probe else None
        if key is not None:
            state = model.state_dict() if model is not None else run.load_state_dict(step)
            weight = state[key][unit].flatten().float().cpu()
            entry["weight_norm"] = float(weight.norm())
            if previous_weight is not None:
                entry["weight_cosine"] = float(
                    torch.nn.functional.cosine_similarity(weight, previous_weight, dim=0)
                )
            previous_weight = weight
        if model is not None:
            act = probe_activations(run, model, target, device)[:, unit]
            act = act.flatten(1).mean(1) if act.dim() > 1 else act
            entry["mean_activation"] = float(act.mean())
            if previous_act is not None:
                entry["activation_correlation"] = _correlation(act, previous_act)
            previous_act = act
        history.append(entry)
    return history
