"""Nodes: the places in a model that tb_microscope shows, and how their outputs are laid out.

One home for what the training side (capture) and the reading side (rendering) both need: the
`Node` record stored in a run's manifest, the four layouts of a node's output, how a layout is
read off an output's shapes (`layout_of`), where a node's tensor sits in what its module returns
(`hidden_state`, `node_tensor`) and the one view every technique reads (`node_view`). It imports
nothing else of tb_microscope but its errors, so capture never pulls in the renderer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch.utils import _pytree

from .errors import MicroscopeError

CHANNELS_FIRST = "channels_first"  # N x C x H x W: units are channels
CHANNELS_LAST = "channels_last"  # N x H x W x C: units are channels
TOKENS = "tokens"  # N x T x D, `prefix` leading tokens (class, registers), then a patch grid
VECTOR = "vector"  # N x F: units are features
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, TOKENS, VECTOR)


@dataclass(frozen=True)
class Node:
    """A place in the model: the output of one named submodule (its last call in a forward).

    `layout` says how its output is laid out (see LAYOUTS); units are channels for maps and
    features for tokens and vectors. `output` is where the node's tensor is in what the module
    returns: a path of tuple indexes and dict keys, empty when it returns the tensor itself
    (a Hugging Face layer returns a tuple or a ModelOutput, say).
    """

    name: str
    layout: str
    units: int
    shape: tuple[int, ...]  # one example's output shape at the example input size
    module: str  # the submodule's class name
    calls: int  # how many times one forward pass calls it
    prefix: int = 0  # tokens: how many leading tokens are not patches (class, registers)
    output: tuple[int | str, ...] = ()

    @property
    def kind(self) -> str:
        """ "spatial" for feature maps (either layout), else the layout."""
        return "spatial" if self.layout in (CHANNELS_FIRST, CHANNELS_LAST) else self.layout

    def tensor_of(self, output):
        """The node's tensor in what its module returned (TypeError where the path does not fit:
        a tensor is not indexed by the path, which would slice it)."""
        for step in self.output:
            if isinstance(output, torch.Tensor):
                raise TypeError(f"the module returned a tensor, not a structure holding {step!r}")
            output = output[step]
        return output

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "output": list(self.output)}


def hidden_state(output, depth: int = 2) -> tuple[torch.Tensor, tuple] | None:
    """The floating-point tensor (2-D or more) that a module's output carries, and its path in
    it: the output itself, else the first such tensor of a tuple, else of a dict or Hugging Face
    `ModelOutput` (its `last_hidden_state` first)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() and output.dim() >= 2:
            return output, ()
        return None
    if depth == 0:
        return None
    if isinstance(output, Mapping):
        keys = sorted(output.keys(), key=lambda k: k != "last_hidden_state")
        items = [(k, output[k]) for k in keys if isinstance(k, str)]
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        return None
    for key, value in items:
        found = hidden_state(value, depth - 1)
        if found is not None:
            return found[0], (key, *found[1])
    return None


MAX_PREFIX_TOKENS = 16  # class and register tokens before the patch tokens


def _stride(before: int, after: int, size: int, size2: int) -> float | None:
    """The input pixels per step of an output dimension that was `before` at input size `size`
    and `after` at `size2`, if it grew with the input as a feature map's does."""
    return (size2 - size) / (after - before) if after > before else None


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 0.1 * max(a, b)


def _map_like(height: int, width: int, h: int, w: int) -> bool:
    """Whether a height x width grid could be a feature map of an h x w input, with no second
    size to check against: the same whole stride both ways, or a square map of a square input
    (a convolution without padding). A height that counts tokens with a few leading ones is a
    per-head tensor's (N x heads x T x d), not a map's."""
    if height <= 0 or width <= 0:
        return False
    if h % height == 0 and w % width == 0 and h // height == w // width:
        return True
    if height == width and h == w and h * 3 <= height * 4 <= h * 4:
        return True  # a few unpadded convolutions: 6 x 6 from 8 x 8, not 2 tokens + 2 x 2
    prefix = _token_prefix(height, h, w)
    if prefix and prefix <= height - prefix:  # a few leading tokens, then more patches
        return False
    return height == width and h == w


def _token_prefix(count: int, height: int, width: int, count2=None, height2=None, width2=None):
    """If `count` tokens are a few leading ones then a patch grid over height x width (and,
    given a second size, `count2` tokens are the same over height2 x width2): how many lead."""
    for stride in range(1, min(height, width) + 1):
        if height % stride or width % stride:
            continue
        prefix = count - (height // stride) * (width // stride)
        if not 0 <= prefix <= MAX_PREFIX_TOKENS:
            continue
        grids = (
            {  # patches that do not fit are dropped (a strided convolution) or padded
                (height2 // stride) * (width2 // stride),
                -(-height2 // stride) * -(-width2 // stride),
            }
            if count2 is not None
            else set()
        )
        if count2 is None or count2 - prefix in grids:
            return prefix
    return None


def layout_of(shape, size, shape2=None, size2=None) -> tuple[str, int, int] | None:
    """(layout, units, prefix) of an output of `shape` (one example's) at input `size` (H, W),
    using its `shape2` at `size2` where the model accepted a second size; None for outputs that
    are no node (per-head internals, attention maps, sequences)."""
    (h, w), (h2, w2) = size, size2 or (None, None)
    if len(shape) == 1:
        return VECTOR, shape[0], 0
    if len(shape) == 3:
        a, b, c = shape
        if shape2 is not None:
            a2, b2, c2 = shape2
            if a == a2 and _same(_stride(b, b2, h, h2), _stride(c, c2, w, w2)):
                return CHANNELS_FIRST, a, 0
            if c == c2 and _same(_stride(a, a2, h, h2), _stride(b, b2, w, w2)):
                return CHANNELS_LAST, c, 0
            if shape != tuple(shape2) or b != 1 or c != 1:
                return None
            return CHANNELS_FIRST, a, 0  # pooled to 1 x 1 at every size
        if _map_like(b, c, h, w):
            return CHANNELS_FIRST, a, 0
        if _map_like(a, b, h, w):
            return CHANNELS_LAST, c, 0
        return None
    if len(shape) == 2:
        count, features = shape
        if shape2 is not None:
            if shape2[1] != features or shape2[0] == count:
                return None
            prefix = _token_prefix(count, h, w, shape2[0], h2, w2)
        else:
            prefix = _token_prefix(count, h, w)
        return None if prefix is None else (TOKENS, features, prefix)
    return None


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
