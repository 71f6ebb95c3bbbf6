"""Architecture capture (training side) and restore (reading side).

A run must be rebuilt by a process that cannot import the training script. The primary capture is
`torch.export` with a dynamic batch dimension and, for images, dynamic height and width; it is
restored with `torch.export.unflatten`, which gives back the module hierarchy so forward hooks on
named submodules fire (the program is stored without weights: `architecture.py`). Models that do
not export (data-dependent Python control flow, say) fall back to a cloudpickled copy of the
module with its weights on the `meta` device; reading that back runs code from the log
directory, so readers must opt in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import os
import pickle
import select
import signal
import site
import sys
import sysconfig
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree
from torch.utils._sympy.numbers import int_oo

from .architecture import program_archive
from .errors import NodeNotFoundError, PickleNotAllowedError, summarize
from .runstore import CHANNELS_FIRST, CHANNELS_LAST, EXPORT, PICKLE, TOKENS, VECTOR, Node


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
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


# A second input size tells which output dimensions follow the input's height and width (shapes
# alone cannot: Swin's N x H x W x C looks like N x C x H x W). Heights and widths grow by
# different amounts, so that the two can be told apart; the first size a model accepts is used.
_GROWTH = ((32, 64), (32, 32), (64, 64))
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


def _trace(model: nn.Module, example: torch.Tensor):
    """One eval-mode forward with hooks on every named submodule: per module, its call order,
    call count and the hidden-state tensor of its last call (with its path); and the edges
    between modules by tensor identity."""
    order: dict[str, int] = {}
    outputs: dict[str, tuple[torch.Tensor, tuple] | None] = {}
    calls: dict[str, int] = {}
    producer: dict[int, str] = {}
    alive: list[torch.Tensor] = [example]  # keeps ids unique for the whole pass
    raw_edges: set[tuple[str, str]] = set()

    def before(name):
        def hook(module, args):
            order.setdefault(name, len(order))
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
    return order, outputs, calls, raw_edges


def _second_size(model: nn.Module, example: torch.Tensor):
    """The traced outputs at another input size, and that size; (None, None) for a model that
    accepts only its example's size (or a non-image input)."""
    if example.dim() != 4:
        return None, None
    h, w = example.shape[2:]
    for dh, dw in _GROWTH:
        other = F.interpolate(example, size=(h + dh, w + dw), mode="bilinear")
        try:
            return _trace(model, other)[1], (h + dh, w + dw)
        except Exception:  # the model fixes its input size: position embeddings, say
            continue
    return None, None


def discover_nodes(model: nn.Module, example: torch.Tensor) -> tuple[list[Node], list]:
    """The model's nodes, in the order they are first called, with their layouts, and the
    edges between them found by tensor identity (used only when the model cannot be exported).

    A node is a named submodule whose output carries a feature map, tokens or a vector (see
    `layout_of`); the model is run at the example's size and, where it accepts one, a second.
    """
    order, outputs, calls, raw_edges = _trace(model, example)
    size = tuple(example.shape[2:]) if example.dim() == 4 else (1, 1)
    outputs2, size2 = _second_size(model, example)
    modules = dict(model.named_modules())
    nodes = []
    for name in sorted(outputs, key=order.__getitem__):
        found = outputs[name]
        if found is None or found[0].shape[0] != example.shape[0]:
            continue
        tensor, path = found
        shape = tuple(tensor.shape[1:])
        other = (outputs2 or {}).get(name)
        shape2 = tuple(other[0].shape[1:]) if other is not None and other[1] == path else None
        if outputs2 is not None and shape2 is None:
            continue  # not called, or called differently, at the other size
        layout = layout_of(shape, size, shape2, size2)
        if layout is not None:
            kind, units, prefix = layout
            module = type(modules[name]).__name__
            nodes.append(Node(name, kind, units, shape, module, calls[name], prefix, path))
    kept = {n.name for n in nodes} | {"input"}
    edges = {(a, b) for a, b in raw_edges if a in kept and b in kept}
    return nodes, sorted(innermost_edges(edges))


