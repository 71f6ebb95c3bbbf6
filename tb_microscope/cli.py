"""`tb-microscope`: the command line.

tb-microscope info LOGDIR       runs, steps and nodes (LOGDIR may be runs:/<MLflow run id>)
tb-microscope render LOGDIR     render feature visualizations ahead of time into the cache
tb-microscope dynamics RUN      how nodes and units changed over training
tb-microscope align A@S B@S     match a node's units across two runs or steps
tb-microscope atlas RUN         an activation atlas of a node at a step, as a PNG
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import MicroscopeError
from .limits import check_grid, check_iterations, check_size

if TYPE_CHECKING:
    from .run import Run

# Commands import what they use (torch among it, 4 s here) when they run, so that `--help` and
# a mistyped command answer at once.


def _steps_line(steps: list[int]) -> str:
    if len(steps) <= 24:
        return " ".join(map(str, steps)) or "none yet"
    return f"{' '.join(map(str, steps[:16]))} … {' '.join(map(str, steps[-6:]))}"


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def describe(run: Run, logdir: Path, all_nodes: bool) -> str:
    from .store.paths import is_mlflow_uri

    m = run.manifest
    arch = m.model.architecture
    if is_mlflow_uri(run.name):
        rel = run.name
    else:
        rel = run.path.relative_to(logdir) if run.path != logdir else Path(".")
    spec = run.input_spec
    lines = [
        f"{rel}  {m.model.cls}  {m.model.parameters:,} parameters  architecture: {arch.kind}",
        f"  input: {_shape(spec.shape)} {spec.dtype}, values in {spec.value_range}"
        + (
            f", normalized mean={spec.normalize['mean']} std={spec.normalize['std']}"
            if spec.normalize
            else ""
        ),
    ]
    if arch.note:  # one line per part, wrapped: a note may name a hundred modules
        for i, part in enumerate(arch.note.split("; ")):
            lines += textwrap.wrap(
                part,
                100,
                initial_indent="  note: " if i == 0 else "        ",
                subsequent_indent="          ",
                break_on_hyphens=False,
            )
    problem = run.problem()
    if problem:
        lines.append(f"  cannot be rendered here: {problem}")
    steps = run.steps
    lines.append(f"  steps ({len(steps)}): {_steps_line(steps)}")
    if m.probe:
        lines.append(f"  probe: {m.probe.count} images of {_shape(m.probe.shape)}")
    lines.append(f"  nodes ({len(run.nodes)}), edges ({len(run.edges)}):")
    shown = run.nodes if all_nodes or len(run.nodes) <= 40 else run.nodes[:40]
    width = max(len(n.name) for n in shown)
    for n in shown:
        lines.append(
            f"    {n.name:<{width}}  {n.kind:<7}  {n.units:>5} units  "
            f"{_shape(n.shape):<12}  {n.module}"
        )
    if len(shown) < len(run.nodes):
        lines.append(f"    … {len(run.nodes) - len(shown)} more (--all-nodes lists them)")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from .store.paths import find_runs, is_mlflow_uri

    if is_mlflow_uri(args.logdir):
        from .run import open_run

        run = open_run(args.logdir, allow_pickle=args.allow_pickle)
        print(describe(run, run.path, args.all_nodes))
        return 0
    logdir = Path(args.logdir)
    runs = find_runs(logdir)  # before torch is imported: nothing there is said at once
    if not runs:
        print(
            f"no tb_microscope runs under '{logdir}' (looked for "
            "*/plugins/tb_microscope/manifest.json); log one with tb_microscope.Logger",
            file=sys.stderr,
        )
        return 1
    from .run import Run

    for i, path in enumerate(runs):
        if i:
            print()
        try:
            print(describe(Run(path, allow_pickle=args.allow_pickle), logdir, args.all_nodes))
        except MicroscopeError as e:
            print(f"{path}: {e}")
    return 0


def parse_indexes(text: str, limit: int, what: str) -> list[int]:
    """`all`, or a comma list of numbers and ranges (`0-15,32`; `64-`: from 64 on), checked
    against `limit`."""
    if text == "all":
        return list(range(limit))
    out = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if hi else limit - 1 if dash else first
        except ValueError:
            raise MicroscopeError(
                f"--{what} takes numbers and ranges like 0-15,32 or 64-; got {text!r}"
            ) from None
        out.extend(range(max(first, 0), min(last, limit - 1) + 1))  # never past the limit
    return list(dict.fromkeys(out))


class Progress:
    """A one-line progress bar on stderr: done/total, units per second, time left."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.rendered, self.stream = total, 0, 0, stream
        self.start = time.monotonic()

    def advance(self, count: int, rendered: bool, label: str = "") -> None:
        self.done += count
        self.rendered += count if rendered else 0
        elapsed = time.monotonic() - self.start
        rate = self.rendered / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (30 - filled)
        minutes, seconds = divmod(int(left), 60)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} units  {rate:.2f} units/s  "
            f"{minutes}m{seconds:02d}s left  {label[-40:]:<40}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")


