"""`tb-microscope atlas`: an activation atlas of a node at a step, as a PNG."""

from __future__ import annotations

import argparse

from ..limits import check_grid, check_iterations, check_size
from .common import (
    check_given,
    device_of,
    fraction_line,
    open_one_run,
    png_output,
    write_png,
)


def cmd_atlas(args: argparse.Namespace) -> int:
    check_given(
        (args.size, check_size, "--size"),
        (args.iterations, check_iterations, "--iterations"),
        (args.grid, check_grid, "--grid"),
    )
    png_output(args.output, "atlas.png")
    run = open_one_run(args.run, args.allow_pickle)
    from ..analysis.atlas import activation_atlas

    device = device_of(args.device)

    with fraction_line(f"atlas of {args.node} at step {args.step}") as progress:
        found = activation_atlas(
            run,
            args.step,
            args.node,
            grid=args.grid,
            size=args.size,
            iterations=args.iterations,
            seed=args.seed,
            device=device,
            layout_step=args.layout_step,
            preview=args.preview,
            layout_method=args.layout,
            cache_dir=args.cache_dir,
            progress=progress,
        )
    write_png(args.output, found.image)
    side = found.image.shape[0]
    print(
        f"{found.node} at step {found.step}: {len(found.cells)} of {found.grid}x{found.grid} "
        f"cells drawn from {len(found.coords)} activations, laid out by {found.layout_method} "
        f"at step {found.layout_step}; wrote {args.output} ({side}x{side} px)"
    )
    return 0
