"""Render throughput: our engine versus lucent's `render_vis` one unit at a time, side by side.

    python benchmarks/render_throughput.py          # GoogLeNet inception4a, ResNet-50 layer3
    python benchmarks/render_throughput.py --device cuda --size 224 --iterations 512 --units 64

Both render the same units of the same node of the same model (torchvision GoogLeNet and
ResNet-50 by default, random weights, logged with the Logger and rebuilt with open_run), at the
same image size, iterations, learning rate (the engine's for that many iterations) and lucid
transforms; lucent gets `fixed_image_size` equal to our padded canvas so both feed the model
the same resolution. Prints units per second
for each and their ratio, the ratio of the mean target activation reached (each measured the
same way, on the final images), the engine's efficiency (a bare forward + backward to the node
at the engine's batch and canvas, over one engine iteration; the two timed in turns, the fastest
of each counting), and the FLOP rate each achieves
next to this machine's matrix-product rate in the precision the engine's numerics compute in
(torch.matmul of two 2048 x 2048 matrices on all threads), about the most convolutions computed
as matrix products reach here.

On the CPU the engine keeps the C heap's freed memory for the next iteration while it renders
(`tb_microscope.optvis.heap`), which the process keeps from the first render on: the bare
passes and lucent, run in the same process, get it too; with TB_MICROSCOPE_KEEP_HEAP=0 all
three run with glibc's defaults. The page faults an iteration of each are printed.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
import torchvision
from lucent.optvis import objectives, param, render, transform
from torch.utils.flop_counter import FlopCounterMode

import tb_microscope
from tb_microscope.optvis.engine import default_device, learning_rate
from tb_microscope.optvis.heap import kept_heap, page_faults
from tb_microscope.optvis.numerics import usable_numerics
from tb_microscope.optvis.param import PAD, InputSpace
from tb_microscope.optvis.tap import NodeTap


def mean_activation(run, model, node, units, images: np.ndarray, device) -> np.ndarray:
    """The target unit's mean activation on each final image (uint8 or float, N x H x W x 3)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    x = (x / 255 if images.dtype == np.uint8 else x).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        act = NodeTap(model, run.node(node))(InputSpace(run.input_spec, device)(x)).maps.float()
    return act[torch.arange(len(units)), torch.tensor(units)].flatten(1).mean(1).cpu().numpy()