def _check_render_syntax(args: argparse.Namespace) -> None:
    """Refuse what is wrong in the arguments themselves before anything heavy is imported (torch
    alone takes seconds): a typo is answered at once."""
    for what in ("steps", "units"):
        parse_indexes(getattr(args, what), 0, what)  # syntax only: nothing is below 0
    if args.size is not None:
        check_size(args.size, "--size")
    if args.iterations is not None:
        check_iterations(args.iterations, "--iterations")
    if args.bands:
        try:
            args.bands = tuple(int(b) for b in args.bands.split(","))
        except ValueError:
            raise MicroscopeError(
                f"--bands takes three channel numbers like 3,2,1; got {args.bands!r}"
            ) from None


def cmd_render(args: argparse.Namespace) -> int:
    from .store.paths import find_runs, is_mlflow_uri

    _check_render_syntax(args)
    mlflow = is_mlflow_uri(args.logdir)
    if args.log_to_mlflow and not mlflow:
        raise MicroscopeError(
            "--log-to-mlflow logs the pictures into the MLflow run they were rendered from: "
            "give the run as runs:/<run_id>"
        )
    logdir = Path(args.logdir)
    runs = [args.logdir] if mlflow else find_runs(logdir)
    if args.runs and not mlflow:
        wanted = set(args.runs)
        runs = [r for r in runs if str(r.relative_to(logdir)) in wanted or r.name in wanted]
    if not runs:
        raise MicroscopeError(f"no tb_microscope runs to render under '{logdir}'")
    import torch

    from .optvis.engine import QUALITIES, display_bands
    from .optvis.techniques import get_technique
    from .run import open_run

    technique = get_technique(args.technique)
    if technique.objective is None:
        raise MicroscopeError(
            f"--technique {technique.name} draws no image; the techniques to "
            "render are channel, neuron, negative_channel, negative_neuron, "
            "diversity, deepdream and caricature"
        )
    quality = QUALITIES[args.quality]
    args.size = quality.size if args.size is None else args.size
    args.iterations = quality.iterations if args.iterations is None else args.iterations
    devices = None
    if args.device:
        try:
            devices = [torch.device(d.strip()) for d in args.device.split(",")]
        except RuntimeError as e:
            raise MicroscopeError(f"--device {args.device!r}: {e}") from None
    bands = args.bands or None  # made a tuple by _check_render_syntax
    opened = []
    for path in runs:  # one broken run does not stop the others
        try:
            run = open_run(path, allow_pickle=args.allow_pickle)
            problem = run.problem()
        except MicroscopeError as e:
            problem = str(e)
        if problem:
            print(f"tb-microscope: skipping {path}: {problem}", file=sys.stderr)
        else:
            opened.append(run)
    if not opened:
        raise MicroscopeError(f"no run under '{logdir}' can be rendered (see above)")
    jobs = []  # (run, step, node, units)
    for run in opened:
        display_bands(run.input_spec.channels, bands)  # wrong bands: said before any work
        logged = run.steps  # one listing of the snapshot folder
        steps = logged
        if args.steps != "all" and logged:
            wanted = set(parse_indexes(args.steps, logged[-1] + 1, "steps"))
            steps = [step for step in logged if step in wanted]
        nodes = [run.node(n) for n in args.nodes] if args.nodes else run.nodes
        probe = 0
        if technique.compares:  # one run without probe images does not stop the others
            try:
                probe = _probe_count(run, technique.name)
            except MicroscopeError as e:
                print(f"tb-microscope: skipping {run.path}: {e}", file=sys.stderr)
                continue
        for step in steps:
            for node in nodes:
                if technique.compares:  # a caricature's units are probe images
                    units = parse_indexes(args.units, probe, "units")
                elif technique.whole_node:
                    units = [0]
                else:
                    units = parse_indexes(args.units, node.units, "units")
                jobs.append((run, step, node.name, units))
    if not jobs and technique.compares and not any(run.manifest.probe for run in opened):
        raise MicroscopeError(
            f"nothing to render: --technique {technique.name} draws probe images, and no run "
            f"under '{logdir}' has any (see above)"
        )
    if not jobs:
        logged = "; ".join(f"{run.name}: {_steps_line(run.steps)}" for run in opened)
        raise MicroscopeError(
            f"nothing to render: --steps {args.steps} matches no logged step "
            f"(logged steps: {logged})"
        )
    options = dict(size=args.size, iterations=args.iterations, seed=args.seed)
    executor = None
    if args.ray:
        if args.device:
            raise MicroscopeError(
                "--device names this machine's devices; with --ray the "
                "cluster's GPUs (else CPUs) are used"
            )
        from .execution.ray_executor import RayExecutor

        executor = RayExecutor(args.ray, allow_pickle=args.allow_pickle, workers=args.ray_workers)
        print(f"rendering on {executor.describe()}", file=sys.stderr)
    try:
        rendered, interrupted = render_jobs(
            jobs,
            technique.name,
            **options,
            devices=devices,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            bands=bands,
            executor=executor,
        )
    finally:
        if executor is not None:
            executor.close()
    total = sum(len(j[3]) for j in jobs)
    if interrupted:
        return 130
    print(f"{total} units: {rendered} rendered, {total - rendered} were already cached")
    if args.log_to_mlflow:
        logged = log_to_mlflow(jobs, technique, args.cache_dir, bands, **options)
        print(f"logged {logged} images into MLflow run {opened[0].name}")
    return 0


