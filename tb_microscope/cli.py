"""`tb-microscope`: the command line. `info LOGDIR` lists runs, steps and nodes."""

from __future__ import annotations

import argparse
import sys
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
    arch = m["model"]["architecture"]
    rel = run.path.relative_to(logdir) if run.path != logdir else Path(".")
    spec = run.input_spec
    lines = [
        f"{rel}  {m['model']['class']}  {m['model']['parameters']:,} parameters  "
        f"architecture: {arch['kind']}",
        f"  input: {_shape(spec['shape'])} {spec['dtype']}, values in {spec['value_range']}"
        + (
            f", normalized mean={spec['normalize']['mean']} std={spec['normalize']['std']}"
            if spec["normalize"]
            else ""
        ),
    ]
    if arch.get("note"):
        lines.append(f"  note: {arch['note']}")
    steps = run.steps
    lines.append(f"  steps ({len(steps)}): {_steps_line(steps)}")
    if m.get("probe"):
        lines.append(f"  probe: {m['probe']['count']} images of {_shape(m['probe']['shape'])}")
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
            print(describe(Run(path), logdir, args.all_nodes))
        except MicroscopeError as e:
            print(f"{path}: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb-microscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list the runs, steps and nodes under a log directory")
    info.add_argument("logdir", help="a TensorBoard log directory, or one run directory")
    info.add_argument("--all-nodes", action="store_true", help="list every node")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MicroscopeError as e:
        print(f"tb-microscope: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
