"""`tb-microscope dynamics`: how nodes and units changed over training."""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import TYPE_CHECKING

from .common import number, open_one_run, output_format, parse_indexes, steps_line, write_output

if TYPE_CHECKING:
    from ..run import Run


def cmd_dynamics(args: argparse.Namespace) -> int:
    run = open_one_run(args.run, args.allow_pickle)
    from ..analysis.dynamics import model_dynamics, node_dynamics

    steps = None
    if args.steps != "all" and run.steps:
        steps = [
            s for s in run.steps if s in set(parse_indexes(args.steps, run.steps[-1] + 1, "steps"))
        ]
    options = dict(steps=steps, device=args.device, cache_dir=args.cache_dir)
    found = (
        node_dynamics(run, args.node, **options) if args.node else model_dynamics(run, **options)
    )
    form = output_format(args)
    if form == "json":
        write_output(json.dumps(found.to_dict(), indent=1) + "\n", args.output)
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
            text = value if isinstance(value, int) else number(value)
            writer.writerow([measure, node, unit, step, text])
        write_output(buffer.getvalue(), args.output)
        return 0
    write_output(_dynamics_table(run, found, bool(args.node)), args.output)
    return 0


def _dynamics_table(run: Run, found, one_node: bool) -> str:
    steps = found.steps
    lines = [f"run {run.name}: {len(steps)} steps ({steps_line(steps)})"]
    if not one_node:
        width = max(len(n) for n in found.nodes)
        lines.append("linear CKA to the last step, per node (1 = its final form):")
        lines.append(f"  {'node':<{width}}  " + "  ".join(f"{s:>7}" for s in steps))
        for name, row in zip(found.nodes, found.cka_to_final):
            lines.append(f"  {name:<{width}}  " + "  ".join(f"{number(v):>7}" for v in row))
        return "\n".join(lines) + "\n"
    lines.append(f"node {found.node}:")
    lines.append(f"  {'step':>8}  {'CKA to final':>12}  {'CKA to previous':>15}  units formed")
    formed = [s for s in found.formed_step if s is not None]
    for i, step in enumerate(steps):
        count = sum(1 for s in formed if s <= step)
        lines.append(
            f"  {step:>8}  {number(found.cka_to_final[i]):>12}  "
            f"{number(found.cka_to_previous[i]):>15}  {count:>5} / {len(found.formed_step)}"
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