def _probe_count(run, technique: str) -> int:
    """How many probe images `run` has, for a technique whose units are probe images; none is
    an error saying so and how to log them."""
    from .optvis.probe import probe_count

    try:
        return probe_count(run)
    except MicroscopeError as e:
        raise MicroscopeError(
            f"--technique {technique} draws probe images (--units are their indexes): {e}"
        ) from None


def _mlflow_key(*parts: str) -> str:
    """An MLflow image key from `parts`: characters MLflow refuses in keys become '_'."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


def grid(images: list, gap: int = 2):
    """Images (uint8 H x W x 3, one size) tiled in a near-square grid on a white background."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w = images[0].shape[:2]
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return out


def log_to_mlflow(jobs, technique, cache_dir, bands, *, size, iterations, seed) -> int:
    """Log the cached pictures of (run, step, node, units) `jobs` into their MLflow run: one
    image key per node and unit (MLflow's step slider walks it through training) and one grid
    per node and step. Returns how many images were logged."""
    from mlflow import MlflowClient

    from .execution.cache import RenderCache, RenderKey

    logged = 0
    prefix = ("microscope",) if technique.name == "channel" else ("microscope", technique.name)
    for run, step, node, units in jobs:
        store = run.store
        client = MlflowClient(store.uri)
        cache = RenderCache(run, cache_dir)
        version = run.snapshot_version(step)
        pictures = []
        for unit in units:
            for image in range(technique.images_per_unit):
                key = RenderKey(
                    step, version, node, unit, technique.name, size, iterations, seed, image, bands
                )
                cached = cache.get(key)
                if cached is None:
                    raise MicroscopeError(
                        f"the picture of {node} unit {unit} at step {step} is not in the cache "
                        "(evicted meanwhile?); run the command again"
                    )
                what = "probe" if technique.compares else "unit"  # a caricature's are probe images
                suffix = f"{what}_{unit:04d}"
                suffix += f"_{image}" if technique.images_per_unit > 1 else ""
                name = "whole" if technique.whole_node else suffix
                key = _mlflow_key(*prefix, node, name)
                client.log_image(store.mlflow_run_id, cached.image, key=key, step=step)
                pictures.append(cached.image)
                logged += 1
        if len(pictures) > 1:
            client.log_image(
                store.mlflow_run_id,
                grid(pictures),
                key=_mlflow_key(*prefix, node, "grid"),
                step=step,
            )
            logged += 1
    return logged


