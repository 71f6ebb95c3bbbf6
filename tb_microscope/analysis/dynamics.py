"""Dynamics: how a model's nodes and units change over training, and which units of two runs
(or two steps) are the same feature. Computed from snapshots and probe images alone, no
rendering.

Everything here reads a node's *signature* at a step: its activations on the run's probe
images, each unit's map averaged down to at most POOL x POOL positions (a vector node: its
values). One forward pass of the probe images per step gives every node's signature; they are
cached per (run id, step, snapshot version) as float16 (about 10 MB per step for a ResNet-18
with 128 probe images), so dynamics extend to new snapshots by computing only those.

- Linear CKA (Kornblith et al., 2019) between two signatures of a node, from their centred Gram
  matrices over the probe images: 1 for the same representation up to rotation and scale.
- A unit's correlation between two steps: Pearson's correlation of its signature (images x
  positions) at one step with its own at the other.
- A unit "formed" at the first step from which its correlation with its last logged form stays
  at least FORMED (0.9) through the last step.
- Matching units of two runs (or steps): the correlations of every unit of A with every unit of
  B on the same images (run A's probe), and the one-to-one assignment with the largest total
  correlation (`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MicroscopeError, NodeNotFoundError
from ..execution.cache import RenderCache, ResultKey
from ..nodes import Node
from ..optvis.engine import RenderCancelled, default_device
from ..optvis.param import InputSpace
from ..optvis.probe import probe_images
from ..optvis.tap import NodesTap, frozen
from ..optvis.torch_state import restores_torch_state
from ..run import Run

POOL = 2  # a unit's map is averaged down to at most POOL x POOL positions
FORMED = 0.9  # the correlation with its final form from which a unit counts as formed
PROBE_BATCH = 16  # probe images per forward pass (every node's output is held at once)


def _pooled(maps: torch.Tensor) -> torch.Tensor:
    """N x C x P: each unit's activations at (at most) POOL x POOL positions."""
    if maps.dim() == 2:
        return maps[:, :, None]
    height, width = maps.shape[-2:]
    return F.adaptive_avg_pool2d(maps, (min(height, POOL), min(width, POOL))).flatten(2)


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise RenderCancelled("the computation was cancelled: nobody is waiting for it")


def node_signatures(
    run: Run,
    model: torch.nn.Module,
    nodes: Sequence[Node],
    device: torch.device,
    images: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Each node's signature (N x C x P, float32, on the CPU) on `images` (uint8 or [0, 1]
    images like the probe's; by default the run's probe images), fed as `run` was trained."""
    images = probe_images(run) if images is None else images
    space, tap = InputSpace(run.input_spec, device), NodesTap(model, list(nodes))
    parts: dict[str, list[torch.Tensor]] = {node.name: [] for node in nodes}
    with torch.no_grad():
        for start in range(0, len(images), PROBE_BATCH):
            _check_stop(should_stop)
            x = images[start : start + PROBE_BATCH].to(device).float()
            if images.dtype == torch.uint8:
                x = x / 255
            for name, act in tap(space(x)).items():
                parts[name].append(_pooled(act.maps.float()).cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _signature_key(run: Run, step: int) -> ResultKey:
    probe = run.manifest.probe
    return ResultKey(
        "signatures",
        "",
        0,
        (("pool", POOL), ("probe", probe.count if probe else 0)),
        ((step, run.snapshot_version(step)),),
    )


def step_signatures(
    run: Run,
    step: int,
    cache: RenderCache,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
    images: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every node's signature at `step`, from the cache or computed and stored in it (on
    `images`, the run's probe images when read already)."""
    key = _signature_key(run, step)
    stored = cache.get_arrays(key)
    names = [node.name for node in run.nodes]
    if stored is not None and list(stored.get("nodes", [])) == names and "scales" in stored:
        scales = stored["scales"]
        return {name: _stored(stored[f"n{i}"], scales[i]) for i, name in enumerate(names)}
    model = frozen(run.load_model(step, device))
    found = node_signatures(run, model, run.nodes, device, images, should_stop)
    # Stored as float16 scaled to the node's largest magnitude (and that scale): a quarter of the
    # bytes of float32, and no overflow whatever the activations' range.
    scales = np.array([float(found[n].abs().max()) or 1.0 for n in names], dtype=np.float32)
    arrays = {
        f"n{i}": (found[name] / float(scale)).to(torch.float16).numpy()
        for i, (name, scale) in enumerate(zip(names, scales))
    }
    cache.put_arrays(key, {"nodes": np.array(names), "scales": scales, **arrays})
    return {name: _stored(arrays[f"n{i}"], scales[i]) for i, name in enumerate(names)}


def _stored(values: np.ndarray, scale: float) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.float32)) * float(scale)