def lucent_one_at_a_time(run, model, node, units, size, iterations, device):
    space = InputSpace(run.input_spec, device)
    layer = node.replace(".", "_")
    images = []
    np.random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    for unit in units:
        out = render.render_vis(
            model,
            objectives.channel(layer, unit),
            param_f=lambda: param.image(size),
            optimizer=lambda params: torch.optim.Adam(params, lr=learning_rate(iterations)),
            transforms=transform.standard_transforms + [space],
            thresholds=(iterations,),
            preprocess=False,
            show_image=False,
            progress=False,
            fixed_image_size=size + 2 * PAD,
        )
        images.append(out[-1][0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, np.stack(images)


def matmul_rate(device, dtype=torch.float32, repeats: int = 5) -> float:
    """FLOP/s of the device's matrix product in `dtype` (2048 x 2048, all threads), the fastest
    of `repeats`: the ceiling for convolutions computed as matrix products."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def flops_per_iteration(run, model, node, batch, size, device) -> int:
    x = torch.rand(batch, 3, size + 2 * PAD, size + 2 * PAD, device=device, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        act = NodeTap(model, run.node(node))(InputSpace(run.input_spec, device)(x)).maps
        act[:, 0].mean().backward()
    return counter.get_total_flops()


MODELS = {
    "googlenet": (
        lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
        "inception4a",
    ),
    "resnet50": (torchvision.models.resnet50, "layer3"),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), "layer2.1.conv2"),
}


class RawIteration:
    """A bare forward + backward to the node at the engine's batch and canvas, under the same
    numerics: what an engine iteration cannot be faster than. `block()` times it as the engine
    runs, `iterations` in a row, and returns seconds per iteration."""

    def __init__(self, run, model, node, batch, size, device, numerics, iterations):
        side = size + 2 * PAD
        self.x = torch.rand(batch, 3, side, side, device=device, requires_grad=True)
        self.tap, self.space = NodeTap(model, run.node(node)), InputSpace(run.input_spec, device)
        self.device, self.numerics, self.iterations = device, numerics, iterations
        with numerics.applied(device):
            self.step()  # warm-up

    def step(self) -> None:
        self.x.grad = None
        shown = self.space(self.x)
        if self.numerics.channels_last:
            shown = shown.contiguous(memory_format=torch.channels_last)
        self.tap(shown).maps.float()[:, 0].mean().backward()

    def block(self) -> float:
        with self.numerics.applied(self.device):
            start = time.perf_counter()
            for _ in range(self.iterations):
                self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / self.iterations


def describe(numerics) -> str:
    dtype = str(numerics.autocast).removeprefix("torch.")
    parts = [
        f"{dtype} autocast" if numerics.autocast else "fp32",
        "oneDNN" if numerics.onednn else "",
        "channels-last" if numerics.channels_last else "",
    ]
    return ", ".join(p for p in parts if p)


def compare(name, args, device) -> None:
    build, node = MODELS[name]
    node = args.node or node
    with tempfile.TemporaryDirectory() as logdir:
        torch.manual_seed(0)
        net = build()
        x = torch.rand(2, 3, args.size + 2 * PAD, args.size + 2 * PAD)
        with tb_microscope.Logger(logdir, net, x, nodes=[node], steps=[0]) as logger:
            logger.log(0)
        run = tb_microscope.open_run(logdir)
        model = run.load_model(0, device)
        for p in model.parameters():
            p.requires_grad_(False)
        units = list(range(args.units))
        batch = min(len(units), args.batch_size or (32 if device.type == "cuda" else 16))
        options = dict(
            size=args.size,
            iterations=args.iterations,
            device=device,
            batch_size=batch,
            model=model,
        )
        tb_microscope.render(run, 0, node, units[:2], **{**options, "iterations": 2})
        numerics = usable_numerics(model, run, run.node(node), args.size, device)
        raw = RawIteration(run, model, node, batch, args.size, device, numerics, args.iterations)
        # the engine and the bare passes alternate, so that both see the machine alike
        times, raw_times, faults, raw_faults = [], [], [], []
        for _ in range(args.repeats):
            before = page_faults()
            start = time.perf_counter()
            ours = tb_microscope.render(run, 0, node, units, **options)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            faults.append(page_faults() - before)
            before = page_faults()
            with kept_heap():  # as the engine's render has it
                raw_times.append(raw.block())
            raw_faults.append(page_faults() - before)
        ours_s, raw_s = min(times), min(raw_times)
        lucent_s, lucent_images = lucent_one_at_a_time(
            run, model, node, units, args.size, args.iterations, device
        )
        ours_act = mean_activation(run, model, node, units, ours.images, device)
        lucent_act = mean_activation(run, model, node, units, lucent_images, device)
        flops = flops_per_iteration(run, model, node, batch, args.size, device)
        lucent_flops = flops_per_iteration(run, model, node, 1, args.size, device)
        peak = matmul_rate(device, numerics.autocast or torch.float32)

    engine_iterations = args.iterations * -(-len(units) // batch)
    iteration_s = ours_s / engine_iterations
    dtype = str(numerics.autocast).removeprefix("torch.") if numerics.autocast else "fp32"
    total_flops = flops * args.iterations * len(units) / batch
    print(
        f"\n{name} {node}, {len(units)} units, {args.size}px (canvas {args.size + 2 * PAD}px), "
        f"{args.iterations} iterations, {device}; the engine's numerics: {describe(numerics)}"
    )
    print(f"ours:   {len(units) / ours_s:8.3f} units/s  ({ours_s:.1f} s)")
    print(f"lucent: {len(units) / lucent_s:8.3f} units/s  ({lucent_s:.1f} s, one unit at a time)")
    print(f"speed-up: {lucent_s / ours_s:.2f}x")
    print(
        f"efficiency: {raw_s / iteration_s:.2f} (a bare forward + backward to the node, batch "
        f"{batch}: {raw_s * 1000:.0f} ms; an engine iteration: {iteration_s * 1000:.0f} ms)"
    )
    print(
        f"page faults an iteration: engine {min(faults) / engine_iterations:.0f}, bare passes "
        f"{min(raw_faults) / args.iterations:.0f}"
    )
    print(
        f"mean target activation: ours {ours_act.mean():.4f}, lucent {lucent_act.mean():.4f}, "
        f"ratio {ours_act.mean() / lucent_act.mean():.3f}"
    )
    ours_rate = total_flops / ours_s
    lucent_rate = lucent_flops * args.iterations * len(units) / lucent_s
    print(
        f"FLOP rate: ours {ours_rate / 1e9:.1f} GFLOP/s, lucent {lucent_rate / 1e9:.1f} GFLOP/s "
        f"(forward + backward up to the node: {flops / 1e9:.2f} GFLOP per iteration of a batch "
        f"of {batch}); this machine's {dtype} matrix product: {peak / 1e9:.1f} GFLOP/s, so ours "
        f"runs at {ours_rate / peak:.0%} of it; the same FLOPs at that rate would be "
        f"{peak / lucent_rate:.1f}x lucent"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["googlenet", "resnet50"], choices=MODELS)
    parser.add_argument("--node", default=None, help="default: each model's own")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs of our engine and of the bare passes, in turns (the fastest counts)",
    )
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    for name in args.models:
        compare(name, args, device)


if __name__ == "__main__":
    main()