def render_jobs(
    jobs,
    technique: str,
    *,
    size: int,
    iterations: int,
    seed: int,
    devices,
    batch_size: int | None,
    cache_dir: str | None,
    bands: tuple[int, ...] | None = None,
    executor=None,
) -> tuple[int, bool]:
    """Render (run, step, node, units) jobs into the cache with one progress bar: the planner
    makes the groups (minus what is cached), `executor` renders them (default: a worker thread
    per device in `devices`; None: every CUDA device, else the CPU) and this process writes
    each group's pictures as they arrive.

    Returns how many units were rendered and whether Ctrl-C stopped it. Ctrl-C asks the workers
    to stop at their next check, never in the middle of writing a file; a second Ctrl-C stops at
    once (files stay whole then too: they are written to a temporary name first).
    """
    from .execution.cache import RenderCache
    from .execution.executors import InProcessExecutor
    from .execution.planner import Settings, group_size, plan, store

    executor = executor or InProcessExecutor(devices)
    settings = Settings(technique, size, iterations, seed, bands, batch_size)
    runs = {run.id: run for run, *_ in jobs}
    per_group = group_size(technique, executor.device_kind, batch_size)
    groups, cached = plan(jobs, settings, cache_dir, per_group)
    progress = Progress(cached + sum(len(g.units) for g in groups))
    progress.advance(cached, False, "cached")
    caches = {run_id: RenderCache(run, cache_dir) for run_id, run in runs.items()}
    per_worker: dict[str, int] = {}
    stop = threading.Event()

    def on_result(group, rendered, worker: str) -> None:
        store(caches[group.run_id], group, settings, rendered)
        per_worker[worker] = per_worker.get(worker, 0) + len(group.units)
        label = f"{runs[group.run_id].name}@{group.step}/{group.node}"
        progress.advance(len(group.units), True, label)

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        executor.execute(groups, settings, on_result, stop.is_set)
    except KeyboardInterrupt:
        stop.set()
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    rendered = sum(per_worker.values())
    if len(per_worker) > 1:
        print(
            "rendered on " + ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())),
            file=sys.stderr,
        )
    if stop.is_set():
        print(
            f"interrupted: {rendered} units rendered and cached; run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return rendered, True
    return rendered, False


def open_one_run(text: str, allow_pickle: bool) -> Run:
    """A run directory, a log directory holding exactly one run, or runs:/<MLflow run id>."""
    from .store.paths import find_runs, is_mlflow_uri

    if is_mlflow_uri(text):
        from .run import open_run

        return open_run(text, allow_pickle=allow_pickle)
    path = Path(text)
    runs = find_runs(path)
    if not runs:
        raise MicroscopeError(
            f"no tb_microscope run at '{path}' (looked for plugins/tb_microscope/manifest.json)"
        )
    if len(runs) > 1:
        names = ", ".join(str(r.relative_to(path)) for r in runs[:6])
        raise MicroscopeError(
            f"'{path}' holds {len(runs)} runs ({names}{', …' if len(runs) > 6 else ''}); "
            "name one run directory"
        )
    from .run import Run

    return Run(runs[0], allow_pickle=allow_pickle)


def _number(value) -> str:
    return "" if value is None or value != value else f"{value:.4f}"


def _write_output(text: str, output: str | None) -> None:
    from .store.local import write_bytes_atomic

    if output:
        write_bytes_atomic(Path(output), text.encode())
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower() if args.output else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def cmd_dynamics(args: argparse.Namespace) -> int:
    run = open_one_run(args.run, args.allow_pickle)
    from .analysis.dynamics import model_dynamics, node_dynamics

    steps = None
    if args.steps != "all" and run.steps:
        steps = [
            s for s in run.steps if s in set(parse_indexes(args.steps, run.steps[-1] + 1, "steps"))
        ]
    options = dict(steps=steps, device=args.device, cache_dir=args.cache_dir)
    found = (
        node_dynamics(run, args.node, **options) if args.node else model_dynamics(run, **options)
    )
    form = _output_format(args)
    if form == "json":
        _write_output(json.dumps(found.to_dict(), indent=1) + "\n", args.output)
        return 0
    rows = []  # long format: measure, node, unit, step, value
    if args.node:
        for i, step in enumerate(found.steps):
            rows.append(("cka_to_final", found.node, "", step, found.cka_to_final[i]))
            rows.append(("cka_to_previous", found.node, "", step, found.cka_to_previous[i]))
        for unit, row in enumerate(found.unit_correlation):
            for step, value in zip(found.steps, row):
                rows.append(("unit_correlation", found.node, unit, step, value))
        for unit, formed in enumerate(found.formed_step):
            rows.append(("formed_step", found.node, unit, "", formed))
    else:
        for n, node in enumerate(found.nodes):
            for i, step in enumerate(found.steps):
                rows.append(("cka_to_final", node, "", step, found.cka_to_final[n, i]))
                rows.append(("cka_to_previous", node, "", step, found.cka_to_previous[n, i]))
    if form == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["measure", "node", "unit", "step", "value"])
        for measure, node, unit, step, value in rows:
            text = value if isinstance(value, int) else _number(value)
            writer.writerow([measure, node, unit, step, text])
        _write_output(buffer.getvalue(), args.output)
        return 0
    _write_output(_dynamics_table(run, found, bool(args.node)), args.output)
    return 0