def _centred_gram(signature: torch.Tensor) -> torch.Tensor:
    x = signature.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA between two representations of the same N inputs (N x anything each); NaN
    when either does not vary over the inputs."""
    ka, kb = _centred_gram(a), _centred_gram(b)
    denominator = ka.norm() * kb.norm()
    return float((ka * kb).sum() / denominator) if denominator > 0 else math.nan


def unit_vectors(signature: torch.Tensor) -> torch.Tensor:
    """C x (N * P): each unit's signature, centred and scaled to length 1 (zero where the unit
    does not vary), so that dot products are correlations."""
    x = signature.double().transpose(0, 1).flatten(1)
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros((), dtype=x.dtype))


def _live(signature: torch.Tensor) -> torch.Tensor:
    """Per unit: whether it varies over the probe images at all."""
    x = signature.transpose(0, 1).flatten(1)
    return (x.amax(1) - x.amin(1)) > 0


def unit_correlations(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per unit, the correlation of its signature in `a` with its own in `b` (NaN for a unit
    that does not vary in one of them)."""
    corr = (unit_vectors(a) * unit_vectors(b)).sum(1).clamp(-1, 1)
    return torch.where(_live(a) & _live(b), corr, math.nan).numpy()


def formation_step(correlations: Sequence[float], steps: Sequence[int]) -> int | None:
    """The first step from which `correlations` (one per step, against the last) stay at least
    FORMED through the last step; None when even the last does not qualify (a dead unit)."""
    formed = None
    for step, value in zip(reversed(steps), reversed(list(correlations))):
        if not value >= FORMED:  # NaN: not formed
            break
        formed = step
    return formed


def _json_floats(values) -> list:
    return [None if v is None or not math.isfinite(v) else round(float(v), 6) for v in values]


@dataclass
class NodeDynamics:
    """How one node changed over the logged steps.

    `cka_to_final[i]`: linear CKA between step i's signature and the last step's;
    `cka_to_previous[i]`: with step i - 1's (NaN at the first); `unit_correlation[u, i]`: unit
    u's correlation at step i with its own at the last step; `formed_step[u]`: the step from
    which that stays at least 0.9 (None for a unit that never does, such as a dead one)."""

    node: str
    steps: list[int]
    cka_to_final: np.ndarray
    cka_to_previous: np.ndarray
    unit_correlation: np.ndarray
    formed_step: list[int | None]
    threshold: float = FORMED

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "steps": self.steps,
            "threshold": self.threshold,
            "cka_to_final": _json_floats(self.cka_to_final),
            "cka_to_previous": _json_floats(self.cka_to_previous),
            "unit_correlation": [_json_floats(row) for row in self.unit_correlation],
            "formed_step": self.formed_step,
        }


@dataclass
class ModelDynamics:
    """Every node's CKA to its last logged form, per step: which layers settle first."""

    steps: list[int]
    nodes: list[str]
    cka_to_final: np.ndarray  # nodes x steps
    cka_to_previous: np.ndarray  # nodes x steps, NaN at the first step

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "nodes": self.nodes,
            "cka_to_final": [_json_floats(row) for row in self.cka_to_final],
            "cka_to_previous": [_json_floats(row) for row in self.cka_to_previous],
        }


def _as_run(run: Run | str, allow_pickle: bool = False) -> Run:
    return run if isinstance(run, Run) else Run(run, allow_pickle=allow_pickle)


def _steps(run: Run, steps: Sequence[int] | None) -> list[int]:
    logged = run.steps
    if steps is None:
        chosen = logged
    else:
        missing = [s for s in steps if s not in logged]
        if missing:
            raise MicroscopeError(
                f"step {missing[0]} is not logged in run '{run.name}' (logged: "
                f"{', '.join(map(str, logged)) or 'none'})"
            )
        chosen = sorted(set(steps))
    if not chosen:
        raise MicroscopeError(f"run '{run.name}' has no logged steps yet")
    return chosen


def _all_signatures(run, steps, device, cache_dir, should_stop) -> list[dict[str, torch.Tensor]]:
    images = probe_images(run)  # read once for every step; no probe: said before any work
    device = torch.device(device) if device is not None else default_device()
    cache = cache_dir if isinstance(cache_dir, RenderCache) else RenderCache(run, cache_dir)
    return [step_signatures(run, step, cache, device, should_stop, images) for step in steps]


def _dynamics_of(node: str, steps: list[int], signatures: list[torch.Tensor]) -> NodeDynamics:
    final = signatures[-1]
    cka_final = np.array([linear_cka(s, final) for s in signatures])
    cka_previous = np.array(
        [math.nan] + [linear_cka(a, b) for a, b in zip(signatures, signatures[1:])]
    )
    correlation = np.stack([unit_correlations(s, final) for s in signatures], axis=1)
    formed = [formation_step(row, steps) for row in correlation]
    return NodeDynamics(node, steps, cka_final, cka_previous, correlation, formed)


