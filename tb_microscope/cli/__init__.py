"""`tb-microscope`: the command line, one module per command (`info`, `render`, `dynamics`,
`align`, `atlas`, `demo`); `parser` builds the parser and dispatches. Commands import what they
use (torch among it) when they run, so that `--help` and a mistyped command answer at once."""

from .parser import main

__all__ = ["main"]
