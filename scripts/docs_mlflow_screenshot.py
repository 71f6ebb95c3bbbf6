"""Photograph MLflow's own UI showing a unit of the real demo across training (docs/mlflow.png).

Starts a temporary `mlflow server`, trains the demo inside an MLflow run with
`Logger("mlflow", ...)`, renders a few units of one node at five steps with
`tb-microscope render runs:/<id> --log-to-mlflow`, then drives Debian's Chromium to the run's
"Model metrics" page and moves one unit's step slider, photographing its card at each step.
Needs the test extras (`bash scripts/test.sh` sets them up, with Chromium).

    .venv/bin/python scripts/docs_mlflow_screenshot.py [--node conv2] [--unit 8]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARGS += ["--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="conv2")
    parser.add_argument("--unit", type=int, default=8)
    parser.add_argument("--steps", default="0,20,100,500,1500")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlflow-docs-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "XDG_CACHE_HOME": str(root / "cache")}
    os.environ.update(env)
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        import mlflow

        from tb_microscope.demo.train import train

        mlflow.set_experiment("demo")
        with mlflow.start_run(run_name="small-cnn") as run:
            train("mlflow", steps=1500)
        run_id, experiment = run.info.run_id, run.info.experiment_id
        units = f"{max(args.unit - 3, 0)}-{args.unit}"
        subprocess.run(
            [sys.executable, "-m", "tb_microscope.cli", "render", f"runs:/{run_id}", "--nodes",
             args.node, "--units", units, "--steps", args.steps, "--log-to-mlflow"],
            check=True, env=env,
        )  # fmt: skip
        steps = [int(s) for s in args.steps.split(",")]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{url}/#/experiments/{experiment}/runs/{run_id}/model-metrics")
            cards = page.get_by_test_id("experiment-view-compare-runs-card")
            card = cards.filter(has_text=f"microscope/{args.node}/unit_{args.unit:04d}")
            expect(card).to_have_count(1, timeout=120_000)
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()  # the assistant's side panel
            shots = []
            for step in steps:
                slider = card.get_by_role("slider")
                for _ in range(100):  # the slider's marks are the logged steps
                    if card.locator("input[type=number]").input_value() == str(step):
                        break
                    slider.press("ArrowRight")
                pattern = re.compile(rf"unit_{args.unit:04d}%2Bstep%2B{step}%2B")
                expect(card.locator("img")).to_have_attribute("src", pattern, timeout=60_000)
                page.wait_for_timeout(800)
                shots.append(Image.open(io.BytesIO(card.screenshot())))
            browser.close()
        gap = 8
        strip = Image.new(
            "RGB",
            (sum(s.width for s in shots) + gap * (len(shots) - 1), max(s.height for s in shots)),
            "white",
        )
        x = 0
        for shot in shots:
            strip.paste(shot, (x, 0))
            x += shot.width + gap
        DOCS.mkdir(exist_ok=True)
        strip.save(DOCS / "mlflow.png")
        print("saved", DOCS / "mlflow.png")
    finally:
        os.killpg(server.pid, 9)
        server.wait()


if __name__ == "__main__":
    main()
