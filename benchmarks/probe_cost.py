"""What probe images cost: the file on disk, the Logger's first log, reading them back, and an
atlas's sampling over them.

    python benchmarks/probe_cost.py                         # 256 and 2048 images, 32 and 64 px
    python benchmarks/probe_cost.py --counts 2048 --sizes 224

For each count and size, logs the demo's small CNN with that many of the demo's generated images
as probe images (normalized float tensors, as a training script holds them; stored as uint8),
then prints the probe file's size, the time of the first `log()` (the snapshot, the architecture
and the probe file), the time to read the probe images back (`Run.probe_images`, as a server
does once per run), and the time to sample an atlas's activations of `conv2` over them (no
layout, no pictures). A small run is logged first and not counted: a process's first log and
load pay for imports and the capture's first compilation.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import tb_microscope
from tb_microscope.analysis.atlas import sampled_activations
from tb_microscope.demo.data import make_images, normalize
from tb_microscope.demo.model import SmallCNN
from tb_microscope.store.local import RunStore
from tb_microscope.store.paths import PROBE


def measure(root: Path, count: int, size: int) -> dict:
    images, _ = make_images(count, size, seed=0)
    probe = normalize(images)
    model = SmallCNN()
    run_dir = root / f"probe-{count}-{size}"
    start = time.perf_counter()
    with tb_microscope.Logger(run_dir, model, probe[:8], probe=probe, steps=[0]) as logger:
        logger.log(0)
    logged = time.perf_counter() - start
    run = tb_microscope.open_run(run_dir)
    start = time.perf_counter()
    loaded = run.probe_images()
    read = time.perf_counter() - start
    start = time.perf_counter()
    node = run.node("conv2")
    sampled, _ = sampled_activations(run, run.load_model(0), node, loaded, 0, torch.device("cpu"))
    sampling = time.perf_counter() - start
    size_bytes = (RunStore(run_dir).root / PROBE).stat().st_size
    return {
        "bytes": size_bytes,
        "logged_s": logged,
        "read_s": read,
        "sampling_s": sampling,
        "samples": len(sampled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    print(f"{'images':>7} {'px':>4} {'file MiB':>9} {'first log s':>12} {'read s':>7} "
          f"{'atlas sampling s':>17}")  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        measure(Path(root), 8, min(args.sizes))  # warm up: the first log and load of a process
        for size in args.sizes:
            for count in args.counts:
                m = measure(Path(root), count, size)
                print(
                    f"{count:>7} {size:>4} {m['bytes'] / 2**20:>9.1f} {m['logged_s']:>12.2f} "
                    f"{m['read_s']:>7.3f} {m['sampling_s']:>17.2f}"
                )


if __name__ == "__main__":
    main()
