"""Sweep throughput: in-process vs Ray with 1 and 2 actors, on the same sweep, side by side.

    python benchmarks/sweep_throughput.py                  # the demo CNN, 2 runs, 3 steps
    python benchmarks/sweep_throughput.py --iterations 128 --size 64

Logs two runs of the demo's CNN (a few training steps between snapshots), then renders the same
sweep (every unit of conv1, conv2 and conv3 at three steps of both runs) into a fresh cache with
`tb-microscope render`'s code: in this process (one worker per device), then on a local Ray
cluster (`--ray local`) with 1 and with 2 actors of one CPU each. Prints units per second of each,
excluding and including the cluster's start, and checks that every sweep wrote the same files.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=64)
    args = parser.parse_args()
    import tb_microscope
    from tb_microscope.cli.render import render_jobs
    from tb_microscope.demo.model import SmallCNN
    from tb_microscope.execution.ray_executor import RayExecutor

    root = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    runs = []
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model, x = SmallCNN(), torch.rand(8, 3, 32, 32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with tb_microscope.Logger(root / name, model, x, steps=[0, 10, 20]) as logger:
            for step in range(21):
                logger.log(step)
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        runs.append(tb_microscope.open_run(root / name))
    jobs = [
        (run, step, node, list(range(run.node(node).units)))
        for run in runs
        for step in run.steps
        for node in ("conv1", "conv2", "conv3")
    ]
    units = sum(len(j[3]) for j in jobs)
    print(
        f"demo CNN, 2 runs x 3 steps x conv1-conv3 = {units} units, {args.size} px, "
        f"{args.iterations} iterations, torch threads here: {torch.get_num_threads()}",
        file=sys.stderr,
    )
    options = dict(size=args.size, iterations=args.iterations, seed=0, devices=None)
    results = {}
    for label, workers in (("in-process", None), ("Ray, 1 actor", 1), ("Ray, 2 actors", 2)):
        cache = root / f"cache-{workers}"
        start = time.perf_counter()
        executor = None if workers is None else RayExecutor("local", workers=workers)
        ready = time.perf_counter()
        try:
            render_jobs(jobs, "channel", **options, batch_size=None, cache_dir=str(cache),
                        executor=executor)  # fmt: skip
        finally:
            if executor is not None:
                executor.close()
        done = time.perf_counter()
        results[label] = files(cache)
        print(
            f"{label:<14} {units / (done - ready):6.2f} units/s rendering "
            f"({done - ready:6.1f} s), {units / (done - start):6.2f} units/s with the cluster's "
            f"start ({done - start:6.1f} s)"
        )
    same = all(r == results["in-process"] for r in results.values())
    print(f"same files from all three: {same} ({len(results['in-process'])} files)")


if __name__ == "__main__":
    main()
