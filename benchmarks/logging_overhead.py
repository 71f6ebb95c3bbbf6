"""What the Logger costs a training loop: resnet18 on random data, CPU, side by side in one run.

    python benchmarks/logging_overhead.py [--steps 200] [--batch 16] [--size 64]

Training alternates blocks of steps without the Logger (baseline) and with it (`logger.log(step)`
every step, default dense-early schedule, step counter running over the logged blocks only), so
both see the same machine noise. Prints:
- the step-time ratio over the window (logged / baseline), with and without the first snapshot,
  which also captures the architecture (torch.export) once per run;
- the training-thread stall per snapshot (first, and median of the rest) and the background
  write time and bytes per snapshot;
- the ratio this implies over a 100,000-step run at the default schedule (31 snapshots), since a
  short window logs far more densely than a real run does.
"""

import argparse
import statistics
import tempfile
import time

import torch
import torchvision
from torch import nn

import tb_microscope
from tb_microscope.training.schedule import DenseEarly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=200, help="logged steps (and as many baseline)"
    )
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm up allocator and kernels
        train_step()

    baseline, logged = [], []
    logged_step = 0
    with tempfile.TemporaryDirectory() as logdir:
        logger = tb_microscope.Logger(logdir, model, x)
        while logged_step < args.steps:
            for _ in range(args.block):
                start = time.perf_counter()
                train_step()
                baseline.append(time.perf_counter() - start)
            for _ in range(args.block):
                start = time.perf_counter()
                train_step()
                logger.log(logged_step)
                logged.append(time.perf_counter() - start)
                logged_step += 1
        start = time.perf_counter()
        logger.close()
        final_flush = time.perf_counter() - start
        records = logger.records

    base, with_logger = statistics.fmean(baseline), statistics.fmean(logged)
    first = records[0]
    rest = records[1:]
    stall = statistics.median(r.stall_s for r in rest)
    write = statistics.median(r.write_s for r in rest)
    window_ratio = with_logger / base
    without_first = (sum(logged) - first.stall_s) / len(logged) / base
    # Over a long run the per-snapshot cost is amortised: the logged-minus-baseline time of the
    # window, less the one-off first snapshot, spread over its snapshots, times 30 more snapshots.
    per_snapshot = (sum(logged) - first.stall_s - base * len(logged)) / max(len(rest), 1)
    long_steps = 100_000
    snapshots = len(DenseEarly().steps_until(long_steps))
    projected = 1 + (first.stall_s + (snapshots - 1) * max(per_snapshot, 0)) / (base * long_steps)

    print(f"resnet18, batch {args.batch}, {args.size}px, CPU, {torch.get_num_threads()} threads")
    print(f"steps: {len(baseline)} baseline, {len(logged)} logged, {len(records)} snapshots")
    print(f"step time: baseline {base * 1e3:.1f} ms, with Logger {with_logger * 1e3:.1f} ms")
    print(f"ratio over this window, all snapshots:             {window_ratio:.3f}")
    print(f"ratio over this window, without the first snapshot: {without_first:.3f}")
    print(f"first snapshot stall (architecture capture):      {first.stall_s * 1e3:.0f} ms")
    print(
        f"training-thread stall per snapshot: median {stall * 1e3:.1f} ms, "
        f"max {max(r.stall_s for r in rest) * 1e3:.1f} ms"
    )
    print(
        f"extra time per snapshot in the loop (mean, incl. writer contention): "
        f"{per_snapshot * 1e3:.1f} ms"
    )
    print(f"background write per snapshot (median):             {write * 1e3:.0f} ms")
    print(f"bytes per snapshot:                                 {rest[0].bytes:,}")
    print(f"close() waited for the last writes:                 {final_flush * 1e3:.0f} ms")
    print(f"projected ratio over {long_steps:,} steps ({snapshots} snapshots): {projected:.4f}")


if __name__ == "__main__":
    main()
