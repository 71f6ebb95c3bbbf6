"""The Lightning callback and the command line, run for real."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import torch

import tb_microscope
from conftest import lightning_module, run_python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lightning_callback_logs_on_the_loggers_schedule(tmp_path):
    import lightning.pytorch as L

    from tb_microscope.integrations.lightning import MicroscopeCallback

    data = torch.utils.data.TensorDataset(torch.rand(24, 3, 8, 8), torch.randint(0, 2, (24,)))
    trainer = L.Trainer(
        max_steps=12,
        callbacks=[MicroscopeCallback(tmp_path / "run")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(lightning_module(), torch.utils.data.DataLoader(data, batch_size=2))
    run = tb_microscope.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3, 5, 7, 10]
    assert [n.name for n in run.nodes] == ["net", "net.0", "net.1", "net.2", "net.3"]
    assert set(run.load_state_dict(10)) == {
        "net.0.weight",
        "net.0.bias",
        "net.3.weight",
        "net.3.bias",
    }


def test_info_lists_runs_steps_and_nodes(tmp_path, tiny, example):
    for name in ("b", "a"):
        with tb_microscope.Logger(tmp_path / name, tiny, example) as logger:
            for step in range(4):
                logger.log(step)
    out = run_python("-m", "tb_microscope.cli", "info", tmp_path).stdout
    assert out.index("a  conftest.TinyCNN") < out.index("b  conftest.TinyCNN")
    assert "steps (4): 0 1 2 3" in out
    assert "conv2  spatial     16 units  16×8×8" in out
    assert "fc     vector       5 units  5 " in out


def test_info_on_a_logdir_without_runs_says_so(tmp_path):
    proc = run_python("-m", "tb_microscope.cli", "info", tmp_path, check=False)
    assert proc.returncode == 1 and "no tb_microscope runs under" in proc.stderr


def test_demo_trains_renders_ahead_and_says_how_to_serve(tmp_path):
    demo = (
        "-m",
        "tb_microscope.cli",
        "demo",
        "--logdir",
        tmp_path,
        "--steps",
        "20",
        "--iterations",
        "4",
        "--no-serve",
    )
    proc = run_python(*demo)
    assert "trained 20 steps" in proc.stdout and "demo ready in" in proc.stdout
    assert "tensorboard --logdir" in proc.stdout
    run = tb_microscope.open_run(tmp_path / "demo")
    assert run.steps == [0, 1, 2, 3, 5, 7, 10, 15, 20]
    cached = list((run.store.root / "cache").rglob("*.png"))
    assert len(cached) == 4 * (16 + 32 + 2)  # conv1's and conv2's units and DeepDream, 4 steps
    again = run_python(*demo)
    assert "using the demo run already in" in again.stdout


def test_demo_serves_the_tab_with_its_renders_ready(tmp_path):
    port = free_port()
    demo = [sys.executable, "-m", "tb_microscope.cli", "demo", "--logdir", str(tmp_path)]
    demo += ["--steps", "10", "--iterations", "4", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(demo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        while "serving TensorBoard" not in out and proc.poll() is None:
            out += proc.stdout.readline()
        assert f"open http://127.0.0.1:{port}/#tb_microscope" in out, out
        base = f"http://127.0.0.1:{port}/data/plugin/tb_microscope"
        deadline = time.monotonic() + 120
        while True:
            try:
                runs = json.load(urllib.request.urlopen(f"{base}/runs", timeout=10))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "TensorBoard never answered"
                )
                time.sleep(0.5)
        assert [r["run"] for r in runs] == ["demo"] and runs[0]["steps"][-1] == 10
        # conv2 was rendered ahead at the size and iterations the tab asks for: served at once
        image = urllib.request.urlopen(f"{base}/image?run=demo&step=10&node=conv2&unit=5")
        assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None
