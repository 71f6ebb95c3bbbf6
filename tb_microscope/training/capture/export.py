"""Architecture capture by `torch.export`: the program with dynamic batch (and, where it can,
height and width), checked against the eager model, its nodes as the program runs them, its edges;
the pickle fallback where export fails."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree
from torch.utils._sympy.numbers import int_oo

from ...errors import MicroscopeError, first_line, summarize
from ...nodes import Node, node_tensor, node_view
from ...store.architecture import program_archive
from ...store.manifest import EXPORT, PICKLE
from .discovery import SIZE_GROWTHS, eval_mode, innermost_edges
from .pickled import pickle_architecture


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
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    modules = dict(model.named_modules())
    candidates = {p: node for node in nodes for p in aliases[id(modules[node.name])]}

    def returns_node(output, node: Node) -> bool:
        try:
            tensor = node_tensor(output, node)
        except MicroscopeError:  # no tensor of the node's rank among what it returned
            return False
        return node_view(tensor, node).maps.shape[1] == node.units

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
            f"their input ({', '.join(f'{k} ×{v}' for k, v in kinds.most_common())}: "
            f"{', '.join(n.name for n in passed_on)})"
        )
    if unreturned:
        notes.append(
            f"{_nodes(len(unreturned))} whose output the program does not keep left out "
            f"({', '.join(unreturned)})"
        )
    if renamed:
        notes.append(f"shared modules are listed where last called: {', '.join(renamed)}")
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
    for name, size, growth in zip(("height", "width"), example.shape[2:], SIZE_GROWTHS[0]):
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
        raise _NotExported(f"{what} failed ({first_line(e)})") from e
    try:
        archive = program_archive(ep)
    except Exception as e:  # a constant the archive cannot hold without a pickle
        raise _NotExported(f"{what}: the program cannot be stored ({first_line(e)})") from e
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
