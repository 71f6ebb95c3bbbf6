"""`tb-microscope render`: feature visualizations rendered ahead of time into the runs'
caches, and `render_jobs`, which renders a sweep with one progress bar (the demo's too)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import MicroscopeError
from ..limits import check_iterations, check_size
from .common import parse_indexes, steps_line
from .mlflow_images import log_to_mlflow
from .progress import Progress


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
    from ..store.paths import find_runs, is_mlflow_uri, relative_run, run_basename

    _check_render_syntax(args)
    mlflow = is_mlflow_uri(args.logdir)
    if args.log_to_mlflow and not mlflow:
        raise MicroscopeError(
            "--log-to-mlflow logs the pictures into the MLflow run they were rendered from: "
            "give the run as runs:/<run_id>"
        )
    logdir = args.logdir
    runs = [args.logdir] if mlflow else find_runs(logdir)
    if args.runs and not mlflow:
        wanted = set(args.runs)
        runs = [r for r in runs if relative_run(r, logdir) in wanted or run_basename(r) in wanted]
    if not runs:
        raise MicroscopeError(f"no tb_microscope runs to render under '{logdir}'")
    import torch

    from ..optvis.engine import QUALITIES, display_bands
    from ..optvis.techniques import get_technique
    from ..run import open_run

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
        logged = "; ".join(f"{run.name}: {steps_line(run.steps)}" for run in opened)
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
        from ..execution.ray_executor import RayExecutor

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
    from ..optvis.probe import probe_count

    try:
        return probe_count(run)
    except MicroscopeError as e:
        raise MicroscopeError(
            f"--technique {technique} draws probe images (--units are their indexes): {e}"
        ) from None


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
    from ..execution.cache import RenderCache
    from ..execution.executors import InProcessExecutor
    from ..execution.planner import Settings, group_size, plan, store

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
