"""Serving latency, throughput and memory of the plugin in a real `tensorboard` on 127.0.0.1.

    python benchmarks/serve_latency.py [--requests 200] [--clients 8] [--units 2000]
    python benchmarks/serve_latency.py --workers-only [--tabs 4] [--rounds 2]

Trains the demo CNN for 100 steps (13 snapshots) into a temporary logdir, starts TensorBoard on a
free loopback port, and prints:
- p50/p99 latency of a cached unit image with `--clients` clients fetching at once, then of the
  image and the `nodes` route one request at a time;
- how many renders N identical concurrent requests for one uncached unit caused (goal: one);
- the server's resident memory (VmRSS) as it browses `--units` distinct units the way the tab
  does (one `render` POST per node and step, then each unit's image), every unit rendered at
  16 px and 2 iterations so that the walk takes a minute, not a day;
- render throughput with 2 workers (`--microscope_workers 2`) against 1, on the same machine and
  the same work, in turns (the fastest of `--rounds` each), as a ratio;
- the p95 latency of each route the tab calls while `--tabs` tabs browse at once (each asks for
  another node's units at another step, polls its images, and lists runs and nodes as it goes).
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

from tb_microscope import open_run
from tb_microscope.demo.train import train


def fetch(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"


def wait_png(url: str) -> None:
    deadline = time.monotonic() + 300
    while (status := fetch(url)[0]) != 200:
        if time.monotonic() > deadline or status not in (202, 503):
            raise RuntimeError(f"{url}: {status}")
        time.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_tensorboard(
    logdir: str,
    flags: tuple[str, ...] = ("--microscope_size", "16", "--microscope_iterations", "2"),
) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1"]
        + ["--port", "0", "--microscope_device", "cpu", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("tensorboard exited")
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its output
            return proc, match.group(1) + "/data/plugin/tb_microscope"


# The workers' benchmark: every tab renders one node's units at one step, at this quality.
WORK_SIZE, WORK_ITERATIONS = 32, 48


def p95(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"{ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1e3:.0f} ms"


def browse(base: str, run, tab: int, latencies: dict[str, list[float]], lock) -> None:
    """One tab: the run list, the node list, then one node's units at one step (a render POST
    and each unit's image, polled as the tab does until they are drawn)."""

    def timed(route: str, url: str, body=None) -> tuple[int, bytes]:
        start = time.perf_counter()
        status, data = fetch(url, body)
        with lock:
            latencies.setdefault(route, []).append(time.perf_counter() - start)
        return status, data

    nodes = [n for n in run.nodes if n.units >= 8]
    node, step = nodes[tab % len(nodes)], run.steps[-1 - tab // len(nodes)]
    units = list(range(min(node.units, 16)))
    pending = set(units)
    while pending:
        timed("runs", f"{base}/runs")
        timed("nodes", f"{base}/nodes?run=demo")
        body = {"run": "demo", "step": step, "node": node.name, "units": sorted(pending)}
        status, data = timed("render", f"{base}/render", body)
        assert status == 200, data
        for unit in sorted(pending):
            url = f"{base}/image?run=demo&step={step}&node={node.name}&unit={unit}"
            status, _ = timed("image", url)
            if status == 200:
                pending.discard(unit)
        time.sleep(0.5)  # the tab polls twice a second


def tabs_at_once(logdir: str, run, workers: int, tabs: int) -> tuple[float, dict]:
    """Seconds for `tabs` tabs' renders on a fresh server of `workers` workers (nothing
    cached), and the routes' latencies meanwhile."""
    with tempfile.TemporaryDirectory() as cache:
        flags = (
            "--microscope_size",
            str(WORK_SIZE),
            "--microscope_iterations",
            str(WORK_ITERATIONS),
        )
        flags += ("--microscope_preview_size", "0", "--microscope_workers", str(workers))
        proc, base = start_tensorboard(logdir, (*flags, "--microscope_cache_dir", cache))
        try:
            wait_png(f"{base}/image?run=demo&step=0&node=conv1&unit=0")  # the model is loaded
            latencies: dict[str, list[float]] = {}
            lock = threading.Lock()
            threads = [
                threading.Thread(target=browse, args=(base, run, tab, latencies, lock))
                for tab in range(tabs)
            ]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - start, latencies
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def workers_benchmark(logdir: str, run, tabs: int, rounds: int) -> None:
    took = {1: [], 2: []}
    latencies = {}
    for _ in range(rounds):
        for workers in (1, 2):
            seconds, latencies[workers] = tabs_at_once(logdir, run, workers, tabs)
            took[workers].append(seconds)
    one, two = min(took[1]), min(took[2])
    print(
        f"{tabs} tabs' renders ({tabs} nodes x 16 units at {WORK_SIZE} px / {WORK_ITERATIONS} "
        f"iterations), fastest of {rounds}: 1 worker {one:.1f} s, 2 workers {two:.1f} s: "
        f"2 workers do {one / two:.2f}x the throughput of 1"
    )
    for workers in (1, 2):
        print(
            f"p95 latency while {tabs} tabs browse, {workers} worker(s): "
            + ", ".join(
                f"{route} {p95(v)} ({len(v)})" for route, v in sorted(latencies[workers].items())
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--tabs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers-only", action="store_true", help="only the workers' figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        train(Path(logdir) / "demo", steps=100, log=lambda *_: None)
        run = open_run(Path(logdir) / "demo")
        workers_benchmark(logdir, run, args.tabs, args.rounds)
        if args.workers_only:
            return
        proc, base = start_tensorboard(logdir)
        try:
            image = f"{base}/image?run=demo&step=20&node=conv2&unit=0"
            wait_png(image)
            cached: list[float] = []
            lock = threading.Lock()

            def client() -> None:
                mine = []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    status, _ = fetch(image)
                    mine.append(time.perf_counter() - start)
                    assert status == 200, status
                with lock:
                    cached.extend(mine)

            clients = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            sequential = {"image": [], "nodes": []}
            for _ in range(args.requests):
                for name, url in (("image", image), ("nodes", f"{base}/nodes?run=demo")):
                    start = time.perf_counter()
                    assert fetch(url)[0] == 200
                    sequential[name].append(time.perf_counter() - start)

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
            while json.loads(fetch(f"{base}/status")[1])["running"]:
                time.sleep(0.05)
            renders = json.loads(fetch(f"{base}/status")[1])["renders"] - before

            memory = [(0, rss_mb(proc.pid))]
            browsed = 0
            walk = [(step, node) for step in run.steps for node in run.nodes]
            for step, node in walk:
                if browsed >= args.units:
                    break
                units = list(range(min(node.units, args.units - browsed)))
                body = {"run": "demo", "step": step, "node": node.name, "units": units}
                assert fetch(f"{base}/render", body)[0] == 200
                for unit in units:
                    wait_png(f"{base}/image?run=demo&step={step}&node={node.name}&unit={unit}")
                browsed += len(units)
                if browsed // 500 > memory[-1][0] // 500 or browsed >= args.units:
                    memory.append((browsed, rss_mb(proc.pid)))
            state = json.loads(fetch(f"{base}/status")[1])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"cached image ({args.clients} clients x {args.requests} requests at once): "
        f"{percentiles(cached)}"
    )
    print(f"cached image ({args.requests} sequential requests): {percentiles(sequential['image'])}")
    print(f"nodes ({args.requests} sequential requests): {percentiles(sequential['nodes'])}")
    print(
        f"{args.concurrent} identical concurrent requests for one uncached unit: "
        f"{renders} render(s)"
    )
    print(
        "server resident memory while browsing distinct units: "
        + ", ".join(f"{n} units {mb:.0f} MB" for n, mb in memory)
    )
    print(
        f"after {browsed} units: {state['renders']} renders, models and programs in memory "
        f"{state['memory_bytes'] / 1e6:.1f} MB ({state['memory_entries']} entries), "
        f"disk cache {state['cache_bytes'] / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
