"""The node tap: a node's activations in the one layout every technique reads.

Whatever the node's layout (`runstore.LAYOUTS`), a tap gives `NodeActivations` whose `maps` are
N x C x H x W for feature maps and tokens, and N x F for vectors:
- channels-last maps (Swin, ConvNeXt blocks) are permuted to channels-first;
- tokens (ViT, DINOv2): the patch tokens after the node's `prefix` leading ones, laid out on their
  grid (N x D x g x g for a square number of them, else N x D x 1 x T); the first leading token,
  the class token, is `cls` (N x D).
The forward pass stops as soon as the node's output is captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree

from ..errors import MicroscopeError
from ..runstore import CHANNELS_LAST, TOKENS, Node


@dataclass
class NodeActivations:
    maps: torch.Tensor  # N x C x H x W, or N x F for a vector node
    cls: torch.Tensor | None = None  # N x D: a token node's class token, where it has one

    def float(self) -> NodeActivations:
        return NodeActivations(self.maps.float(), None if self.cls is None else self.cls.float())


def node_view(tensor: torch.Tensor, node: Node) -> NodeActivations:
    """A node's output tensor (as its module returned it) in the tap's layout."""
    if node.layout == CHANNELS_LAST:
        return NodeActivations(tensor.permute(0, 3, 1, 2))
    if node.layout == TOKENS:
        patches = tensor[:, node.prefix :, :].transpose(1, 2)  # N x D x T
        count = patches.shape[2]
        side = math.isqrt(count)
        grid = (side, side) if side * side == count else (1, count)
        cls = tensor[:, 0, :] if node.prefix else None
        return NodeActivations(patches.reshape(*patches.shape[:2], *grid), cls)
    return NodeActivations(tensor)


def node_tensor(output, node: Node) -> torch.Tensor:
    """The node's tensor in what its module returned: at the node's path, or else (a module of
    an exported program can return other things than the eager one did: a flat list, sizes it
    passes on) a floating-point tensor of the node's rank, one of the node's shape first."""
    rank = len(node.shape) + 1

    def fits(value) -> bool:
        return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == rank

    try:
        found = node.tensor_of(output)
    except (IndexError, KeyError, TypeError):
        found = None
    if fits(found):
        return found
    candidates = [leaf for leaf in _pytree.tree_leaves(output) if fits(leaf)]
    if not candidates:
        raise MicroscopeError(f"node {node.name!r}'s module returned no tensor of rank {rank}")
    same = [c for c in candidates if tuple(c.shape[1:]) == tuple(node.shape)]
    return (same or candidates)[0]


def replace_tensor(output, old: torch.Tensor, new: torch.Tensor):
    """What a module returned, with its tensor `old` replaced by `new`."""
    return _pytree.tree_map(lambda leaf: new if leaf is old else leaf, output)


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
