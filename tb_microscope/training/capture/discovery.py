"""Node discovery: which named submodules of a model are nodes, their layouts, and the edges
between them, from eager forward passes at the example's size and, where the model takes one, a
second size.

Every named submodule the forward pass calls is either a node or named, with the reason, in the
`Discovery`'s note: modules whose output is their input in eval mode (Identity, Dropout, drop
path) and modules whose output is no feature map, tokens or vector are left out.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree

from ...errors import NodeNotFoundError, summarize
from ...nodes import CHANNELS_FIRST, CHANNELS_LAST, Node, hidden_state, layout_of


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def original_forward(model: nn.Module) -> nn.Module:
    """`model` (a copy, changed in place) with the forward it had before accelerate's mixed
    precision wrapped it: `Accelerator.prepare` (as the Hugging Face Trainer calls it with fp16 or
    bf16) sets the instance's `forward` to the original run under autocast and keeps the original
    as `_original_forward`. Exported with the wrapper, the whole model is one autocast region, in
    which no submodule is called, so no node would be found."""
    state = vars(model)
    original = state.pop("_original_forward", None)
    if original is None:
        return model
    bound = getattr(original, "__self__", None) is model
    if bound and getattr(original, "__func__", None) is type(model).forward:
        state.pop("forward", None)  # the class's own forward
    else:
        state["forward"] = original
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode without autocast, then give every submodule its mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _is_within(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def innermost_edges(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Drop (a, b) where a descendant of b receives the same input from a: keep specific edges."""
    return {(a, b) for a, b in edges if not any(a2 == a and _is_within(b2, b) for a2, b2 in edges)}


# A second input size tells which output dimensions follow the input's height and width (shapes
# alone cannot: Swin's N x H x W x C looks like N x C x H x W). Heights and widths grow by
# different amounts, so that the two can be told apart; the first size a model accepts is used.
SIZE_GROWTHS = ((32, 64), (32, 32), (64, 64))


# Module kinds whose output is their input in eval mode (checked on the example, not assumed).
_PASS_THROUGH = re.compile(r"dropout|droppath|dropblock|stochasticdepth|^identity$", re.IGNORECASE)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


@dataclass
class _Traced:
    order: dict[str, int]  # module -> when it was first called
    outputs: dict[str, tuple[torch.Tensor, tuple] | None]  # its last call's hidden state, path
    calls: dict[str, int]
    raw_edges: set[tuple[str, str]]
    passed_on: set[str]  # modules of a pass-through kind whose output was their input


