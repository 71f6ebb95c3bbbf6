"""`tb-microscope concepts`: a node's concepts at a step, their pictures as a PNG grid."""

from __future__ import annotations

import argparse
import math

from ..limits import check_concepts, check_iterations, check_size
from .common import (
    check_given,
    device_of,
    fraction_line,
    open_one_run,
    png_output,
    write_png,
)

BLANK = 255  # the grey level of the grid's unused tiles (white)


def grid_of(pictures, columns: int):
    """The pictures (K x size x size x 3) in rows of `columns`, unused tiles white."""
    import numpy as np

    count, size = len(pictures), pictures.shape[1]
    rows = max(1, math.ceil(count / columns))
    out = np.full((rows * size, columns * size, 3), BLANK, np.uint8)
    for k, picture in enumerate(pictures):
        top, left = (k // columns) * size, (k % columns) * size
        out[top : top + size, left : left + size] = picture
    return out


def cmd_concepts(args: argparse.Namespace) -> int:
    check_concepts(args.count, "--count")
    check_given(
        (args.size, check_size, "--size"), (args.iterations, check_iterations, "--iterations")
    )
    png_output(args.output, "concepts.png")
    run = open_one_run(args.run, args.allow_pickle)
    from ..analysis.concepts import concepts, render_concepts

    device = device_of(args.device)

    where = f"of {args.node} at step {args.step}"
    with fraction_line(f"concepts {where}") as progress:
        found = concepts(
            run,
            args.step,
            args.node,
            count=args.count,
            method=args.method,
            seed=args.seed,
            device=device,
            reference_step=args.reference_step,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    with fraction_line(f"pictures {where}") as progress:
        pictures = render_concepts(
            run,
            found,
            size=args.size,
            iterations=args.iterations,
            preview=args.preview,
            device=device,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    columns = math.ceil(math.sqrt(found.count))
    write_png(args.output, grid_of(pictures, columns))
    rows, size = math.ceil(found.count / columns), pictures.shape[1]
    print(
        f"{found.count} concepts of {found.node} at step {found.step} by {found.method} explain "
        f"{found.explained:.1%} of the variance of {len(found.sources)} sampled activations; "
        f"matched to step {found.reference_step}; wrote {args.output} ({columns}x{rows} "
        f"pictures of {size} px, concept 0 at the top left)"
    )
    for k, (similarity, top) in enumerate(zip(found.similarity, found.top)):
        images = " ".join(map(str, top.tolist()))
        print(f"  concept {k:>3}: similarity {similarity:6.3f}; strongest on probe images {images}")
    return 0
