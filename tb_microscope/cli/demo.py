"""`tb-microscope demo`: a small CNN trained on generated images, rendered ahead of time and
served in TensorBoard."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .render import render_jobs

DEMO_SIZE = 48  # what the demo renders ahead and serves: quick on a CPU


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.train import train
    from ..run import Run

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
