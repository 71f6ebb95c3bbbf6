"""Activation atlases: how long one takes on a ResNet-18 node, and a filmstrip of them.

    python benchmarks/atlas_time.py                         # layer3, grid 20, 64 px, CPU
    python benchmarks/atlas_time.py --filmstrip 8 --device cuda
    python benchmarks/atlas_time.py --full-size 32 --full-iterations 64   # a quicker full atlas

Logs a torchvision ResNet-18 (from random weights, trained `--train` SGD steps between
snapshots on the demo's generated images: stripes, checkerboards, blobs, discs and squares)
with the Logger at `--filmstrip` steps, with `--probe` of those images as probe images, then
times, in one process (as a TensorBoard server would run them):
- the first preview at the last step (cold: sampling, the UMAP layout, numba's compilation of
  UMAP the first time in a process, the cells at 32 px / 24 iterations);
- the full atlas at the same step (the layout read back from the cache);
- the same call again (read back whole);
- the filmstrip: previews at every step, then full atlases at every step (the layout fitted at
  the last step, kept).
Prints each time, the cells drawn, and the process's peak resident memory after each phase
(`resource.getrusage`, which never goes down). Needs the `[atlas]` and `[bench]` extras.
"""

import argparse
import tempfile

import torch
import torchvision
from timing import peak_mib, timed

import tb_microscope
from tb_microscope.demo.data import CLASSES, make_images
from tb_microscope.execution.cache import RenderCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="layer3")
    parser.add_argument("--size", type=int, default=64, help="probe images' side, px")
    parser.add_argument("--probe", type=int, default=256, help="probe images")
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--filmstrip", type=int, default=8, help="steps logged")
    parser.add_argument("--train", type=int, default=25, help="SGD steps between snapshots")
    parser.add_argument("--full-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--full-iterations", type=int, default=None)
    parser.add_argument("--no-full-filmstrip", action="store_true", help="previews only")
    parser.add_argument("--layout", default="auto", choices=["auto", "umap", "pca"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe, _ = make_images(args.probe, args.size, seed=1)
    steps = [i * args.train for i in range(args.filmstrip)]
    with tempfile.TemporaryDirectory() as logdir:
        with tb_microscope.Logger(logdir, model, probe[:4], steps=steps, probe=probe) as logger:
            for step in range(steps[-1] + 1):
                logger.log(step)
                x, y = make_images(32, args.size, seed=100 + step)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        run = tb_microscope.open_run(logdir)
        cache = RenderCache(run, f"{logdir}/cache")
        last = steps[-1]
        full = {"size": args.full_size, "iterations": args.full_iterations}
        options = dict(
            grid=args.grid, device=args.device, layout_method=args.layout, cache_dir=cache
        )
        print(
            f"ResNet-18 {args.node}, {args.probe} probe images at {args.size} px, grid "
            f"{args.grid}, {args.filmstrip} steps, {args.device}, {torch.get_num_threads()} "
            f"threads; peak RSS after logging {peak_mib():.0f} MiB"
        )
        preview = timed(
            "first preview, last step (cold: sampling, layout, cells)",
            lambda: tb_microscope.activation_atlas(run, last, args.node, preview=True, **options),
        )
        print(
            f"  {len(preview.coords)} activations laid out by {preview.layout_method}; "
            f"{len(preview.cells)} of {args.grid * args.grid} cells drawn at {preview.size} px, "
            f"{preview.iterations} iterations"
        )
        atlas = timed(
            "full atlas, last step (layout cached)",
            lambda: tb_microscope.activation_atlas(run, last, args.node, **full, **options),
        )
        print(f"  {len(atlas.cells)} cells at {atlas.size} px, {atlas.iterations} iterations")
        timed(
            "full atlas again (cached)",
            lambda: tb_microscope.activation_atlas(run, last, args.node, **full, **options),
        )
        earlier = steps[:-1]
        timed(
            f"filmstrip: previews of the other {len(earlier)} steps",
            lambda: [
                tb_microscope.activation_atlas(run, s, args.node, preview=True, **options)
                for s in earlier
            ],
        )
        if not args.no_full_filmstrip:
            timed(
                f"filmstrip: full atlases of the other {len(earlier)} steps",
                lambda: [
                    tb_microscope.activation_atlas(run, s, args.node, **full, **options)
                    for s in earlier
                ],
            )


if __name__ == "__main__":
    main()
