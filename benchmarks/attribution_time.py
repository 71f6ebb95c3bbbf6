"""Attribution and caricature: how long one takes on a ResNet-18 node.

    python benchmarks/attribution_time.py                      # layer3, 64 px, CPU
    python benchmarks/attribution_time.py --node layer2 --size 128 --device cuda

Logs a torchvision ResNet-18 (random weights) with the Logger and 16 probe images, loads it back
at the logged step, then times `tb_microscope.attribution` of one unit on one probe image with
each method (the model passed in, as the tab's worker does; the median of --repeat), one
`caricature` render of a probe image (size and iterations as given) and, for reference, a
`channel` render of one unit at the same settings. Needs the `[attribution]`
and `[bench]` extras (Captum, torchvision).
"""

import argparse
import statistics
import tempfile
import time

import torch
import torchvision

import tb_microscope
from tb_microscope.analysis.attribution import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="layer3")
    parser.add_argument("--size", type=int, default=64, help="probe images' side, px")
    parser.add_argument("--unit", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--caricature-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    probe = torch.rand(16, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as logdir:
        with tb_microscope.Logger(logdir, model, probe[:2], steps=[0], probe=probe) as logger:
            logger.log(0)
        run = tb_microscope.open_run(logdir)
        start = time.perf_counter()
        loaded = run.load_model(0, args.device)
        print(
            f"ResNet-18 (random weights), {args.node}, unit {args.unit}, {args.size} px probe "
            f"images, {args.device}, {torch.get_num_threads()} threads; model loaded in "
            f"{time.perf_counter() - start:.2f} s"
        )
        for method in METHODS:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                tb_microscope.attribution(
                    run, 0, args.node, args.unit, 1, method=method, device=args.device, model=loaded
                )
                times.append(time.perf_counter() - start)
            print(
                f"attribution, {method:<22} {statistics.median(times):7.2f} s "
                f"(median of {args.repeat}: {', '.join(f'{t:.2f}' for t in times)})"
            )
        start = time.perf_counter()
        result = tb_microscope.render(
            run,
            0,
            args.node,
            [],
            "caricature",
            image=1,
            size=args.caricature_size,
            iterations=args.iterations,
            device=args.device,
            model=loaded,
        )
        print(
            f"caricature, {args.caricature_size} px, {args.iterations} iterations "
            f"{time.perf_counter() - start:9.2f} s (cosine with its probe image's activations "
            f"{result.activation[0]:.3f})"
        )
        start = time.perf_counter()
        tb_microscope.render(
            run,
            0,
            args.node,
            [args.unit],
            "channel",
            size=args.caricature_size,
            iterations=args.iterations,
            device=args.device,
            model=loaded,
        )
        print(
            f"channel (for reference), one unit, the same settings "
            f"{time.perf_counter() - start:9.2f} s"
        )


if __name__ == "__main__":
    main()