def _trace(model: nn.Module, example: torch.Tensor) -> _Traced:
    """One eval-mode forward with hooks on every named submodule: per module, its call order,
    call count and the hidden-state tensor of its last call (with its path); the edges between
    modules by tensor identity; and which pass-through modules passed their input on."""
    order: dict[str, int] = {}
    outputs: dict[str, tuple[torch.Tensor, tuple] | None] = {}
    calls: dict[str, int] = {}
    producer: dict[int, str] = {}
    alive: list[torch.Tensor] = [example]  # keeps ids unique for the whole pass
    raw_edges: set[tuple[str, str]] = set()
    inputs: dict[str, torch.Tensor] = {}  # a pass-through kind's input, to compare its output to
    passes: dict[str, bool] = {}  # per pass-through kind: was its output its input, every call

    def before(name):
        def hook(module, args):
            order.setdefault(name, len(order))
            if _PASS_THROUGH.search(type(module).__name__):
                first = next((a for a in _pytree.tree_leaves(args) if torch.is_tensor(a)), None)
                if first is not None:
                    inputs[name] = first
            for a in _pytree.tree_leaves(args):
                if isinstance(a, torch.Tensor):
                    source = "input" if a is example else producer.get(id(a))
                    if source and source != name:
                        raw_edges.add((source, name))

        return hook

    def after(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            found = hidden_state(output)
            outputs[name] = found
            if name in inputs:
                given = inputs.pop(name)
                same = found is not None and _same_tensor(found[0], given)
                passes[name] = passes.get(name, True) and same
            if found is not None:
                tensor = found[0]
                alive.append(tensor)
                current = producer.get(id(tensor))
                if current is None or not _is_within(current, name):
                    producer[id(tensor)] = name

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return _Traced(order, outputs, calls, raw_edges, {n for n, same in passes.items() if same})


def _second_size(model: nn.Module, example: torch.Tensor):
    """The traced outputs at another input size, and that size; (None, None) for a model that
    accepts only its example's size (or a non-image input)."""
    if example.dim() != 4:
        return None, None
    h, w = example.shape[2:]
    for dh, dw in SIZE_GROWTHS:
        other = F.interpolate(example, size=(h + dh, w + dw), mode="bilinear")
        try:
            return _trace(model, other).outputs, (h + dh, w + dw)
        except Exception:  # the model fixes its input size: position embeddings, say
            continue
    return None, None


@dataclass
class Discovery:
    """What `discover_nodes` found: the nodes in forward order, the edges between them (by tensor
    identity, used when the model cannot be exported), and a note naming every module it called
    that is not a node, with the reason (None when every one is)."""

    nodes: list[Node]
    edges: list[tuple[str, str]]
    note: str | None = None
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reason -> module names


# Why a called module is not a node, as the note says it.
PASSED_ON = "whose output is their input in eval mode"
NOT_A_NODE = "whose output is no feature map, tokens or vector"
NO_TENSOR = "that return no floating-point tensor of the batch"
NOT_AT_OTHER_SIZE = "not called the same way at another input size"


def discover_nodes(model: nn.Module, example: torch.Tensor) -> Discovery:
    """The model's nodes, in the order they are first called, with their layouts, and the
    edges between them found by tensor identity (used only when the model cannot be exported).

    A node is a named submodule whose output carries a feature map, tokens or a vector (see
    `layout_of`); the model is run at the example's size and, where it accepts one, a second.
    Where it accepts no second size, an output that its shape alone does not show to be a map is
    tested by its gradients (`_follows_the_image`).
    """
    traced = _trace(model, example)
    size = tuple(example.shape[2:]) if example.dim() == 4 else (1, 1)
    outputs2, size2 = _second_size(model, example)
    modules = dict(model.named_modules())
    found_layouts: dict[str, tuple[str, int, int]] = {}
    left_out: dict[str, list[str]] = {}
    unsure: dict[str, tuple[int, ...]] = {}
    names = sorted(traced.outputs, key=traced.order.__getitem__)
    for name in names:
        found = traced.outputs[name]
        if name in traced.passed_on:
            left_out.setdefault(PASSED_ON, []).append(name)
            continue
        if found is None or found[0].shape[0] != example.shape[0]:
            left_out.setdefault(NO_TENSOR, []).append(name)
            continue
        tensor, path = found
        shape = tuple(tensor.shape[1:])
        other = (outputs2 or {}).get(name)
        shape2 = tuple(other[0].shape[1:]) if other is not None and other[1] == path else None
        if outputs2 is not None and shape2 is None:
            left_out.setdefault(NOT_AT_OTHER_SIZE, []).append(name)
            continue
        layout = layout_of(shape, size, shape2, size2)
        if outputs2 is None and len(shape) == 3 and example.dim() == 4:
            unsure[name] = shape  # shapes alone cannot tell: ask the gradients
            if layout is not None:
                found_layouts[name] = layout
        elif layout is not None:
            found_layouts[name] = layout
        else:
            left_out.setdefault(NOT_A_NODE, []).append(name)
    for name, layout in _follows_the_image(model, example, unsure, traced.outputs).items():
        if layout is None:
            found_layouts.pop(name, None)
        elif layout != UNKNOWN:
            found_layouts[name] = layout
        if name not in found_layouts:
            left_out.setdefault(NOT_A_NODE, []).append(name)
    nodes = []
    for name in names:
        if name in found_layouts:
            kind, units, prefix = found_layouts[name]
            tensor, path = traced.outputs[name]
            module = type(modules[name]).__name__
            shape = tuple(tensor.shape[1:])
            nodes.append(Node(name, kind, units, shape, module, traced.calls[name], prefix, path))
    kept = {n.name for n in nodes} | {"input"}
    edges = _edges_between(kept, traced.raw_edges)
    for reason in left_out:
        left_out[reason].sort(key=traced.order.__getitem__)
    note = _left_out_note(left_out, modules, traced.outputs)
    return Discovery(nodes, sorted(innermost_edges(edges)), note, left_out)


def _edges_between(kept: set[str], raw_edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges between kept modules, through the modules left out: a -> drop -> b is a -> b."""
    into: dict[str, set[str]] = {}
    for a, b in raw_edges:
        into.setdefault(b, set()).add(a)

    def sources(name: str, seen: set[str]) -> set[str]:
        found = set()
        for a in into.get(name, ()):
            if a in kept:
                found.add(a)
            elif a not in seen:
                seen.add(a)
                found |= sources(a, seen)
        return found

    return {(a, b) for b in kept for a in sources(b, set()) if a != b}


def _modules(reason: str, count: int) -> str:
    """`3 modules whose output is their input`, `1 module whose output is its input`."""
    if count != 1:
        return f"{count} modules {reason}"
    return "1 module " + reason.replace("their", "its").replace("that return ", "that returns ")


def _left_out_note(left_out: dict[str, list[str]], modules: dict, outputs: dict) -> str | None:
    """`left out: 2 modules whose output is their input in eval mode (Dropout ×2: a, b)`: every
    module by name, so that the note accounts for every module the forward pass called."""
    parts = []
    for reason in (PASSED_ON, NOT_A_NODE, NO_TENSOR, NOT_AT_OTHER_SIZE):
        names = left_out.get(reason)
        if not names:
            continue
        kinds = Counter(type(modules[n]).__name__ for n in names)
        kinds_text = ", ".join(f"{k} ×{v}" for k, v in kinds.most_common())
        if reason == NOT_A_NODE:  # the shapes say why
            shown = [
                n
                if outputs.get(n) is None
                else f"{n} {'×'.join(map(str, outputs[n][0].shape[1:]))}"
                for n in names
            ]
        else:
            shown = names
        parts.append(f"{_modules(reason, len(names))} ({kinds_text}: {', '.join(shown)})")
    return "left out: " + "; ".join(parts) if parts else None


UNKNOWN = "unknown"  # `_follows_the_image` could not tell (no gradient reached a corner)


def _follows_the_image(
    model: nn.Module, example: torch.Tensor, shapes: dict[str, tuple[int, ...]], outputs: dict
) -> dict[str, tuple[str, int, int] | str | None]:
    """Which 3-D outputs of a model that takes one input size only are feature maps.

    A map's corner cells see the image's matching corners: the centroid of each corner cell's
    input gradient lies in that corner's quadrant of the image. Anything else fails: an
    attention map's cell (i, j) depends on patches i and j, so its off-diagonal corners' centroids
    fall on the image's diagonal. Answers per output: (layout, units, 0) for a map, None for no
    map, `UNKNOWN` where a corner got no gradient. The example's first image runs as a batch of
    four, element k asking for corner k, so each layout tried costs one backward pass.
    """
    if not shapes:
        return {}
    x = example[:1].detach().repeat(4, 1, 1, 1).requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, args, output):
            found = hidden_state(output)
            if found is not None and found[1] == outputs[name][1]:
                captured[name] = found[0]

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in shapes]
    try:
        with eval_mode(model), torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    h, w = x.shape[2:]
    rows = torch.linspace(0, 1, h).view(1, h, 1)
    cols = torch.linspace(0, 1, w).view(1, 1, w)
    margin = 0.02  # of the image's side, from its middle
    answers: dict[str, tuple[str, int, int] | str | None] = {}
    for name, shape in shapes.items():
        out = captured.get(name)
        if out is None or not out.requires_grad or tuple(out.shape[1:]) != shape:
            answers[name] = UNKNOWN
            continue
        answers[name] = UNKNOWN  # until a layout's test is conclusive
        for layout, (hdim, wdim, cdim) in ((CHANNELS_FIRST, (1, 2, 0)), (CHANNELS_LAST, (0, 1, 2))):
            height, width = shape[hdim], shape[wdim]
            if height * width < 2:
                continue
            corners = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]
            picked = sum(
                out[k].narrow(hdim, r, 1).narrow(wdim, c, 1).sum()
                for k, (r, c) in enumerate(corners)
            )
            (grad,) = torch.autograd.grad(picked, x, retain_graph=True, allow_unused=True)
            weight = None if grad is None else grad.abs().sum(1)  # 4 x H x W
            if weight is None or not bool((weight.sum((1, 2)) > 0).all()):
                continue
            answers[name] = None
            total = weight.sum((1, 2))
            cy = (weight * rows).sum((1, 2)) / total
            cx = (weight * cols).sum((1, 2)) / total
            in_quadrant = all(
                (width == 1 or (cx[k] > 0.5 + margin if c else cx[k] < 0.5 - margin))
                and (height == 1 or (cy[k] > 0.5 + margin if r else cy[k] < 0.5 - margin))
                for k, (r, c) in enumerate(corners)
            )
            if in_quadrant:
                answers[name] = (layout, shape[cdim], 0)
                break
    return answers


def select_nodes(
    nodes: list[Node], wanted: list[str] | None, left_out: dict[str, list[str]] | None = None
) -> list[Node]:
    """The nodes `wanted` names, in its order; all of them for None. A name that is not a node is
    refused with the nodes there are, and why a module of that name is left out."""
    if wanted is None:
        return nodes
    by_name = {n.name: n for n in nodes}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        why = {name: reason for reason, names in (left_out or {}).items() for name in names}
        reasons = "".join(
            f"; {name!r} is left out, as {_modules(why[name], 1)}"
            for name in missing
            if name in why
        )
        raise NodeNotFoundError(
            f"nodes= names {', '.join(map(repr, missing))} are not nodes of this model "
            f"(submodules whose output is a feature map, tokens or a vector){reasons}; nodes: "
            f"{summarize(list(by_name), 40)}"
        )
    return [by_name[w] for w in dict.fromkeys(wanted)]