def _dynamics_table(run: Run, found, one_node: bool) -> str:
    steps = found.steps
    lines = [f"run {run.name}: {len(steps)} steps ({_steps_line(steps)})"]
    if not one_node:
        width = max(len(n) for n in found.nodes)
        lines.append("linear CKA to the last step, per node (1 = its final form):")
        lines.append(f"  {'node':<{width}}  " + "  ".join(f"{s:>7}" for s in steps))
        for name, row in zip(found.nodes, found.cka_to_final):
            lines.append(f"  {name:<{width}}  " + "  ".join(f"{_number(v):>7}" for v in row))
        return "\n".join(lines) + "\n"
    lines.append(f"node {found.node}:")
    lines.append(f"  {'step':>8}  {'CKA to final':>12}  {'CKA to previous':>15}  units formed")
    formed = [s for s in found.formed_step if s is not None]
    for i, step in enumerate(steps):
        count = sum(1 for s in formed if s <= step)
        lines.append(
            f"  {step:>8}  {_number(found.cka_to_final[i]):>12}  "
            f"{_number(found.cka_to_previous[i]):>15}  {count:>5} / {len(found.formed_step)}"
        )
    order = sorted(
        range(len(found.formed_step)),
        key=lambda u: (found.formed_step[u] is None, found.formed_step[u] or 0),
    )
    lines.append(
        f"units by the step they formed (correlation with their last form stays >= "
        f"{found.threshold}):"
    )
    shown = [f"{u}@{found.formed_step[u]}" for u in order if found.formed_step[u] is not None]
    never = [str(u) for u in order if found.formed_step[u] is None]
    lines.append("  " + (" ".join(shown) or "none"))
    if never:
        lines.append(f"  never (dead at the last step, or not settled): {' '.join(never)}")
    return "\n".join(lines) + "\n"


def parse_run_step(text: str, allow_pickle: bool) -> tuple[Run, int]:
    path, at, step = text.rpartition("@")
    if not at or not step.isdigit():
        raise MicroscopeError(
            f"expected RUN@STEP (a run directory and a logged step, like runs/seed1@3000); "
            f"got {text!r}"
        )
    return open_one_run(path, allow_pickle), int(step)


