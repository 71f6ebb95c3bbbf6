"""Serving latency of the plugin in a real `tensorboard` on 127.0.0.1.

    python benchmarks/serve_latency.py [--requests 300] [--concurrent 16]

Trains the demo CNN for a few steps into a temporary logdir, starts TensorBoard on a free
loopback port, and prints: p50/p99 latency of a cached unit image and of the `nodes` route
(sequential requests), and how many renders N identical concurrent requests for one uncached
unit caused (goal: exactly one).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tb_microscope.demo.train import train


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"


def wait_png(url: str) -> None:
    deadline = time.monotonic() + 300
    while fetch(url)[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        train(Path(logdir) / "demo", steps=20, log=lambda *_: None)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                logdir,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--microscope_size",
                "32",
                "--microscope_iterations",
                "64",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            base = None
            while base is None:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("tensorboard exited")
                match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
                base = match.group(1) + "/data/plugin/tb_microscope" if match else None
            image = f"{base}/image?run=demo&step=20&node=conv2&unit=0"
            wait_png(image)
            timings = {"cached image": [], "nodes": []}
            for _ in range(args.requests):
                for name, url in (("cached image", image), ("nodes", f"{base}/nodes?run=demo")):
                    start = time.perf_counter()
                    status, _ = fetch(url)
                    timings[name].append(time.perf_counter() - start)
                    assert status == 200, (name, status)

            before = json.loads(fetch(f"{base}/status")[1])["renders"]
            uncached = f"{base}/image?run=demo&step=10&node=conv3&unit=5"
            threads = [
                threading.Thread(target=fetch, args=(uncached,)) for _ in range(args.concurrent)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wait_png(uncached)
            renders = json.loads(fetch(f"{base}/status")[1])["renders"] - before
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"cached image ({args.requests} sequential requests): "
        f"{percentiles(timings['cached image'])}"
    )
    print(f"nodes ({args.requests} sequential requests): {percentiles(timings['nodes'])}")
    print(
        f"{args.concurrent} identical concurrent requests for one uncached unit: "
        f"{renders} render(s)"
    )


if __name__ == "__main__":
    main()