def select_nodes(nodes: list[Node], wanted: list[str] | None) -> list[Node]:
    if wanted is None:
        return nodes
    by_name = {n.name: n for n in nodes}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise NodeNotFoundError(
            f"nodes= names {', '.join(map(repr, missing))} are not nodes of this model "
            f"(submodules whose output is a feature map, tokens or a vector); nodes: "
            f"{summarize(list(by_name), 40)}"
        )
    return [by_name[w] for w in dict.fromkeys(wanted)]


# --- export --------------------------------------------------------------------------------------


@dataclass
class Capture:
    kind: str  # EXPORT, PICKLE or NONE
    archive: bytes | None  # the exported program's archive (`architecture.program_archive`)
    pickled: bytes | None
    dims: list[dict]  # per input dimension: {"name", "size", "min", "max"}; max None = unbounded
    edges: list[tuple[str, str]]
    note: str | None  # why the capture is less than fully dynamic, or why it fell back
    nodes: list[Node] | None = None  # an exported program's nodes (`program_nodes`), else None


_DIM_NAMES = {4: ["batch", "channels", "height", "width"], 2: ["batch", "features"]}


def _export_example(example: torch.Tensor) -> torch.Tensor:
    """Two examples: with a batch of one, export would specialise the batch size to 1."""
    example = example[:2]
    return example if example.shape[0] >= 2 else torch.cat([example, example])


def _dynamic_dims(example: torch.Tensor, spatial: bool) -> dict[int, object]:
    dims = {0: torch.export.Dim.AUTO}
    if spatial and example.dim() == 4:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    return dims


def _input_dims(ep: torch.export.ExportedProgram) -> list[dict]:
    user_input = ep.graph_signature.user_inputs[0]
    placeholder = next(n for n in ep.graph.nodes if n.name == user_input)
    shape = placeholder.meta["val"].shape
    names = _DIM_NAMES.get(len(shape), [f"dim{i}" for i in range(len(shape))])
    dims = []
    for name, size in zip(names, shape):
        if isinstance(size, int):
            dims.append({"name": name, "size": size, "min": size, "max": size})
            continue
        bounds = ep.range_constraints.get(size.node.expr)
        upper = None if bounds is None or bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
        lower = int(bounds.lower) if bounds is not None else 1
        # A dimension that export calls dynamic from 2 still runs at 1 in the unflattened
        # module (0/1 specialisation only concerns tracing); batch 1 was checked to work.
        dims.append(
            {"name": name, "size": None, "min": 1 if name == "batch" else lower, "max": upper}
        )
    return dims