def cmd_align(args: argparse.Namespace) -> int:
    run_a, step_a = parse_run_step(args.a, args.allow_pickle)
    run_b, step_b = parse_run_step(args.b, args.allow_pickle)
    from .analysis.dynamics import align_units

    found = align_units(run_a, step_a, run_b, step_b, args.node, device=args.device)
    form = _output_format(args)
    if form == "json":
        _write_output(json.dumps(found.to_dict(), indent=1) + "\n", args.output)
        return 0
    order = sorted(
        range(len(found.unit_b)),
        key=lambda u: -found.correlation[u] if found.correlation[u] == found.correlation[u] else 2,
    )
    if form == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["unit_a", "unit_b", "correlation", "same_unit_correlation"])
        for u in order:
            b = int(found.unit_b[u])
            writer.writerow(
                [u, "" if b < 0 else b, _number(found.correlation[u]), _number(found.same_unit[u])]
            )
        _write_output(buffer.getvalue(), args.output)
        return 0
    matched = found.correlation[~np.isnan(found.correlation)]
    mean = _number(matched.mean() if len(matched) else None)
    lines = [
        f"{found.node}: {run_a.name}@{step_a} -> {run_b.name}@{step_b}, "
        f"{len(found.unit_b)} units; matched pairs' correlation: mean {mean}, "
        f"{int((matched >= 0.9).sum())} at 0.9 or more",
        f"  {'unit A':>6}  {'unit B':>6}  {'correlation':>11}  {'same unit':>9}",
    ]
    for u in order:
        b = int(found.unit_b[u])
        lines.append(
            f"  {u:>6}  {'-' if b < 0 else b:>6}  {_number(found.correlation[u]):>11}  "
            f"{_number(found.same_unit[u]):>9}"
        )
    _write_output("\n".join(lines) + "\n", args.output)
    return 0


def cmd_atlas(args: argparse.Namespace) -> int:
    for value, check, flag in (
        (args.size, check_size, "--size"),
        (args.iterations, check_iterations, "--iterations"),
        (args.grid, check_grid, "--grid"),
    ):
        if value is not None:
            check(value, flag)
    if Path(args.output).suffix.lower() != ".png":
        raise MicroscopeError(f"--output is a PNG file (atlas.png); got {args.output!r}")
    run = open_one_run(args.run, args.allow_pickle)
    import torch
    from PIL import Image

    from .analysis.atlas import activation_atlas
    from .store.local import write_bytes_atomic

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        raise MicroscopeError(f"--device {args.device!r}: {e}") from None

    def progress(fraction: float) -> None:
        sys.stderr.write(f"\ratlas of {args.node} at step {args.step}: {fraction:4.0%}")
        sys.stderr.flush()

    found = activation_atlas(
        run,
        args.step,
        args.node,
        grid=args.grid,
        size=args.size,
        iterations=args.iterations,
        seed=args.seed,
        device=device,
        layout_step=args.layout_step,
        preview=args.preview,
        layout_method=args.layout,
        cache_dir=args.cache_dir,
        progress=progress,
    )
    sys.stderr.write("\n")
    buffer = io.BytesIO()
    Image.fromarray(found.image).save(buffer, format="PNG")
    write_bytes_atomic(Path(args.output), buffer.getvalue())
    side = found.image.shape[0]
    print(
        f"{found.node} at step {found.step}: {len(found.cells)} of {found.grid}x{found.grid} "
        f"cells drawn from {len(found.coords)} activations, laid out by {found.layout_method} "
        f"at step {found.layout_step}; wrote {args.output} ({side}x{side} px)"
    )
    return 0


