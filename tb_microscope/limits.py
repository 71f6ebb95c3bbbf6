"""The bounds of a render's settings, checked in one place by every road in (the Python API,
the CLI and the plugin's routes), without importing torch: the CLI refuses a typo at once."""

from __future__ import annotations

from .errors import MicroscopeError

SIZE = (8, 1024)  # pixels per side of a rendered picture
ITERATIONS = (1, 100_000)  # optimization steps of one render
GRID = (2, 50)  # an activation atlas's cells per side
CONCEPTS = (1, 256)  # concepts of one dictionary (each is rendered as a picture)


class SettingError(MicroscopeError, ValueError):
    """A setting a caller gave that is not one it may be: a render setting outside its bounds,
    a technique or method name that is not known, bands the image does not have."""


def _check(value, bounds: tuple[int, int], what: str, unit: str) -> int:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SettingError(
            f"{what} must be a whole number{unit} from {low} to {high}, got {value!r}"
        )
    return value


def check_size(size, what: str = "size") -> int:
    """`size` if it is a whole number of pixels within `SIZE`; else a `SettingError` naming
    `what` (the argument, flag or query parameter the user wrote)."""
    return _check(size, SIZE, what, " of pixels")


def check_iterations(iterations, what: str = "iterations") -> int:
    """`iterations` if it is a whole number within `ITERATIONS`; else a `SettingError`."""
    return _check(iterations, ITERATIONS, what, "")


def check_grid(grid, what: str = "grid") -> int:
    """`grid` if it is a whole number of atlas cells per side within `GRID`; else a
    `SettingError`."""
    return _check(grid, GRID, what, " of cells per side")


def check_concepts(count, what: str = "count") -> int:
    """`count` if it is a whole number of concepts within `CONCEPTS`; else a `SettingError`."""
    return _check(count, CONCEPTS, what, " of concepts")
