"""Photograph the real demo's Microscope tab for the README (docs/*.png).

Runs `tb-microscope demo` (training and rendering ahead as a user would, then serving TensorBoard)
and drives Debian's Chromium through the views with Playwright. Needs the test extras
(`bash scripts/test.sh` sets them up, with Chromium).

    .venv/bin/python scripts/docs_screenshots.py [--logdir runs-docs]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

import tb_microscope

DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARGS += ["--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_demo(logdir: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tb_microscope.cli", "demo", "--logdir", logdir]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
        if "serving TensorBoard" in line:
            break
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until TensorBoard answers
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.5)
    raise RuntimeError("the demo's TensorBoard did not start")


def shoot(page, url: str, name: str, cells: str = "", count: int = 0, also: str = "") -> None:
    """Open `url`, wait for `count` rendered cells under `cells` (or the view) and for `also`,
    photograph it."""
    page.goto(url)
    frame = page.frame_locator("iframe[src*='tb_microscope']")
    done = frame.locator(f"{cells} .cell[data-status='done']" if cells else "main > section")
    expect(done).to_have_count(count or 1, timeout=300_000)
    if also:
        expect(frame.locator(also)).to_have_count(1, timeout=300_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / f"{name}.png"))
    print("saved", DOCS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs-docs")
    args = parser.parse_args()
    port = free_port()
    proc = serve_demo(args.logdir, port)
    base = f"http://127.0.0.1:{port}/#tb_microscope&p.tb_microscope.run=demo"
    try:
        DOCS.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            node = f"{base}&p.tb_microscope.node=conv2"
            shoot(page, node, "node", ".node-body", 33, also="canvas.units-heat")
            steps = len(tb_microscope.open_run(Path(args.logdir) / "demo").steps)
            unit = f"{base}&p.tb_microscope.node=conv2&p.tb_microscope.unit=8"
            shoot(page, unit, "unit", ".filmstrip", steps)
            compare = f"{base}&p.tb_microscope.node=conv2&p.tb_microscope.compare=1"
            shoot(page, f"{compare}&p.tb_microscope.step2=0", "compare", ".pane", 64)
            concepts = f"{base}&p.tb_microscope.node=pool2&p.tb_microscope.concepts=1"
            shoot(page, concepts, "concepts", also=".concepts-grid[data-state='done']")
            nodes = len(tb_microscope.open_run(Path(args.logdir) / "demo").nodes)
            page.goto(base)  # the model page, once its dynamics heatmap is there
            rows = page.frame_locator("iframe[src*='tb_microscope']").locator(
                ".model-dynamics .dyn-row[data-node]"
            )
            expect(rows).to_have_count(nodes, timeout=300_000)
            page.wait_for_timeout(1000)  # the first units' thumbnails
            page.screenshot(path=str(DOCS / "dynamics.png"))
            print("saved", DOCS / "dynamics.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
