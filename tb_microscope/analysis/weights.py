"""Weights: which units of an earlier node a unit is built from, and how strongly.

For a unit of node T and a source node S, the connection strengths are the "expanded weights"
of Olah et al., "Visualizing Weights" (Distill, 2021): the gradient of T's unit at its centre
position with respect to S's activations, with every ReLU-like non-linearity between them
replaced by the identity, so the path is linear (convolutions, batch norm, pooling) and the
gradient is the product of the weights along it. Next to a convolution it is that
convolution's kernel. A source unit's strength is the norm of its spatial kernel, signed by
the kernel's sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MicroscopeError
from ..nodes import Node, node_tensor, node_view, replace_tensor
from ..optvis.engine import check_units, default_device
from ..optvis.param import InputSpace
from ..optvis.tap import NodeTap, frozen
from ..optvis.torch_state import restores_torch_state
from ..run import Run

# Modules that act on each unit separately: a unit's weights come from before them.
ELEMENTWISE = {
    "BatchNorm1d",
    "BatchNorm2d",
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "GELU",
    "SiLU",
    "ELU",
    "Hardswish",
    "Hardsigmoid",
    "Sigmoid",
    "Tanh",
    "Dropout",
    "Dropout2d",
    "Identity",
}
_ATEN = torch.ops.aten
_NONLINEAR = {
    _ATEN.relu,
    _ATEN.relu_,
    _ATEN.hardtanh,
    _ATEN.hardtanh_,
    _ATEN.leaky_relu,
    _ATEN.leaky_relu_,
    _ATEN.gelu,
    _ATEN.gelu_,
    _ATEN.silu,
    _ATEN.silu_,
    _ATEN.hardswish,
    _ATEN.hardswish_,
    _ATEN.elu,
    _ATEN.elu_,
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.elu,
}


_MAX_POOL = {_ATEN.max_pool2d, F.max_pool2d}


def _average_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, **_):
    return F.avg_pool2d(
        x, kernel_size, stride or kernel_size, padding, ceil_mode, count_include_pad=False
    )


class Linearized(TorchFunctionMode):
    """Within this mode ReLU-like non-linearities are the identity (in place ones stay in place)
    and max pooling is average pooling, so the map between two nodes is linear."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", func)
        if packet in _MAX_POOL or func in _MAX_POOL:
            if kwargs.get("dilation", args[4] if len(args) > 4 else 1) in (1, [1, 1], (1, 1)):
                return _average_pool(*args, **kwargs)
        if packet in _NONLINEAR or func in _NONLINEAR:
            x = args[0] if args else kwargs["input"]
            inplace = kwargs.get("inplace", False) or getattr(packet, "__name__", "").endswith("_")
            return x if inplace else x.clone()
        return func(*args, **kwargs)


@dataclass
class Connection:
    node: str
    unit: int
    strength: float  # signed: positive excites, negative inhibits


def predecessors(run: Run) -> dict[str, list[str]]:
    """Per node, the nodes whose output feeds it (the run's edges, reversed)."""
    preds: dict[str, list[str]] = {}
    for a, b in run.edges:
        preds.setdefault(b, []).append(a)
    return preds


def default_source(run: Run, node: str) -> str:
    """The nearest earlier node whose units feed `node`'s, skipping per-unit layers."""
    preds = predecessors(run)
    current = run.node(node)
    while current.module in ELEMENTWISE and preds.get(current.name, ["input"])[0] != "input":
        current = run.node(preds[current.name][0])
    before = [p for p in preds.get(current.name, []) if p != "input"]
    if not before:
        raise MicroscopeError(
            f"node {node!r} has no earlier node to draw weights from (it reads the input "
            "directly); pass source= to name one"
        )
    return before[0]


class _Source:
    """Replaces each output of a node by a leaf tensor that collects the gradient.

    A node called several times (a shared pooling layer, say) feeds the target from the last
    call before it; that is the leaf with a gradient, looked for from the latest call back.
    """

    def __init__(self, model: nn.Module, node: Node):
        self.node, self.module = node, model.get_submodule(node.name)
        self.leaves: list[torch.Tensor] = []

    def hook(self, module, args, output):
        tensor = node_tensor(output, self.node)
        leaf = tensor.detach().float().requires_grad_(True)
        self.leaves.append(leaf)
        return replace_tensor(output, tensor, leaf.to(tensor.dtype))

    def gradient(self, value: torch.Tensor) -> torch.Tensor | None:
        grads = torch.autograd.grad(value, self.leaves, allow_unused=True)
        return next((g for g in reversed(grads) if g is not None), None)


@restores_torch_state
def unit_weights(
    run: Run,
    step: int,
    node: str,
    unit: int,
    *,
    source: str | None = None,
    top: int = 8,
    device: str | torch.device | None = None,
    model: nn.Module | None = None,
) -> tuple[str, list[Connection], np.ndarray]:
    """The `top` strongest connections from `source`'s units into `node`'s `unit`.

    Returns the source node's name, the connections (strongest magnitude first), and every
    source unit's signed strength.
    """
    target = run.node(node)
    (unit,) = check_units(target, [unit])
    source_node = run.node(source if source is not None else default_source(run, node))
    if source_node.name == target.name:
        raise MicroscopeError("source= must be an earlier node than the unit's own")
    device = torch.device(device) if device is not None else default_device()
    model = frozen(model if model is not None else run.load_model(step, device))
    spec = run.input_spec
    size = max(spec.shape[1:] + [d["min"] for d in spec.dims if d["name"] != "batch"])
    grey = torch.full((1, spec.channels, size, size), 0.5, device=device)
    tap, leaf = NodeTap(model, target), _Source(model, source_node)
    handle = leaf.module.register_forward_hook(leaf.hook)
    try:
        with Linearized():
            out = tap(InputSpace(spec, device)(grey)).maps.float()
    finally:
        handle.remove()
    value = out[0, unit] if out.dim() == 2 else out[0, unit, out.shape[2] // 2, out.shape[3] // 2]
    grad = leaf.gradient(value) if leaf.leaves else None
    if grad is None:
        raise MicroscopeError(
            f"unit {node}:{unit} does not depend on node {source_node.name!r}; "
            f"pass as source= a node that comes before it"
        )
    grad = node_view(grad, source_node).maps  # the source's units first, like the target's
    kernel = grad[0].flatten(1) if grad.dim() == 4 else grad[0][:, None]
    strength = (kernel.norm(dim=1) * torch.sign(kernel.sum(1))).cpu().numpy()
    order = np.argsort(-np.abs(strength))[:top]
    connections = [Connection(source_node.name, int(i), float(strength[i])) for i in order]
    return source_node.name, connections, strength
