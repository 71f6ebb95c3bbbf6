"""The first atlas in a fresh server process: with and without the analyses' warm-up.

    python benchmarks/atlas_first_look.py                  # the demo's run, its conv2 node, CPU
    python benchmarks/atlas_first_look.py --node conv3 --device cuda

Logs the demo's run (its probe images: 128, so that an atlas samples 4,096 activations and
umap-learn finds their neighbours by pynndescent's NN-descent), then starts a fresh
`tensorboard` on it for each of three cases, each with a cache of its own:
- "no warm-up" (`--microscope_no_warm_up`): the listing, then a unit's preview (its full render,
  no longer asked for, dropped before going on), then the atlas's preview, which compiles UMAP
  (numba) first;
- "warm-up, atlas at once": the same, the warm-up started by the listing and still under way
  (the unit's preview shares the CPU with it; the atlas waits for what it has left to compile);
- "warm-up done": the same once the `status` route says the warm-up is done (how long it took
  is printed too).
Prints, for each, the seconds from asking to having: the run listing, the unit's preview (the
first render of the process: the model's load included) and the atlas's preview.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tb_microscope.demo.train import train

ROUTE = "/data/plugin/tb_microscope"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def until_done(url: str, deadline_s: float = 900) -> float:
    """Seconds until `url` answers 200, asked again every 0.2 s (as the tab polls)."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        code, body = get(url)
        if code == 200:
            return time.perf_counter() - start
        if code != 202:
            raise SystemExit(f"{url}: {code} {body[:300]!r}")
        time.sleep(0.2)
    raise SystemExit(f"{url}: nothing after {deadline_s} s")


def idle(url: str) -> None:
    """Once the render service has nothing queued or running (what nobody asks for any more is
    dropped `abandon_after`, 5 s, after the last ask)."""
    while (state := json.loads(get(f"{url}/status")[1]))["queued"] or state["running"]:
        time.sleep(0.2)


class Server:
    """A fresh `tensorboard` process on the logdir; its base URL once it listens."""

    def __init__(self, logdir: Path, cache: Path, device: str, *flags: str):
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
        command += ["--host", "127.0.0.1", "--port", "0", "--microscope_device", device]
        command += ["--microscope_cache_dir", str(cache), *flags]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.url = None
        for line in self.proc.stdout:
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if match:
                self.url = match.group(1) + ROUTE
                break
        if self.url is None:
            raise SystemExit("tensorboard did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def first_look(logdir: Path, cache: Path, args, warm_up: bool, wait: bool) -> dict:
    flags = () if warm_up else ("--microscope_no_warm_up",)
    server = Server(logdir, cache, args.device, *flags)
    try:
        found = {}
        start = time.perf_counter()
        code, body = get(f"{server.url}/runs")
        found["listing"] = time.perf_counter() - start
        (run,) = json.loads(body)
        step = run["steps"][-1]
        where = f"run={run['run']}&step={step}"
        unit = f"{where}&node={args.unit_node}&unit=0&technique=channel&quality=preview"
        found["unit preview"] = until_done(f"{server.url}/image?{unit}")
        idle(server.url)  # the unit's full render, no longer asked for, is dropped
        if wait:
            while (state := json.loads(get(f"{server.url}/status")[1])["warm_up"])[
                "status"
            ] != "done":
                time.sleep(0.5)
            found["warm-up (its own)"] = state["seconds"]
        atlas = f"{where}&node={args.node}&grid={args.grid}&quality=preview"
        found["atlas preview"] = until_done(f"{server.url}/atlas?{atlas}")
        return found
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="conv2", help="the atlas's node")
    parser.add_argument("--unit-node", default="conv1", help="the previewed unit's node")
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30, help="the demo's training steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "logs"
        train(logdir / "demo", steps=args.steps, log=lambda *_: None)
        cases = {
            "no warm-up": (False, False),
            "warm-up, atlas at once": (True, False),
            "warm-up done": (True, True),
        }
        results = {}
        for i, (name, (warm_up, wait)) in enumerate(cases.items()):
            results[name] = first_look(logdir, Path(tmp) / f"cache{i}", args, warm_up, wait)
            print(name, {k: round(v, 1) for k, v in results[name].items()}, flush=True)
        rows = ["listing", "unit preview", "warm-up (its own)", "atlas preview"]
        print(f"\n{'seconds':<20}" + "".join(f"{name:>26}" for name in cases))
        for row in rows:
            cells = [results[n].get(row) for n in cases]
            print(f"{row:<20}" + "".join(f"{'-' if c is None else f'{c:.2f}':>26}" for c in cells))


if __name__ == "__main__":
    main()
