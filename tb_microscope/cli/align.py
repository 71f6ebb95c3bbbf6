"""`tb-microscope align`: a node's units matched one to one across two runs or steps."""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MicroscopeError
from .common import number, open_one_run, output_format, write_output

if TYPE_CHECKING:
    from ..run import Run


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
    from ..analysis.dynamics import align_units

    found = align_units(run_a, step_a, run_b, step_b, args.node, device=args.device)
    form = output_format(args)
    if form == "json":
        write_output(json.dumps(found.to_dict(), indent=1) + "\n", args.output)
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
                [u, "" if b < 0 else b, number(found.correlation[u]), number(found.same_unit[u])]
            )
        write_output(buffer.getvalue(), args.output)
        return 0
    matched = found.correlation[~np.isnan(found.correlation)]
    mean = number(matched.mean() if len(matched) else None)
    lines = [
        f"{found.node}: {run_a.name}@{step_a} -> {run_b.name}@{step_b}, "
        f"{len(found.unit_b)} units; matched pairs' correlation: mean {mean}, "
        f"{int((matched >= 0.9).sum())} at 0.9 or more",
        f"  {'unit A':>6}  {'unit B':>6}  {'correlation':>11}  {'same unit':>9}",
    ]
    for u in order:
        b = int(found.unit_b[u])
        lines.append(
            f"  {u:>6}  {'-' if b < 0 else b:>6}  {number(found.correlation[u]):>11}  "
            f"{number(found.same_unit[u]):>9}"
        )
    write_output("\n".join(lines) + "\n", args.output)
    return 0
