"""`tb-microscope info`: the runs, steps and nodes under a log directory."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MicroscopeError
from .common import steps_line

if TYPE_CHECKING:
    from ..run import Run


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def describe(run: Run, logdir, all_nodes: bool) -> str:
    from ..store.paths import is_mlflow_uri, is_remote_url, relative_run

    m = run.manifest
    arch = m.model.architecture
    if is_mlflow_uri(run.name):
        rel = run.name
    elif is_remote_url(run.name):
        rel = relative_run(run.name, logdir) if is_remote_url(str(logdir)) else run.name
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
    lines.append(f"  steps ({len(steps)}): {steps_line(steps)}")
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
    from ..store.paths import find_runs, is_mlflow_uri, is_remote_url, local_path

    if is_mlflow_uri(args.logdir):
        from ..run import open_run

        run = open_run(args.logdir, allow_pickle=args.allow_pickle)
        print(describe(run, run.path, args.all_nodes))
        return 0
    logdir = args.logdir if is_remote_url(args.logdir) else local_path(args.logdir)
    runs = find_runs(logdir)  # before torch is imported: nothing there is said at once
    if not runs:
        print(
            f"no tb_microscope runs under '{logdir}' (looked for "
            "*/plugins/tb_microscope/manifest.json); log one with tb_microscope.Logger",
            file=sys.stderr,
        )
        return 1
    from ..run import open_run

    for i, path in enumerate(runs):
        if i:
            print()
        try:
            print(describe(open_run(path, allow_pickle=args.allow_pickle), logdir, args.all_nodes))
        except MicroscopeError as e:
            print(f"{path}: {e}")
    return 0
