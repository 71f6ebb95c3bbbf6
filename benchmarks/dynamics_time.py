"""Dynamics: how long node_dynamics, model_dynamics and align_units take on a ResNet-18-sized run.

    python benchmarks/dynamics_time.py                    # ResNet-18, 224 px, 10 snapshots
    python benchmarks/dynamics_time.py --size 64 --probe 256 --device cuda

Logs a torchvision ResNet-18 (random weights, trained a little on random data between
snapshots so that they differ) with the Logger and `probe` images, then times: every node's
dynamics from a cold cache (one forward pass of the probe images per snapshot), the same again
(from the cache), one node's dynamics, an eleventh snapshot (only its signatures are computed),
and matching one node's units between two snapshots.
"""

import argparse
import tempfile
import time

import torch
import torchvision

import tb_microscope


def timed(label: str, work):
    start = time.perf_counter()
    result = work()
    print(f"{label:<58} {time.perf_counter() - start:7.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--probe", type=int, default=128, help="probe images")
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--node", default="layer3.1.conv2")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = torch.rand(args.probe, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as logdir:
        steps = list(range(args.snapshots + 1))
        with tb_microscope.Logger(logdir, model, probe[:4], steps=steps, probe=probe) as logger:
            for step in steps:
                logger.log(step)
                x = torch.rand(8, 3, args.size, args.size)
                loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        run = tb_microscope.open_run(logdir)
        first = steps[: args.snapshots]
        print(
            f"ResNet-18, {len(run.nodes)} nodes, {args.probe} probe images at {args.size} px, "
            f"{args.snapshots} snapshots, {args.device}, {torch.get_num_threads()} threads"
        )
        options = dict(device=args.device, cache_dir=f"{logdir}/cache")
        timed(
            f"every node's dynamics, {args.snapshots} snapshots, cold",
            lambda: tb_microscope.model_dynamics(run, steps=first, **options),
        )
        timed(
            "the same again (signatures from the cache)",
            lambda: tb_microscope.model_dynamics(run, steps=first, **options),
        )
        found = timed(
            f"{args.node}'s dynamics (units x steps), cached",
            lambda: tb_microscope.node_dynamics(run, args.node, steps=first, **options),
        )
        timed(
            "every node's dynamics with one more snapshot",
            lambda: tb_microscope.model_dynamics(run, **options),
        )
        timed(
            f"align_units on {args.node}, step 0 vs {first[-1]}",
            lambda: tb_microscope.align_units(
                run, 0, run, first[-1], args.node, device=args.device
            ),
        )
        formed = sum(s is not None for s in found.formed_step)
        print(f"({args.node}: {formed} of {len(found.formed_step)} units formed by the last step)")


if __name__ == "__main__":
    main()
