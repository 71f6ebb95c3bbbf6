"""What several commands share: index lists, opening one run, numbers and tables written to
stdout or a file."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MicroscopeError

if TYPE_CHECKING:
    from ..run import Run


def steps_line(steps: list[int]) -> str:
    if len(steps) <= 24:
        return " ".join(map(str, steps)) or "none yet"
    return f"{' '.join(map(str, steps[:16]))} … {' '.join(map(str, steps[-6:]))}"


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


def open_one_run(text: str, allow_pickle: bool) -> Run:
    """A run directory or URL, a log directory or URL holding exactly one run, or
    runs:/<MLflow run id>."""
    from ..store.paths import find_runs, is_mlflow_uri, is_remote_url, local_path, relative_run

    if is_mlflow_uri(text):
        from ..run import open_run

        return open_run(text, allow_pickle=allow_pickle)
    path = text if is_remote_url(text) else local_path(text)
    runs = find_runs(path)
    if not runs:
        raise MicroscopeError(
            f"no tb_microscope run at '{path}' (looked for plugins/tb_microscope/manifest.json)"
        )
    if len(runs) > 1:
        names = ", ".join(relative_run(r, path) for r in runs[:6])
        raise MicroscopeError(
            f"'{path}' holds {len(runs)} runs ({names}{', …' if len(runs) > 6 else ''}); "
            "name one run directory"
        )
    from ..run import open_run

    return open_run(runs[0], allow_pickle=allow_pickle)


def number(value) -> str:
    return "" if value is None or value != value else f"{value:.4f}"


def write_output(text: str, output: str | None) -> None:
    from ..store.local import write_bytes_atomic

    if output:
        write_bytes_atomic(Path(output), text.encode())
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower() if args.output else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def png_output(output: str, example: str) -> None:
    """Refuse an `--output` that is not a PNG file, before any work (`example`: a good name)."""
    if Path(output).suffix.lower() != ".png":
        raise MicroscopeError(f"--output is a PNG file ({example}); got {output!r}")


def check_given(*checks) -> None:
    """Each (value, check, flag) whose value was given (not None) checked, before any work: a
    value out of bounds is an error naming its flag."""
    for value, check, flag in checks:
        if value is not None:
            check(value, flag)


@contextlib.contextmanager
def fraction_line(what: str):
    """A report of the fraction done (`what: 42%`, rewritten in place on stderr) for the block,
    whose line is ended when the block ends, however it ends: an error is then said on a line
    of its own."""
    written = []

    def report(fraction: float) -> None:
        sys.stderr.write(f"\r{what}: {fraction:4.0%}")
        sys.stderr.flush()
        written.append(True)

    try:
        yield report
    finally:
        if written:
            sys.stderr.write("\n")


def write_png(output: str, image) -> None:
    """`image` (uint8 H x W x 3, or x 4) written to `output` as a PNG, whole or not at all."""
    from ..execution.cache import encode_picture
    from ..store.local import write_bytes_atomic

    write_bytes_atomic(Path(output), encode_picture(image))


def device_of(text: str | None):
    """The torch device `--device` names (None: the default), or an error naming the flag."""
    import torch

    try:
        return torch.device(text) if text else None
    except RuntimeError as e:
        raise MicroscopeError(f"--device {text!r}: {e}") from None