@restores_torch_state
def node_dynamics(
    run: Run | str,
    node: str,
    *,
    steps: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | RenderCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> NodeDynamics:
    """For every logged step (or `steps`), how far `node` and each of its units are from their
    form at the last of those steps (see `NodeDynamics`). Needs the run's probe images (the
    Logger's `probe=`). Signatures are cached with the run's renders (or under `cache_dir`), so
    asking again after new snapshots computes only those."""
    run = _as_run(run)
    target = run.node(node)
    chosen = _steps(run, steps)
    signatures = _all_signatures(run, chosen, device, cache_dir, should_stop)
    return _dynamics_of(target.name, chosen, [s[target.name] for s in signatures])


@restores_torch_state
def model_dynamics(
    run: Run | str,
    *,
    steps: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | RenderCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ModelDynamics:
    """Every node's linear CKA to its last logged form, per step (see `ModelDynamics`)."""
    run = _as_run(run)
    chosen = _steps(run, steps)
    signatures = _all_signatures(run, chosen, device, cache_dir, should_stop)
    names = [node.name for node in run.nodes]
    final = [[linear_cka(s[n], signatures[-1][n]) for s in signatures] for n in names]
    previous = [
        [math.nan] + [linear_cka(a[n], b[n]) for a, b in zip(signatures, signatures[1:])]
        for n in names
    ]
    return ModelDynamics(chosen, names, np.array(final), np.array(previous))


@dataclass
class Alignment:
    """Units of `node` in run A at one step matched one-to-one with units of the same node in
    run B at another, on run A's probe images.

    `unit_b[u]`: the unit of B matched to unit u of A (-1 when B has fewer units and u got
    none); `correlation[u]`: the pair's correlation (NaN when unmatched, or when either unit
    does not vary on the images); `same_unit[u]`: unit u's correlation with unit u of B (NaN
    where B has no unit u): for two steps of one run, how much each unit changed."""

    node: str
    run_a: str
    step_a: int
    run_b: str
    step_b: int
    unit_b: np.ndarray
    correlation: np.ndarray
    same_unit: np.ndarray
    matrix: np.ndarray = field(repr=False)  # units of A x units of B

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "a": {"run": self.run_a, "step": self.step_a},
            "b": {"run": self.run_b, "step": self.step_b},
            "unit_b": [int(u) for u in self.unit_b],
            "correlation": _json_floats(self.correlation),
            "same_unit": _json_floats(self.same_unit),
        }


@restores_torch_state
def align_units(
    run_a: Run | str,
    step_a: int,
    run_b: Run | str,
    step_b: int,
    node: str,
    *,
    device: str | torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Alignment:
    """Match every unit of `node` in `run_a` at `step_a` to a unit of the same node in `run_b`
    at `step_b` (see `Alignment`): the one-to-one assignment with the largest total
    correlation of their activations on run A's probe images (B's model fed them as B was
    trained)."""
    from scipy.optimize import linear_sum_assignment

    run_a, run_b = _as_run(run_a), _as_run(run_b)
    device = torch.device(device) if device is not None else default_device()
    node_a = run_a.node(node)
    try:
        node_b = run_b.node(node)
    except NodeNotFoundError:
        raise NodeNotFoundError(
            f"run '{run_b.name}' has no node {node!r}, so its units cannot be matched with "
            f"run '{run_a.name}''s"
        ) from None
    for run, step in ((run_a, step_a), (run_b, step_b)):
        _steps(run, [step])
    if run_a.input_spec.channels != run_b.input_spec.channels:
        raise MicroscopeError(
            f"runs '{run_a.name}' and '{run_b.name}' take images of different channels "
            f"({run_a.input_spec.channels} and {run_b.input_spec.channels}): their units "
            "cannot be compared on the same images"
        )
    images = probe_images(run_a)
    signatures = []
    for run, step, target in ((run_a, step_a, node_a), (run_b, step_b, node_b)):
        model = frozen(run.load_model(step, device))
        signatures.append(
            node_signatures(run, model, [target], device, images, should_stop)[target.name]
        )
    a, b = signatures
    if a.shape[2] != b.shape[2]:
        raise MicroscopeError(
            f"node {node!r} gives maps of different sizes in the two runs; its units cannot be "
            "compared position by position"
        )
    live = _live(a)[:, None] & _live(b)[None, :]
    matrix = (unit_vectors(a) @ unit_vectors(b).T).clamp(-1, 1)
    matrix = torch.where(live, matrix, math.nan).numpy()
    rows, cols = linear_sum_assignment(np.nan_to_num(matrix, nan=-1.0), maximize=True)
    unit_b = np.full(a.shape[1], -1, dtype=np.int64)
    unit_b[rows] = cols
    correlation = np.full(a.shape[1], math.nan)
    correlation[rows] = matrix[rows, cols]
    same = np.full(a.shape[1], math.nan)
    shared = min(a.shape[1], b.shape[1])
    same[:shared] = np.diagonal(matrix)[:shared]
    return Alignment(
        node, run_a.name, step_a, run_b.name, step_b, unit_b, correlation, same, matrix
    )
