"""The engine's numerics options, each measured for speed and for batch invariance, side by side.

    python benchmarks/numerics.py                                  # CPU: oneDNN x channels-last
    python benchmarks/numerics.py --device cuda --size 224 --iterations 128 --batches 1 4 16 64
    python benchmarks/numerics.py --threads 4 --batches 1 2 4 16   # CPU threads other than all

For each option (on the CPU: oneDNN's or PyTorch's own convolutions, NNPACK's for batches of 16
and more or not, channels-last input or not, bf16 autocast with oneDNN; on
CUDA: fp32, TF32, bf16 autocast, bf16 with channels-last) and each model (random weights, logged
with the Logger and rebuilt with open_run), renders the node's first units:
- speed: seconds for one batch of the largest size, and the units per second that gives;
- batch invariance: the first units rendered alone, then in batches of each size; the mean and
  largest difference of their pixels (uint8 levels) from the render alone;
- repeatability: the largest batch rendered twice; whether the pixels are identical.
The engine's choice per device (`default_numerics`) is the fastest option whose mean difference
stays within 1 level and whose repeats are identical.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
import torchvision

import tb_microscope
from tb_microscope.optvis.numerics import Numerics, default_numerics

MODELS = {  # each built for the size asked (a ViT takes only its own)
    "googlenet": (
        lambda size: torchvision.models.googlenet(aux_logits=False, init_weights=False),
        "inception4a",
    ),
    "resnet50": (lambda size: torchvision.models.resnet50(), "layer3.2"),
    "convnext": (lambda size: torchvision.models.convnext_tiny(), "features.5.4"),
    "vit": (
        lambda size: torchvision.models.vit_b_16(image_size=size),
        "encoder.layers.encoder_layer_6",
    ),
}


def options(device: torch.device) -> dict[str, Numerics]:
    if device.type == "cuda":
        return {
            "fp32": Numerics(),
            "tf32": Numerics(tf32=True),
            "bf16": Numerics(autocast=torch.bfloat16),
            "bf16 + channels-last": Numerics(autocast=torch.bfloat16, channels_last=True),
            "tf32 + channels-last": Numerics(tf32=True, channels_last=True),
        }
    return {
        "native": Numerics(),
        "native + NNPACK": Numerics(nnpack=True),
        "native + channels-last": Numerics(channels_last=True),
        "oneDNN": Numerics(onednn=True),
        "oneDNN + channels-last": Numerics(onednn=True, channels_last=True),
        "oneDNN + bf16": Numerics(onednn=True, autocast=torch.bfloat16),
        "oneDNN + bf16 + ch.-last": Numerics(
            onednn=True, autocast=torch.bfloat16, channels_last=True
        ),
    }


def measure(run, model, node, numerics, args, device) -> dict:
    kw = dict(size=args.size, iterations=args.iterations, device=device, model=model)
    kw.update(numerics=numerics)
    largest = max(args.batches)
    units = list(range(largest))
    check = units[: args.check]

    def images(chosen, batch):
        result = tb_microscope.render(run, 0, node, chosen, batch_size=batch, **kw)
        return result.images.astype(np.int16)

    tb_microscope.render(run, 0, node, units[:2], **{**kw, "iterations": 2})  # warm up
    start = time.perf_counter()
    full = images(units, largest)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    again = images(units, largest)
    alone = np.concatenate([images([u], 1) for u in check])
    differences = {}
    for batch in args.batches:
        if batch == 1:
            continue
        inside = full if batch == largest else images(units[:batch], batch)
        n = min(batch, len(check))  # a batch smaller than --check compares its own units
        d = np.abs(inside[:n] - alone[:n])
        differences[batch] = (d.mean(), d.max())
    return {
        "seconds": seconds,
        "units_per_s": largest / seconds,
        "differences": differences,
        "repeatable": bool(np.array_equal(full, again)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--check", type=int, default=4, help="units compared with renders alone")
    parser.add_argument("--options", nargs="+", help="only these options (by their label)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"{device}, {args.size} px, {args.iterations} iterations, {max(args.batches)} units; "
        f"difference from the render alone, uint8 levels (mean / max); torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    for name in args.models:
        build, node = MODELS[name]
        with tempfile.TemporaryDirectory() as logdir:
            torch.manual_seed(0)
            net = build(args.size)
            x = torch.rand(2, 3, args.size, args.size)
            with tb_microscope.Logger(logdir, net, x, nodes=[node], steps=[0]) as logger:
                logger.log(0)
            run = tb_microscope.open_run(logdir)
            model = run.load_model(0, device)
            chosen = default_numerics(device, model)
            print(f"\n{name} {node}")
            print(
                f"  {'option':36} {'s/batch':>8} {'units/s':>8}  "
                + "  ".join(f"{'batch ' + str(b):>13}" for b in args.batches if b != 1)
                + "  repeats"
            )
            for label, numerics in options(device).items():
                if args.options and label not in args.options:
                    continue
                r = measure(run, model, node, numerics, args, device)
                cells = "  ".join(f"{m:6.2f} / {x:3d}" for m, x in r["differences"].values())
                mark = " (default)" if numerics == chosen else ""
                print(
                    f"  {label + mark:36} {r['seconds']:8.2f} {r['units_per_s']:8.3f}  {cells}  "
                    f"{'identical' if r['repeatable'] else 'DIFFER'}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
