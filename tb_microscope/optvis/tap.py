"""The node tap: a node's activations in the one layout every technique reads.

Whatever the node's layout (`nodes.LAYOUTS`), a tap gives `NodeActivations` whose `maps` are
N x C x H x W for feature maps and tokens, and N x F for vectors:
- channels-last maps (Swin, ConvNeXt blocks) are permuted to channels-first;
- tokens (ViT, DINOv2): the patch tokens after the node's `prefix` leading ones, laid out on their
  grid (N x D x g x g for a square number of them, else N x D x 1 x T); the first leading token,
  the class token, is `cls` (N x D).
The forward pass stops as soon as the node's output is captured.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MicroscopeError
from ..nodes import Node, NodeActivations, node_tensor, node_view


class _Stop(Exception):
    pass


class NodesTap:
    """Captures nodes' outputs (each node's last call of a forward) in one forward pass, which
    stops as soon as the last of them is captured."""

    def __init__(self, model: nn.Module, nodes: list[Node]):
        self.model = model
        self.nodes = {node.name: node for node in nodes}
        self.modules = {name: model.get_submodule(name) for name in self.nodes}

    def __call__(self, x: torch.Tensor) -> dict[str, NodeActivations]:
        counts = dict.fromkeys(self.nodes, 0)
        found: dict[str, torch.Tensor] = {}

        def hook_of(node: Node):
            def hook(module, args, output):
                counts[node.name] += 1
                if counts[node.name] == node.calls:
                    found[node.name] = node_tensor(output, node)
                    if len(found) == len(self.nodes):
                        raise _Stop

            return hook

        handles = [
            self.modules[n].register_forward_hook(hook_of(node)) for n, node in self.nodes.items()
        ]
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.nodes if name not in found]
        if missing:
            raise MicroscopeError(f"node {missing[0]!r} was not reached in the forward pass")
        return {name: node_view(found[name], self.nodes[name]) for name in self.nodes}


class NodeTap:
    """Captures one node's output (its last call of a forward) and stops the forward there."""

    def __init__(self, model: nn.Module, node: Node):
        self.node = node
        self.tap = NodesTap(model, [node])

    def __call__(self, x: torch.Tensor) -> NodeActivations:
        return self.tap(x)[self.node.name]


def frozen(model: nn.Module) -> nn.Module:
    """The model with no parameter asking for gradients: only the input image is optimized."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model