def _outputs_match(model: nn.Module, program: nn.Module, x: torch.Tensor) -> bool:
    """Whether `program` (the unflattened export, as a reader rebuilds it) computes `model`'s
    outputs at `x`."""
    with eval_mode(model), torch.no_grad():
        expected = _pytree.tree_leaves(model(x))
        got = _pytree.tree_leaves(program(x))
    return len(expected) == len(got) and all(
        torch.allclose(e, g, rtol=1e-4, atol=1e-5)
        for e, g in zip(expected, got)
        if isinstance(e, torch.Tensor)
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def exported_edges(ep: torch.export.ExportedProgram, names: set[str]) -> list[tuple[str, str]]:
    """Edges between nodes read from the exported graph, between the most specific nodes.

    A use of value v by op u enters every node that u is inside and v is not; the deepest of those
    is the edge's target. Its sources are the deepest nodes v leaves on the way to u, found by
    walking back through ops that belong to no such node (a residual add, a flatten).
    """
    user_inputs = set(ep.graph_signature.user_inputs)

    def scope(fx_node) -> list[tuple[str, str]]:
        stack = fx_node.meta.get("nn_module_stack") or {}
        return [(key, path) for key, (path, _) in stack.items() if path in names]

    def sources(value, inside: set[str]) -> set[str]:
        found, seen, todo = set(), set(), [value]
        while todo:
            w = todo.pop()
            if w in seen:
                continue
            seen.add(w)
            if w.op == "placeholder":
                if w.name in user_inputs:
                    found.add("input")
                continue
            left = [path for key, path in scope(w) if key not in inside]
            if left:
                found.add(left[-1])
            elif w.op == "call_function":
                todo.extend(w.all_input_nodes)
        return found

    edges = set()
    for u in ep.graph.nodes:
        if u.op != "call_function":
            continue
        u_scope = scope(u)
        u_keys = {key for key, _ in u_scope}
        for v in u.all_input_nodes:
            if v.op == "placeholder" and v.name not in user_inputs:
                continue  # a parameter, buffer or constant
            v_keys = {key for key, _ in scope(v)}
            entered = [path for key, path in u_scope if key not in v_keys]
            if entered:
                edges.update((s, entered[-1]) for s in sources(v, u_keys) if s != entered[-1])
    return sorted(innermost_edges(edges))


def program_nodes(
    model: nn.Module, program: nn.Module, x: torch.Tensor, nodes: list[Node]
) -> tuple[list[Node], str | None]:
    """The nodes as the exported `program` runs them, and a note of what differs from `model`.

    A reader taps a node with a forward hook on the program's submodule of that name, so every
    node must be called there as often as in the model, and return the node's tensor. Three
    kinds do not:
    - a module shared by several parents (CoaT's convolutional position encodings) is one module
      in the model, called from each, but the program has one copy per parent path, each called
      once: such a node is listed under the path of its last call (the one a node shows);
    - a module without operations in eval mode (Identity, StochasticDepth) has nothing in the
      program to call: its output is its input, so it is left out;
    - a module of the program returns only what the rest of the program uses: a Hugging Face
      backbone (`beit`, `mobilenet_v2`) whose hidden state the classifier does not read (it reads
      the pooled output) does not return it, and is left out (its last layer shows the same).
    """
    from .rendering.tap import node_tensor, node_view  # the reading side's own test of a tap

    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    modules = dict(model.named_modules())
    candidates = {p: node for node in nodes for p in aliases[id(modules[node.name])]}

    def returns_node(output, node: Node) -> bool:
        try:
            return node_view(node_tensor(output, node), node).maps.shape[1] == node.units
        except Exception:  # no tensor of the node's rank and units among what it returned
            return False

    calls: dict[str, list[int]] = {}  # program path -> when each of its calls began
    returned: dict[int, bool] = {}  # per module of the program: did its last call return its node
    order = itertools.count()
    handles = []
    paths_of: dict[int, list[str]] = {}
    for path, module in program.named_modules(remove_duplicate=False):
        if path:
            paths_of.setdefault(id(module), []).append(path)
    for path, module in program.named_modules():
        if not path:
            continue
        seen: list[int] = []
        for alias in paths_of[id(module)]:
            calls[alias] = seen
        handles.append(
            module.register_forward_pre_hook(lambda *_, seen=seen: seen.append(next(order)))
        )
        node = next((candidates[p] for p in paths_of[id(module)] if p in candidates), None)
        if node is not None:

            def check(module, args, output, node=node):
                returned[id(module)] = returns_node(output, node)

            handles.append(module.register_forward_hook(check))
    try:
        with torch.no_grad():
            program(x)
    finally:
        for h in handles:
            h.remove()
    kept, renamed, passed_on, unreturned = [], [], [], []
    for node in nodes:
        path, count = node.name, node.calls
        if len(calls.get(path, ())) != count:
            called = [(calls[p][-1], p) for p in aliases[id(modules[node.name])] if calls.get(p)]
            if not called:
                passed_on.append(node)
                continue
            path = max(called)[1]
            count = len(calls[path])
        if not returned.get(id(program.get_submodule(path))):
            unreturned.append(node.name)
            continue
        if path != node.name:
            renamed.append(f"{node.name} as {path}")
        kept.append(dataclasses.replace(node, name=path, calls=count))
    kept.sort(key=lambda n: calls[n.name][0])  # forward order, a renamed node where it now is
    notes = []
    if passed_on:
        kinds = Counter(n.module for n in passed_on)
        notes.append(
            f"{_nodes(len(passed_on))} the program does not run left out, as their output is "
            f"their input ({', '.join(f'{k} ×{v}' for k, v in kinds.most_common())})"
        )
    if unreturned:
        notes.append(
            f"{_nodes(len(unreturned))} whose output the program does not keep left out "
            f"({summarize(unreturned, 4)})"
        )
    if renamed:
        notes.append(f"shared modules are listed where last called: {summarize(renamed, 4)}")
    return kept, "; ".join(notes) or None


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _try_export(model, example, nodes, spatial: bool, also: torch.Tensor | None = None):
    """The program exported at `example`, checked there (and at `also`, another input), and its
    nodes (`program_nodes`)."""
    x = _export_example(example)
    with eval_mode(model):
        ep = torch.export.export(model, (x,), dynamic_shapes=(_dynamic_dims(x, spatial),))
    module = torch.export.unflatten(ep)
    if not all(_outputs_match(model, module, y) for y in (x, also) if y is not None):
        raise RuntimeError("the exported program's output differs from the model's")
    objects = [k for k, v in ep.constants.items() if not isinstance(v, torch.Tensor)]
    if objects:  # a script object or opaque constant could be stored only as a pickle
        raise RuntimeError(f"the program holds non-tensor constants ({summarize(objects)})")
    return ep, program_nodes(model, module, x, nodes)


class ExportTimeout(Exception):
    """An export attempt ran past its time budget."""


_deadline = threading.local()  # when this thread's export must stop, in its own CPU time


def _check_deadlines() -> None:
    """Make torch's symbolic-shape reasoning, where a slow export spends its time (sympy,
    minutes for Swin), stop with `ExportTimeout` once the exporting thread's deadline has
    passed: an ordinary exception raised from an ordinary call, so torch cleans up as after any
    failed export. Installed once; a thread without a deadline is not affected."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    original = ShapeEnv.evaluate_expr
    if getattr(original, "_tb_microscope_deadline", False):
        return

    @functools.wraps(original)
    def evaluate_expr(self, *args, **kwargs):
        at = getattr(_deadline, "at", None)
        if at is not None and time.thread_time() > at:
            raise ExportTimeout
        return original(self, *args, **kwargs)

    evaluate_expr._tb_microscope_deadline = True
    ShapeEnv.evaluate_expr = evaluate_expr


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Stop an export on this thread with `ExportTimeout` once it has used `seconds` of CPU time
    (see `_check_deadlines`); an error that torch raised instead, once past the deadline, counts
    as the timeout too. CPU time rather than wall-clock time, so that what is captured does not
    depend on how busy the machine is: the export runs beside the training loop (GoogLeNet's
    took 13 s alone and 27 s beside three busy processes on 2 cores, 13 s of CPU time both)."""
    if seconds is None:
        yield
        return
    _check_deadlines()
    _deadline.at = time.thread_time() + seconds
    try:
        yield
    except ExportTimeout:
        raise
    except Exception as e:
        if time.thread_time() > _deadline.at:
            raise ExportTimeout from e
        raise
    finally:
        _deadline.at = None


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's own log lines (symbolic-shape tracebacks) while exporting."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fix_sizes(dims: list[dict], example: torch.Tensor) -> list[dict]:
    """The dims with height and width fixed at the example's."""
    fixed = {name: int(size) for name, size in zip(_DIM_NAMES[4], example.shape)}
    return [
        {**d, "size": fixed[d["name"]], "min": fixed[d["name"]], "max": fixed[d["name"]]}
        if d["name"] in ("height", "width")
        else d
        for d in dims
    ]


def _runs_at_another_size(
    program: torch.export.ExportedProgram, example: torch.Tensor, dims: list[dict]
) -> bool:
    """Whether the program really runs at a second size its bounds allow (some programs export
    with dynamic sizes that a reshape then fixes: DINOv2's patch grid)."""
    sizes = []
    for name, size, growth in zip(("height", "width"), example.shape[2:], _GROWTH[0]):
        bound = next(d for d in dims if d["name"] == name)
        upper = bound["max"] if bound["max"] is not None else size + growth
        sizes.append(min(size + growth, upper) if upper > size else max(bound["min"], size - 8))
    if tuple(sizes) == tuple(example.shape[2:]):
        return False
    other = F.interpolate(example[:1], size=tuple(sizes))
    try:
        with torch.no_grad():
            torch.export.unflatten(program)(other)
    except Exception:  # any failure means: not at this size
        return False
    return True


def _spatial_bound(dims: list[dict]) -> int | None:
    """The largest height or width the program takes (the smaller of the two), None if any."""
    bounds = [d["max"] for d in dims if d["name"] in ("height", "width")]
    return min(bounds) if len(bounds) == 2 and None not in bounds else None


class _NotExported(Exception):
    """An export attempt failed; the message says how, for the capture's note."""

    def __init__(self, note: str, timed_out: bool = False):
        super().__init__(note)
        self.timed_out = timed_out


def _export(model, example, nodes, spatial: bool, budget: float, also=None):
    """(program, archive, dims, (nodes, note)) of `model` exported at `example`, with a dynamic
    batch and, if `spatial`, height and width (then for at most `budget` seconds of CPU time), its
    outputs checked at `example` and `also`; or `_NotExported`."""
    spatial = spatial and example.dim() == 4
    what = "with dynamic height/width" if spatial else "with a dynamic batch"
    try:
        with time_limit(budget if spatial else None):
            ep, found = _try_export(model, example, nodes, spatial, also)
    except ExportTimeout as e:
        raise _NotExported(f"{what} took over {budget:.0f} s of CPU time", timed_out=True) from e
    except Exception as e:  # export raises many types; each means "try the next way"
        raise _NotExported(f"{what} failed ({_first_line(e)})") from e
    try:
        archive = program_archive(ep)
    except Exception as e:  # a constant the archive cannot hold without a pickle
        raise _NotExported(f"{what}: the program cannot be stored ({_first_line(e)})") from e
    return ep, archive, _input_dims(ep), found


def _takes_larger(dims: list[dict], than: list[dict]) -> bool:
    bound = _spatial_bound(dims)
    return bound is None or bound > _spatial_bound(than)


def _export_wider(model, example, nodes, budget: float):
    """`_export`'s answer at twice the example's height and width, if that
    program also takes the example's size and computes the model's outputs there; else None.

    Export decides from the sizes it traces at. Where the last feature map is 1 x 1 at the
    example's size (ResNet-50 at 32 px), the layouts' "this size is 1" becomes the program's
    range, inputs no larger than the example, which the rebuilt program enforces; at twice the
    size "not 1" is a guard it does not enforce, and the range is any size from 2 up. Where
    sympy cannot solve a size's constraints at the example's size (AlexNet at 64 px), it may at
    twice the size. The outputs are checked at both sizes."""
    h, w = example.shape[2:]
    larger = F.interpolate(_export_example(example), size=(2 * h, 2 * w), mode="bilinear")
    try:
        with eval_mode(model), torch.no_grad():
            model(larger)  # a model that refuses the size costs no export
        exported = _export(model, larger, nodes, True, budget, _export_example(example))
    except Exception:  # any failure keeps what the example's size gave
        return None
    dims = exported[2]
    takes = {d["name"]: d for d in dims}
    for name, size in zip(("height", "width"), (h, w)):
        d = takes[name]
        if d["size"] is not None or not d["min"] <= size <= (d["max"] or size):
            return None
    return exported


# How long the attempt with dynamic height and width may take, in seconds of the exporting
# thread's CPU time (Swin's takes minutes); the environment variable TB_MICROSCOPE_EXPORT_BUDGET
# sets another number of seconds.
EXPORT_BUDGET_S = 20.0


def capture(
    model: nn.Module,
    example: torch.Tensor,
    nodes: list[Node],
    eager_edges: list,
    budget: float | None = None,
) -> Capture:
    """Capture `model`'s architecture: export if possible, else a pickled copy (see module doc).

    Export is tried with a dynamic batch, height and width (for at most `budget` seconds of the
    exporting thread's CPU time), then with a dynamic batch only, whose program runs at the
    example's height and width alone.
    """
    notes = []
    if budget is None:
        budget = float(os.environ.get("TB_MICROSCOPE_EXPORT_BUDGET") or EXPORT_BUDGET_S)
    with quiet_torch():
        for spatial in (True, False):
            if not spatial and example.dim() != 4:
                break
            spatial_image = spatial and example.dim() == 4
            try:
                ep, archive, dims, found = _export(model, example, nodes, spatial, budget)
            except _NotExported as e:  # at twice the size, export may succeed (once tried)
                wider = None
                if spatial_image and not e.timed_out:
                    wider = _export_wider(model, example, nodes, budget)
                if wider is None:
                    notes.append(str(e))
                    continue
                ep, archive, dims, found = wider
            else:
                if spatial_image and _spatial_bound(dims) is not None:
                    wider = _export_wider(model, example, nodes, budget)
                    if wider is not None and _takes_larger(wider[2], dims):
                        ep, archive, dims, found = wider
            sizes = {d["name"]: d["size"] for d in dims}
            if example.dim() == 4 and sizes.get("height") is None:
                if not _runs_at_another_size(ep, example, dims):
                    dims = _fix_sizes(dims, example)
                    notes.append("the program runs at the example's height and width only")
                elif _spatial_bound(dims) is not None:
                    most = {d["name"]: d["max"] for d in dims}
                    notes.append(
                        f"the program takes inputs of at most {most['height']}x{most['width']}"
                    )
            kept, changed = found
            if changed:
                notes.append(changed)
            return Capture(
                EXPORT,
                archive,
                None,
                dims,
                exported_edges(ep, {n.name for n in kept}),
                "; ".join(notes) or None,
                kept,
            )
    dims = [
        {"name": name, "size": size, "min": size, "max": size}
        for name, size in zip(_DIM_NAMES.get(example.dim(), []), example.shape)
    ]
    if dims:
        dims[0].update(size=None, min=1, max=None)
    return Capture(
        PICKLE,
        None,
        pickle_architecture(model),
        dims,
        eager_edges,
        "torch.export " + "; ".join(notes),
    )


class CaptureProcessError(RuntimeError):
    """The process capturing the architecture ended without a result."""


def _can_fork() -> bool:
    # macOS's system libraries are not safe in a forked child of a threaded process.
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _die_with_parent() -> None:
    """Ask Linux to kill this (child) process when the thread that forked it ends: a training
    process that exits mid-capture leaves no exporter behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # not Linux's libc: the child still ends with its export
        pass


CHILD_TIMEOUT_S = 240.0  # TB_MICROSCOPE_CAPTURE_TIMEOUT; then the capture is done in-process


def _child_timeout() -> float:
    try:
        return float(os.environ.get("TB_MICROSCOPE_CAPTURE_TIMEOUT", CHILD_TIMEOUT_S))
    except ValueError:
        return CHILD_TIMEOUT_S


def _read_with_deadline(fd: int, deadline: float) -> bytes | None:
    """All of the pipe `fd` until its writer closes it (then closes it), or None at `deadline`."""
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def capture_in_child(
    model: nn.Module, example: torch.Tensor, nodes: list[Node], eager_edges: list
) -> Capture:
    """`capture()` in a forked child process, for a caller that trains on meanwhile.

    torch.export switches oneDNN, NNPACK and cuDNN off for the whole process while it traces
    (torch/export/_trace.py, `_ignore_backend_decomps`): on a thread, the training loop's
    convolutions would run without them (slower, and with other numerics) until the export
    ended. A forked child has the model (a CPU copy) without pickling or importing anything,
    and sends back only the archive's bytes, dims, edges and notes. Where fork is not safe, it
    runs here."""
    if not _can_fork():
        return capture(model, example, nodes, eager_edges)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            os.close(read)
            _die_with_parent()
            torch.set_num_threads(1)  # a thread pool forked mid-use is not safe to grow
            try:
                answer = ("ok", capture(model, example, nodes, eager_edges))
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
                answer = ("error", f"{type(e).__name__}: {_first_line(e)}")
            with os.fdopen(write, "wb") as out:
                out.write(pickle.dumps(answer))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = _read_with_deadline(read, time.monotonic() + _child_timeout())
    if data is None:  # stuck: a lock another thread held at the fork, say. Capture here instead.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        warnings.warn_explicit(
            f"tb_microscope: the architecture's capture process gave no answer in "
            f"{_child_timeout():.0f} s; capturing in this process instead",
            RuntimeWarning,
            "tb_microscope",
            0,
        )
        return capture(model, example, nodes, eager_edges)
    _, status = os.waitpid(pid, 0)
    if not data:
        how = (
            f"signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exit code {os.WEXITSTATUS(status)}"
        )
        raise CaptureProcessError(f"the capture process ended ({how}) without a result")
    # Our own child's answer, through a pipe only the two processes hold.
    kind, value = pickle.loads(data)
    if kind == "error":
        raise CaptureProcessError(value)
    return value


# --- pickle fallback -----------------------------------------------------------------------------


def _installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return [Path(r).resolve() for r in roots if r]


def _user_code_modules(model: nn.Module) -> list:
    """Modules defining the model's classes that are not installed packages: pickle by value."""
    roots = _installed_roots()
    found = {}
    for cls in {type(m) for m in model.modules()}:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        if module is None or cls.__module__ == "__main__" or not path:
            continue
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            found[module.__name__] = module
    return list(found.values())


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def pickle_architecture(model: nn.Module) -> bytes:
    """cloudpickle a copy of `model` whose parameters and persistent buffers are on `meta`."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        if id(b) in persistent and id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(model, memo)
    for m in skeleton.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                hooks.clear()
    by_value = _user_code_modules(model)
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(skeleton)
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)


# --- restore -------------------------------------------------------------------------------------


def pickle_refusal(run_dir: Path) -> PickleNotAllowedError:
    return PickleNotAllowedError(
        f"run '{run_dir}' stores its architecture as a pickle, because torch.export could not "
        "capture the model. Unpickling runs code from the log directory, so it is refused by "
        "default: pass allow_pickle=True (tensorboard --microscope_allow_pickle, tb-microscope "
        "--allow-pickle) only for log directories you trust."
    )


def load_pickled(data: bytes, run_dir: Path, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise pickle_refusal(run_dir)
    try:
        return pickle.loads(data)
    except Exception as e:
        raise PickleNotAllowedError(
            f"the pickled architecture of run '{run_dir}' cannot be loaded here "
            f"({_first_line(e)}); the classes it needs may be missing from this environment."
        ) from e


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Put `state`'s tensors into `module` in place of its own (no copy), keeping ties.

    The module gets fresh Parameter objects, so two modules rebuilt from one architecture never
    share weights.
    """
    expected = set(module.state_dict(keep_vars=True))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            "the snapshot does not match the run's architecture: "
            + "; ".join(
                f"{what} {summarize(names)}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            )
        )
    made: dict[int, nn.Parameter] = {}
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if id(tensor) not in made:
                made[id(tensor)] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            owner._parameters[attr] = made[id(tensor)]
        else:
            owner._buffers[attr] = tensor
    return module