DEMO_SIZE = 48  # what the demo renders ahead and serves: quick on a CPU


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.train import train
    from .run import Run

    start = time.monotonic()
    logdir = Path(args.logdir)
    run_dir = logdir / "demo"
    if (run_dir / "plugins").exists():
        print(f"using the demo run already in {run_dir} (delete it to train again)")
    else:
        print(f"training a small CNN on generated images for {args.steps} steps into {run_dir}")
        train(run_dir, steps=args.steps)
    run = Run(run_dir)
    steps = run.steps
    chosen = sorted({steps[0], steps[len(steps) // 3], steps[2 * len(steps) // 3], steps[-1]})
    nodes = [run.node("conv1"), run.node("conv2")]
    print(
        f"rendering {', '.join(n.name for n in nodes)} at steps {chosen} ahead of time "
        "(their units, then each node's DeepDream)"
    )
    for technique, units in (
        ("channel", lambda node: list(range(node.units))),
        ("deepdream", lambda node: [0]),
    ):
        jobs = [(run, step, node.name, units(node)) for step in chosen for node in nodes]
        _, interrupted = render_jobs(
            jobs,
            technique,
            size=DEMO_SIZE,
            iterations=args.iterations,
            seed=0,
            devices=None,
            batch_size=64,
            cache_dir=None,
        )
        if interrupted:
            return 130
    print(f"demo ready in {time.monotonic() - start:.0f}s")
    serve = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--microscope_size",
        str(DEMO_SIZE),
        "--microscope_iterations",
        str(args.iterations),
    ]
    if args.no_serve:
        print("to look at it:", shlex.join(["tensorboard", *serve[3:]]))
        return 0
    print(
        f"serving TensorBoard: open http://{args.host}:{args.port}/#tb_microscope "
        "(Ctrl-C stops it)",
        flush=True,
    )
    os.execv(sys.executable, serve)  # TensorBoard takes this process over, signals included


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb-microscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list the runs, steps and nodes under a log directory")
    info.add_argument(
        "logdir", help="a TensorBoard log directory, one run directory, or runs:/<MLflow run id>"
    )
    info.add_argument("--all-nodes", action="store_true", help="list every node")
    info.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory (see render --allow-pickle)",
    )
    info.set_defaults(func=cmd_info)

    render = sub.add_parser(
        "render",
        help="render feature visualizations ahead of time into the runs' caches",
        description="Render units into the same cache the TensorBoard tab reads. Resumable: "
        "cached units are skipped; Ctrl-C leaves no half-written file.",
    )
    render.add_argument("logdir", help="a log directory, a run directory or runs:/<MLflow run id>")
    render.add_argument("--runs", nargs="+", help="run names (default: all runs)")
    render.add_argument("--steps", default="all", help="e.g. 0-1000,5000 or 2000- (default: all)")
    render.add_argument("--nodes", nargs="+", help="node names (default: every node)")
    render.add_argument(
        "--units",
        default="all",
        help="e.g. 0-15,32 or 64- (default: all); for caricature, probe image indexes",
    )
    render.add_argument(
        "--technique",
        default="channel",
        help="channel, neuron, negative_channel, negative_neuron, diversity, "
        "deepdream, caricature (of probe images: --units are their indexes; default: channel)",
    )
    render.add_argument(
        "--quality",
        choices=["preview", "full"],
        default="full",
        help="full: 128 px, 512 iterations; preview: 32 px, 24 iterations, a first look in "
        "about 1/150 of the time (the tab shows previews until the full render is "
        "there); --size and --iterations override either (default full)",
    )
    render.add_argument("--size", type=int, help="image size in px (default: the quality's)")
    render.add_argument("--iterations", type=int, help="default: the quality's")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument(
        "--bands",
        help="for models of more than three input channels: the three shown as RGB, e.g. "
        "3,2,1 (default: the first three)",
    )
    render.add_argument(
        "--device",
        help="cuda, cuda:1, cpu, or several at once: cuda:0,cuda:1 (default: every CUDA "
        "device, else the CPU)",
    )
    render.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per optimization (default: as many as half the device's free memory "
        "holds, at most 32 on CUDA and 16 on the CPU)",
    )
    render.add_argument("--cache-dir", help="cache root (default: in each run, else ~/.cache)")
    render.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="render on a Ray cluster (extra tb-microscope[ray]): local starts one on this "
        "machine for the command, auto joins the one in RAY_ADDRESS, else its address; one "
        "actor per GPU, else per CPU. The files written are the same as without --ray (this "
        "process writes them); the cluster's machines must reach the runs",
    )
    render.add_argument(
        "--ray-workers",
        type=int,
        help="with --ray: how many actors (default: one per GPU, else CPU)",
    )
    render.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="for runs:/<id>: log each picture into that MLflow run (key microscope/<node>/"
        "unit_<n>, at its step) and one grid per node and step",
    )
    render.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory: load pickled architectures and architecture files as "
        "they are (this can run code from the log directory)",
    )
    render.set_defaults(func=cmd_render)

    def output_options(command) -> None:
        command.add_argument(
            "--format",
            choices=["table", "csv", "json"],
            help="default: from --output's suffix, else a table",
        )
        command.add_argument("--output", "-o", help="write to this file instead of stdout")
        command.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
        command.add_argument(
            "--allow-pickle",
            action="store_true",
            help="trust the log directory (see render --allow-pickle)",
        )

    dynamics = sub.add_parser(
        "dynamics",
        help="how nodes and units changed over training (CKA, unit correlations, formation)",
        description="From the run's snapshots and probe images: per step, each node's linear "
        "CKA to its last logged form; with --node, also each unit's correlation with its final "
        "form and the step it formed (from which that stays >= 0.9). Cached with the run's "
        "renders: asking again after new snapshots computes only those.",
    )
    dynamics.add_argument("run", help="a run directory (or a log directory with one run)")
    dynamics.add_argument("--node", help="one node's units (default: every node's CKA)")
    dynamics.add_argument("--steps", default="all", help="e.g. 0-1000,5000 or 2000- (default: all)")
    dynamics.add_argument("--cache-dir", help="cache root (default: in the run, else ~/.cache)")
    output_options(dynamics)
    dynamics.set_defaults(func=cmd_dynamics)

    align = sub.add_parser(
        "align",
        help="match the units of a node across two runs (or two steps) one to one",
        description="Pairs every unit of NODE in A with a unit of the same node in B: the "
        "one-to-one assignment with the largest total correlation of their activations on A's "
        "probe images. Prints each pair's correlation and each unit's correlation with the "
        "unit of the same number (for two steps of one run: how much it changed).",
    )
    align.add_argument("a", metavar="RUN_A@STEP")
    align.add_argument("b", metavar="RUN_B@STEP")
    align.add_argument("--node", required=True)
    output_options(align)
    align.set_defaults(func=cmd_align)

    atlas = sub.add_parser(
        "atlas",
        help="an activation atlas of a node at a step (Carter et al., 2019), as a PNG",
        description="Samples the node's activations on the run's probe images, lays them out "
        "in 2-D (UMAP with the [atlas] extra, else PCA) at --layout-step (default: the last "
        "logged step; keep it to compare steps: the same patches stay in the same cells), and "
        "renders each cell's mean direction. Cached with the run's renders.",
    )
    atlas.add_argument("run", help="a run directory (or a log directory with one run)")
    atlas.add_argument("--step", type=int, required=True, help="a logged step")
    atlas.add_argument("--node", required=True)
    atlas.add_argument("--grid", type=int, default=20, help="cells per side, 2 to 50 (default 20)")
    atlas.add_argument(
        "--size", type=int, help="each cell's picture, px (default 64; 32 with --preview)"
    )
    atlas.add_argument("--iterations", type=int, help="default 128; 24 with --preview")
    atlas.add_argument(
        "--preview", action="store_true", help="a quick first look: small pictures, few iterations"
    )
    atlas.add_argument(
        "--layout-step", type=int, help="the step whose activations fix the layout (default: last)"
    )
    atlas.add_argument(
        "--layout",
        choices=["auto", "umap", "pca"],
        default="auto",
        help="auto: UMAP where umap-learn is installed (the [atlas] extra), else PCA",
    )
    atlas.add_argument("--seed", type=int, default=0)
    atlas.add_argument("--cache-dir", help="cache root (default: in the run, else ~/.cache)")
    atlas.add_argument("--output", "-o", required=True, help="the PNG to write")
    atlas.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    atlas.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory (see render --allow-pickle)",
    )
    atlas.set_defaults(func=cmd_atlas)

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on generated images, render it, serve the tab",
        description="Generates an image data set (stripes, checkerboards, colour blobs, discs), "
        "trains a small CNN with the Logger (about half a minute on a 2-core CPU), renders its "
        "first nodes ahead of time and starts TensorBoard with the Microscope tab.",
    )
    demo.add_argument("--logdir", default="runs", help="where the demo run goes (default runs)")
    demo.add_argument("--port", type=int, default=6006)
    demo.add_argument("--host", default="localhost")
    demo.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    demo.add_argument(
        "--iterations",
        type=int,
        default=128,
        help="render iterations, ahead of time and in the tab (default 128)",
    )
    demo.add_argument("--no-serve", action="store_true", help="stop before starting TensorBoard")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MicroscopeError, ValueError) as e:
        print(f"tb-microscope: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
