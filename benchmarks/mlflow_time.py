"""MLflow vs a log directory: the time to log, list, open and render the same run from each.

    python benchmarks/mlflow_time.py                 # ResNet-18, 5 snapshots, a local server
    python benchmarks/mlflow_time.py --snapshots 10 --units 8

Starts a real `mlflow server` (sqlite, artifacts served from a temporary folder) on a free
loopback port, trains a torchvision ResNet-18 (random weights, random data) a few steps with two
Loggers at once, one into a log directory and one into an MLflow run, then times each side:
the training thread's stall per snapshot and the time until the last upload is done; listing the
runs (`find_runs` / `list_runs`); opening the run (cold: an empty mirror; warm: opened again);
the first model load at a step (for MLflow this fetches the snapshot; torch.export's own
first-use cost is paid before, untimed); and rendering a few
units of one node at that step. Needs the `mlflow` extra.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torchvision


def timed(label: str, work):
    start = time.perf_counter()
    result = work()
    print(f"{label:<52} {time.perf_counter() - start:8.3f} s")
    return result


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts"]
    command += ["--artifacts-destination", str(root / "artifacts")]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    raise SystemExit("mlflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--node", default="layer2.0.conv1")
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlflow-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    server, url = start_server(root)
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        import mlflow

        import tb_microscope
        from tb_microscope.execution.cache import RenderCache
        from tb_microscope.execution.planner import render_cached
        from tb_microscope.store.mlflow import list_runs

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        size_mb = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6
        print(f"torchvision ResNet-18, {size_mb:.0f} MB per snapshot, {args.snapshots} snapshots")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.rand(8, 3, 64, 64), torch.randint(0, 10, (8,))
        logdir = root / "logs" / "resnet18"
        steps = list(range(args.snapshots))
        with mlflow.start_run(run_name="resnet18") as active:
            local = tb_microscope.Logger(logdir, model, x[:2], steps=steps)
            remote = tb_microscope.Logger("mlflow", model, x[:2], steps=steps)
            stalls = {"log directory": 0.0, "MLflow": 0.0}
            start = time.perf_counter()
            for step in steps:
                for name, logger in (("log directory", local), ("MLflow", remote)):
                    t = time.perf_counter()
                    logger.log(step)
                    stalls[name] += time.perf_counter() - t
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for name, stall in stalls.items():
                print(f"{'log() stall per snapshot, ' + name:<52} {stall / len(steps):8.3f} s")
            timed("close: all written, log directory", local.close)
            timed("close: all uploaded, MLflow", remote.close)
            print(f"{'(training loop + both closes)':<52} {time.perf_counter() - start:8.3f} s")
            run_id = active.info.run_id

        step = steps[-1]
        tb_microscope.open_run(logdir).load_model(step)  # torch.export's first-use costs, untimed
        timed(
            "list runs, log directory (find_runs)", lambda: tb_microscope.find_runs(root / "logs")
        )
        timed("list runs, MLflow (list_runs)", lambda: list_runs(url))
        for name, source in (("log directory", logdir), ("MLflow", f"runs:/{run_id}")):
            run = timed(f"open, cold, {name}", lambda s=source: tb_microscope.open_run(s))
            timed(f"open again, {name}", lambda s=source: tb_microscope.open_run(s))
            timed(f"first load of step {step}, {name}", lambda r=run: r.load_model(step))
            timed(f"load again, {name}", lambda r=run: r.load_model(step))
            timed(
                f"render {args.units} units of {args.node}, {name}",
                lambda r=run, n=name: render_cached(
                    RenderCache(r, str(root / "render-cache" / n.replace(" ", "-"))),
                    r,
                    step,
                    args.node,
                    list(range(args.units)),
                    "channel",
                    size=args.size,
                    iterations=args.iterations,
                ),
            )
    finally:
        os.killpg(server.pid, 9)
        server.wait()


if __name__ == "__main__":
    main()
