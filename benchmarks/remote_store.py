"""Object storage vs a log directory: the Logger's worst stall per `log()` and the time to the
first rendered unit of the same run from each, side by side.

    python benchmarks/remote_store.py                  # ResNet-18, 5 snapshots, a local moto_server
    python benchmarks/remote_store.py --snapshots 10 --size 64 --iterations 32

Starts a real S3-compatible server (`moto_server`, from `moto[server]`) on a free loopback port,
trains a torchvision ResNet-18 (random weights, random data) a few steps with two Loggers at once,
one into a log directory and one into s3://bench/runs/r18, and prints each Logger's worst and
median stall of the training thread per `log()`, and the time until the last upload is done.
Then, in a fresh cache each, the time to the first rendered unit (`open_run`, load the model at
the last step, render `layer3` unit 0): from the local directory, and from S3 (a cold mirror:
listing, the manifest and architecture, the snapshot fetched); torch.export's first-use cost is
paid before, untimed. Needs the `s3` extra and `moto[server]`.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torchvision


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto_server did not start")


def first_unit(source, size: int, iterations: int, cache: Path) -> tuple[float, float]:
    """Seconds from `open_run(source)` to the model loaded at the last step, and to the first
    rendered unit, in a fresh user cache."""
    import tb_microscope

    os.environ["XDG_CACHE_HOME"] = str(cache)
    start = time.perf_counter()
    run = tb_microscope.open_run(source)
    step = run.steps[-1]
    run.load_model(step)
    loaded = time.perf_counter() - start
    tb_microscope.render(run, step, "layer3", [0], size=size, iterations=iterations, device="cpu")
    return loaded, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import tb_microscope

    root = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    proc, endpoint = start_server(root)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        os.environ["XDG_CACHE_HOME"] = str(root / "train-cache")
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.rand(8, 3, 64, 64), torch.randint(0, 10, (8,))
        url = "s3://bench/runs/r18"
        loggers = {
            "local": tb_microscope.Logger(root / "local" / "r18", model, x[:2], every=1),
            "s3": tb_microscope.Logger(url, model, x[:2], every=1),
        }
        for step in range(args.snapshots):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for logger in loggers.values():
                logger.log(step)
        print(f"ResNet-18, {args.snapshots} snapshots, moto_server at {endpoint}")
        print(f"{'':<40} {'local':>10} {'s3':>10}")
        done = {}
        for name, logger in loggers.items():
            start = time.perf_counter()
            logger.close()
            done[name] = time.perf_counter() - start
        for label, pick in (
            ("first log(): capture starts (ms)", lambda r: 1000 * r[0]),
            ("worst stall per later log() (ms)", lambda r: 1000 * max(r[1:])),
            ("median stall per later log() (ms)", lambda r: 1000 * statistics.median(r[1:])),
        ):
            stalls = {n: [rec.stall_s for rec in lg.records] for n, lg in loggers.items()}
            print(f"{label:<40} {pick(stalls['local']):>10.1f} {pick(stalls['s3']):>10.1f}")
        print(
            f"{'close() (writes, uploads left) (s)':<40} {done['local']:>10.2f} {done['s3']:>10.2f}"
        )

        # torch.export's first load in this process costs seconds of imports: paid here, untimed
        first_unit(root / "local" / "r18", args.size, 2, root / "warmup")
        local, remote = [], []
        for i in range(args.repeats):  # alternated, each in a cache of its own
            local.append(
                first_unit(root / "local" / "r18", args.size, args.iterations, root / f"l{i}")
            )
            remote.append(first_unit(url, args.size, args.iterations, root / f"s{i}"))
        for label, k in (
            ("open and load the model, best (s)", 0),
            ("first rendered unit, best (s)", 1),
        ):
            a, b = min(t[k] for t in local), min(t[k] for t in remote)
            print(f"{label:<40} {a:>10.2f} {b:>10.2f}   ratio s3/local {b / a:.2f}")
        print(
            f"  (cold caches, best of {args.repeats}, alternated; first unit: local "
            f"{', '.join(f'{t[1]:.2f}' for t in local)}; s3 "
            f"{', '.join(f'{t[1]:.2f}' for t in remote)}; {args.size} px, {args.iterations} "
            "iterations, layer3 unit 0)"
        )
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


if __name__ == "__main__":
    main()
