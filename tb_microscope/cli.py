"""`tb-microscope`: the command line.

tb-microscope info LOGDIR       runs, steps and nodes
tb-microscope render LOGDIR     render feature visualizations ahead of time into the cache
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import MicroscopeError
from .run import Run, find_runs


def _steps_line(steps: list[int]) -> str:
    if len(steps) <= 24:
        return " ".join(map(str, steps)) or "none yet"
    return f"{' '.join(map(str, steps[:16]))} … {' '.join(map(str, steps[-6:]))}"


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def describe(run: Run, logdir: Path, all_nodes: bool) -> str:
    m = run.manifest
    arch = m.model.architecture
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
    if arch.note:
        lines.append(f"  note: {arch.note}")
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
    logdir = Path(args.logdir)
    runs = find_runs(logdir)
    if not runs:
        print(
            f"no tb_microscope runs under '{logdir}' (looked for "
            "*/plugins/tb_microscope/manifest.json); log one with tb_microscope.Logger",
            file=sys.stderr,
        )
        return 1
    for i, path in enumerate(runs):
        if i:
            print()
        try:
            print(describe(Run(path, allow_pickle=args.allow_pickle), logdir, args.all_nodes))
        except MicroscopeError as e:
            print(f"{path}: {e}")
    return 0


def parse_indexes(text: str, limit: int, what: str) -> list[int]:
    """`all`, or a comma list of numbers and ranges (`0-15,32`), checked against `limit`."""
    if text == "all":
        return list(range(limit))
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise MicroscopeError(
                f"--{what} takes numbers and ranges like 0-15,32; got {text!r}"
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
            f"{minutes}m{seconds:02d}s left  {label[:40]:<40}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")


def cmd_render(args: argparse.Namespace) -> int:
    import torch

    from .rendering import get_technique
    from .rendering.engine import QUALITIES, display_bands

    logdir = Path(args.logdir)
    runs = find_runs(logdir)
    if args.runs:
        wanted = set(args.runs)
        runs = [r for r in runs if str(r.relative_to(logdir)) in wanted or r.name in wanted]
    if not runs:
        raise MicroscopeError(f"no tb_microscope runs to render under '{logdir}'")
    technique = get_technique(args.technique)
    if technique.objective is None:
        raise MicroscopeError(
            f"--technique {technique.name} draws no image; the techniques to "
            "render are channel, neuron, negative_channel, negative_neuron, "
            "diversity and deepdream"
        )
    quality = QUALITIES[args.quality]
    args.size = quality.size if args.size is None else args.size
    args.iterations = quality.iterations if args.iterations is None else args.iterations
    if not 8 <= args.size <= 1024 or not 1 <= args.iterations <= 100_000:
        raise MicroscopeError("--size must be from 8 to 1024 and --iterations from 1 to 100000")
    device = torch.device(args.device) if args.device else None
    bands = None
    if args.bands:
        try:
            bands = tuple(int(b) for b in args.bands.split(","))
        except ValueError:
            raise MicroscopeError(
                f"--bands takes three channel numbers like 3,2,1; got {args.bands!r}"
            ) from None
    opened = []
    for path in runs:  # one broken run does not stop the others
        try:
            run = Run(path, allow_pickle=args.allow_pickle)
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
        for step in steps:
            for node in nodes:
                units = (
                    [0] if technique.whole_node else parse_indexes(args.units, node.units, "units")
                )
                jobs.append((run, step, node.name, units))
    if not jobs:
        logged = "; ".join(f"{run.name}: {_steps_line(run.steps)}" for run in opened)
        raise MicroscopeError(
            f"nothing to render: --steps {args.steps} matches no logged step "
            f"(logged steps: {logged})"
        )
    rendered, interrupted = render_jobs(
        jobs,
        technique.name,
        size=args.size,
        iterations=args.iterations,
        seed=args.seed,
        device=device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        bands=bands,
    )
    total = sum(len(j[3]) for j in jobs)
    if interrupted:
        return 130
    print(f"{total} units: {rendered} rendered, {total - rendered} were already cached")
    return 0


def render_jobs(
    jobs,
    technique: str,
    *,
    size: int,
    iterations: int,
    seed: int,
    device,
    batch_size: int,
    cache_dir: str | None,
    bands: tuple[int, ...] | None = None,
) -> tuple[int, bool]:
    """Render (run, step, node, units) jobs into the cache with a progress bar.

    Returns how many units were rendered and whether Ctrl-C stopped it. Ctrl-C asks the render
    to stop at its next check, never in the middle of writing a file; a second Ctrl-C stops at
    once (files stay whole then too: they are written to a temporary name first).
    """
    from .rendering import RenderCache, RenderKey, render_cached
    from .rendering.engine import RenderCancelled

    progress = Progress(sum(len(j[3]) for j in jobs))
    rendered = 0
    options = dict(size=size, iterations=iterations, seed=seed)
    stop = threading.Event()

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for run, step, node, units in jobs:
            if stop.is_set():
                raise RenderCancelled("interrupted")
            cache = RenderCache(run, cache_dir)
            version = run.snapshot_version(step)
            todo = [
                u
                for u in units
                if RenderKey(step, version, node, u, technique, **options, bands=bands) not in cache
            ]
            progress.advance(len(units) - len(todo), False, f"{run.name}@{step}/{node}")
            if not todo:
                continue
            model = run.load_model(step, device or _default_device())
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                render_cached(
                    cache,
                    run,
                    step,
                    node,
                    chunk,
                    technique,
                    device=device,
                    batch_size=batch_size,
                    model=model,
                    bands=bands,
                    should_stop=stop.is_set,
                    **options,
                )
                rendered += len(chunk)
                progress.advance(len(chunk), True, f"{run.name}@{step}/{node}")
    except (KeyboardInterrupt, RenderCancelled):
        progress.close()
        print(
            f"interrupted: {rendered} units rendered and cached; run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return rendered, True
    finally:
        signal.signal(signal.SIGINT, previous)
    progress.close()
    return rendered, False


DEMO_SIZE = 48  # what the demo renders ahead and serves: quick on a CPU


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.train import train

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
            device=None,
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


def _default_device():
    from .rendering.engine import default_device

    return default_device()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb-microscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list the runs, steps and nodes under a log directory")
    info.add_argument("logdir", help="a TensorBoard log directory, or one run directory")
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
    render.add_argument("logdir")
    render.add_argument("--runs", nargs="+", help="run names (default: all runs)")
    render.add_argument("--steps", default="all", help="e.g. 0-1000,5000 (default: all)")
    render.add_argument("--nodes", nargs="+", help="node names (default: every node)")
    render.add_argument("--units", default="all", help="e.g. 0-15,32 (default: all)")
    render.add_argument(
        "--technique",
        default="channel",
        help="channel, neuron, negative_channel, negative_neuron, diversity, "
        "deepdream (default: channel)",
    )
    render.add_argument(
        "--quality",
        choices=["preview", "full"],
        default="full",
        help="full: 128 px, 512 iterations; preview: 32 px, 32 iterations, a first look in "
        "about a hundredth of the time (the tab shows previews until the full render is "
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
    render.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    render.add_argument("--batch-size", type=int, default=32, help="units per optimization")
    render.add_argument("--cache-dir", help="cache root (default: in each run, else ~/.cache)")
    render.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory: load pickled architectures and architecture files as "
        "they are (this can run code from the log directory)",
    )
    render.set_defaults(func=cmd_render)

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on generated images, render it, serve the tab",
        description="Generates an image data set (stripes, checkerboards, colour blobs, discs), "
        "trains a small CNN with the Logger for about two minutes on the CPU, renders its first "
        "nodes ahead of time and starts TensorBoard with the Microscope tab.",
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
