"""Concepts: how long a dictionary takes to fit on a ResNet-18 node, and a filmstrip of them.

    python benchmarks/concepts_time.py                      # layer3, 16 concepts, 64 px, CPU
    python benchmarks/concepts_time.py --count 32 --methods nmf pca
    python benchmarks/concepts_time.py --device cuda

Logs a torchvision ResNet-18 (`weights=None`: random weights; no training, the weights
perturbed between snapshots by Gaussian noise of `--perturb` times each tensor's standard
deviation, cumulatively, so that the steps differ as a slowly moving model's do) with the Logger
at `--steps` steps, with `--probe` of the demo's generated images (stripes, checkerboards,
blobs, discs and squares) at `--size` px as probe images, then, in one process:
- samples the node's activations at the last step once (as every fit does; timed alone);
- fits each method's dictionary of `--count` concepts to them (timed alone) and prints its
  explained variance (R^2) beside PCA's at the same count;
- per method, a filmstrip: `concepts()` at every step (the probe images through the model, the
  fit, its cache, the match to the last step), cold;
- for the first method, the filmstrip's pictures at a small quality (`--picture-size` px,
  `--picture-iterations` iterations), rendered and cached.
Prints each time, the matched similarities, and the process's peak resident memory after each
phase (`resource.getrusage`, which never goes down). Needs the `[concepts]` and `[bench]`
extras.
"""

import argparse
import functools
import tempfile

import numpy as np
import torch
import torchvision
from timing import peak_mib
from timing import timed as timed_line

import tb_microscope
from tb_microscope.analysis.atlas import sampled_activations
from tb_microscope.analysis.concepts import fit_dictionary, overcomplete_sae, render_concepts
from tb_microscope.demo.data import CLASSES, make_images
from tb_microscope.execution.cache import RenderCache
from tb_microscope.optvis.tap import frozen

timed = functools.partial(timed_line, width=66, digits=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="layer3")
    parser.add_argument("--size", type=int, default=64, help="probe images' side, px")
    parser.add_argument("--probe", type=int, default=256, help="probe images")
    parser.add_argument("--count", type=int, default=16, help="concepts")
    parser.add_argument("--steps", type=int, default=8, help="steps logged")
    parser.add_argument("--perturb", type=float, default=0.05, help="noise per step, in stds")
    parser.add_argument("--methods", nargs="+", default=["nmf", "sae", "pca"])
    parser.add_argument("--picture-size", type=int, default=32)
    parser.add_argument("--picture-iterations", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    probe, _ = make_images(args.probe, args.size, seed=1)
    steps = list(range(args.steps))
    with tempfile.TemporaryDirectory() as logdir:
        with tb_microscope.Logger(logdir, model, probe[:4], steps=steps, probe=probe) as logger:
            for step in steps:
                logger.log(step)
                with torch.no_grad():
                    for p in model.parameters():
                        if p.numel() > 1:
                            p.add_(args.perturb * p.std() * torch.randn_like(p))
        run = tb_microscope.open_run(logdir)
        cache = RenderCache(run, f"{logdir}/cache")
        device = torch.device(args.device)
        last = steps[-1]
        node = run.node(args.node)
        print(
            f"ResNet-18 (random weights, perturbed) {args.node} ({node.units} units), "
            f"{args.probe} probe images at {args.size} px, {args.count} concepts, "
            f"{args.steps} steps, {args.device}, {torch.get_num_threads()} threads; peak RSS "
            f"after logging {peak_mib():.0f} MiB"
        )
        if "sae" in args.methods:
            timed("importing Overcomplete (once per process)", overcomplete_sae)
        net = frozen(run.load_model(last, device))
        activations, sources = timed(
            "sampling the activations at the last step",
            lambda: sampled_activations(run, net, node, run.probe_images(), 0, device),
        )
        negative = float(np.square(np.minimum(activations, 0)).sum() / np.square(activations).sum())
        print(
            f"  {len(activations)} activations x {activations.shape[1]} units "
            f"({len(np.unique(sources[:, 0]))} images); negative share of energy {negative:.1%}"
        )
        explained = {}
        for method in dict.fromkeys([*args.methods, "pca"]):
            fit = timed(
                f"fit {method}, {args.count} concepts",
                lambda method=method: fit_dictionary(activations, args.count, method, 0),
            )
            explained[method] = fit.explained
        for method in args.methods:
            print(
                f"  R^2 {method}: {explained[method]:.3f}  (PCA at the same count: "
                f"{explained['pca']:.3f})"
            )

        def filmstrip(method: str, order) -> list:
            """The concepts at each step in `order`, fitted (or read from the cache) and matched."""
            return [
                tb_microscope.concepts(
                    run,
                    s,
                    args.node,
                    count=args.count,
                    method=method,
                    device=device,
                    cache_dir=cache,
                )  # fmt: skip
                for s in order
            ]

        for method in args.methods:
            found = timed(
                f"filmstrip, {method}: concepts() at {args.steps} steps (fit + match)",
                lambda method=method: filmstrip(method, reversed(steps)),
            )
            means = " ".join(f"{np.nanmean(c.similarity):.2f}" for c in reversed(found))
            print(f"  mean similarity to step {last}, per step: {means}")
            silent = sum(int(np.isnan(c.similarity).sum()) for c in found)
            if silent:
                print(f"  concepts whose codes did not vary (no similarity), all steps: {silent}")
            timed(
                f"filmstrip, {method}: the same again (cached)",
                lambda method=method: filmstrip(method, steps),
            )
        first = args.methods[0]
        film = [
            tb_microscope.concepts(
                run, s, args.node, count=args.count, method=first, cache_dir=cache
            )
            for s in steps
        ]
        timed(
            f"filmstrip, {first}: pictures at {args.picture_size} px, "
            f"{args.picture_iterations} iterations",
            lambda: [
                render_concepts(
                    run,
                    c,
                    size=args.picture_size,
                    iterations=args.picture_iterations,
                    device=device,
                    cache_dir=cache,
                )  # fmt: skip
                for c in film
            ],
        )


if __name__ == "__main__":
    main()
