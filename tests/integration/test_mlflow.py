"""MLflow, for real: runs logged into a real `mlflow server` by a training process, opened, rendered
and logged back by others, listed and rendered by TensorBoard, a server gone mid-training, and
one that hangs while TensorBoard shows runs."""

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import tb_microscope
from conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SCREENSHOTS,
    SCRIPTS,
    Cuttable,
    MlflowServer,
    TinyCNN,
    free_port,
    http,
    lightning_module,
    run_python,
    tensorboard,
)
from tb_microscope.errors import IncompatibleRunError, MicroscopeError, RunNotFoundError
from tb_microscope.execution.cache import RenderCache, RenderKey
from tb_microscope.store.local import RunStore
from tb_microscope.store.mlflow import (
    TAG,
    MlflowRuns,
    MlflowUnavailableError,
    listing,
    mirror_dir,
    staging_dir,
)

TRAIN = SCRIPTS / "mlflow_train.py"
PLUGIN = "/data/plugin/tb_microscope"


def env_for(server: MlflowServer | Cuttable, cache: Path, **extra) -> dict:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.url,
        "XDG_CACHE_HOME": str(cache),
        **extra,
    }


def train(server, tmp_path, experiment, name, steps, *extra, cache="train-cache") -> str:
    """Train in a process of its own, logging into MLflow (staging in the machine's `cache`);
    returns the MLflow run id."""
    proc = run_python(
        TRAIN, experiment, name, steps, tmp_path / "weights", *extra,
        env=env_for(server, tmp_path / cache),
    )  # fmt: skip
    return proc.stdout.split()[0]


def cli(server, cache, *args):
    return run_python("-m", "tb_microscope.cli", *args, env=env_for(server, cache))


def weights_at(tmp_path, step) -> dict:
    return torch.load(tmp_path / "weights" / f"step-{step}.pt")


def same_weights(loaded: dict, expected: dict) -> bool:
    return set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in loaded)


@pytest.fixture
def reader(mlflow_server, tmp_path, monkeypatch):
    """This process reads MLflow runs from the test server, into a mirror of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "reader-cache"))
    return mlflow.MlflowClient(mlflow_server.url)


def test_a_run_logged_into_mlflow_is_opened_rendered_and_logged_back(
    mlflow_server, tmp_path, reader, monkeypatch
):
    run_id = train(mlflow_server, tmp_path, "exp-a", "tiny-a", "0,3,6")
    tag = reader.get_run(run_id).data.tags[TAG]
    # the uploader deleted each staged snapshot once uploaded
    staged = staging_dir(mlflow_server.url, run_id)
    staged = tmp_path / "train-cache" / staged.relative_to(tmp_path / "reader-cache")
    assert not list((staged / "plugins/tb_microscope/snapshots").glob("*.safetensors"))

    info = cli(mlflow_server, tmp_path / "cli-cache", "info", f"runs:/{run_id}").stdout
    assert info.startswith(f"runs:/{run_id}  conftest.TinyCNN")
    assert "steps (3): 0 3 6" in info and "probe: 8 images of 3×16×16" in info
    assert "conv2  spatial     16 units" in info

    run = tb_microscope.open_run(f"runs:/{run_id}")
    assert (run.name, run.id, run.steps, run.architecture) == (
        f"runs:/{run_id}",
        tag,
        [0, 3, 6],
        "export",
    )
    assert run.probe_images().shape == (8, 3, 16, 16)
    for step in run.steps:
        assert same_weights(run.load_state_dict(step), weights_at(tmp_path, step))
    reference = TinyCNN().eval()
    reference.load_state_dict(weights_at(tmp_path, 6))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(run.load_model(6)(x), reference(x))

    out = cli(
        mlflow_server, tmp_path / "cli-cache", "render", f"runs:/{run_id}", "--nodes", "conv2",
        "--units", "0-3", "--steps", "3,6", "--size", "32", "--iterations", "8", "--log-to-mlflow",
    ).stdout  # fmt: skip
    assert "8 units: 8 rendered" in out
    assert f"logged 10 images into MLflow run runs:/{run_id}" in out
    names = [os.path.basename(a.path) for a in reader.list_artifacts(run_id, "images")]
    for step in (3, 6):
        for key in [f"microscope~conv2~unit_{u:04d}" for u in range(4)] + ["microscope~conv2~grid"]:
            assert [n for n in names if n.startswith(f"{key}+step+{step}+") and n.endswith(".png")]

    # the picture logged is the one rendered into the CLI's mirror, pixel for pixel
    logged = next(
        n for n in names if n.startswith("microscope~conv2~unit_0002+step+6+") and n.endswith("png")
    )
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=f"images/{logged}", dst_path=str(tmp_path / "dl")
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cli-cache"))
    cli_run = tb_microscope.open_run(f"runs:/{run_id}")
    key = RenderKey(6, cli_run.snapshot_version(6), "conv2", 2, "channel", 32, 8, 0)
    cached = RenderCache(cli_run).get(key)
    assert cached is not None and cached.image.std() > 0
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), cached.image)

    # MLflow's own UI shows each unit as an image chart whose slider walks it through the steps
    experiment = reader.get_run(run_id).info.experiment_id
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{mlflow_server.url}/#/experiments/{experiment}/runs/{run_id}/model-metrics")
        cards = page.get_by_test_id("experiment-view-compare-runs-card")
        card = cards.filter(has_text="microscope/conv2/unit_0002")
        slow = 90_000  # MLflow's UI is a large app: its first load takes a while on 2 cores
        expect(cards.filter(has_text="microscope/conv2/grid")).to_have_count(1, timeout=slow)
        for logged in (3, 6):  # the slider's marks are the logged steps
            card.get_by_role("slider").press("ArrowRight")
            expect(card.locator("input[type=number]")).to_have_value(str(logged))
            pattern = re.compile(rf"unit_0002%2Bstep%2B{logged}%2B")
            expect(card.locator("img")).to_have_attribute("src", pattern, timeout=slow)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "mlflow_ui.png"))
        browser.close()


def test_opening_again_fetches_only_the_new_snapshots(mlflow_server, tmp_path, reader):
    run_id = train(mlflow_server, tmp_path, "exp-b", "tiny-b", "0,2")
    run = tb_microscope.open_run(f"runs:/{run_id}")
    assert run.steps == [0, 2]
    snapshots = mirror_dir(mlflow_server.url, run_id) / "plugins/tb_microscope/snapshots"
    assert not snapshots.exists()  # nothing is fetched before it is read
    for step in run.steps:
        run.load_state_dict(step)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in snapshots.iterdir()}
    assert len(before) == 2

    # a second training session goes on in the same MLflow run
    train(mlflow_server, tmp_path, "exp-b", "tiny-b", "4,6", "--run-id", run_id)
    again = tb_microscope.open_run(f"runs:/{run_id}")
    assert again.steps == [0, 2, 4, 6] and again.id == run.id
    for step in again.steps:
        assert same_weights(again.load_state_dict(step), weights_at(tmp_path, step))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in snapshots.iterdir()}
    assert len(after) == 4
    assert {name: after[name] for name in before} == before  # not fetched again


def test_a_run_goes_on_from_another_machine_and_another_model_never_replaces_it(
    mlflow_server, tmp_path, reader, example, monkeypatch
):
    run_id = train(mlflow_server, tmp_path, "exp-m", "tiny-m", "0,2")
    first = tb_microscope.open_run(f"runs:/{run_id}")
    # the training goes on on another machine, where nothing of the run is staged
    train(mlflow_server, tmp_path, "exp-m", "tiny-m", "4,6", "--run-id", run_id, cache="other")
    again = tb_microscope.open_run(f"runs:/{run_id}")
    assert again.steps == [0, 2, 4, 6] and again.id == first.id
    for step in again.steps:
        assert same_weights(again.load_state_dict(step), weights_at(tmp_path, step))

    # another model logged into that run is refused at once
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    with mlflow.start_run(run_id=run_id):
        with pytest.raises(
            IncompatibleRunError,
            match=f"MLflow run {run_id} already holds a different model .*new MLflow run",
        ):
            tb_microscope.Logger("mlflow", other, example)

    # ... and, when the run could not be read as it started, uploads nothing there
    monkeypatch.setenv("TB_MICROSCOPE_MLFLOW_ADOPT_TIMEOUT", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "third"))
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with tb_microscope.Logger("mlflow", other, example, steps=[0]) as logger:
            logger.log(0)
    refusal = [
        str(w.message) for w in said if "already holds the tb_microscope data" in str(w.message)
    ]
    assert refusal and "nothing is uploaded there" in refusal[0]
    kept = staging_dir(mlflow_server.url, run_id) / "plugins/tb_microscope/snapshots"
    assert [p.name for p in kept.glob("*.safetensors")] == ["step-000000000.safetensors"]
    assert reader.get_run(run_id).data.tags[TAG] == first.id
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fourth"))
    last = tb_microscope.open_run(f"runs:/{run_id}")
    assert last.steps == [0, 2, 4, 6] and last.id == first.id
    assert same_weights(last.load_state_dict(6), weights_at(tmp_path, 6))


def test_mistakes_and_missing_things_say_what_to_do(
    mlflow_server, tmp_path, reader, tiny, example, monkeypatch
):
    with pytest.raises(MicroscopeError, match=r"there is none: call mlflow\.start_run\(\)"):
        tb_microscope.Logger("mlflow", tiny, example)
    assert not (tmp_path / "reader-cache").exists()  # nothing written
    with pytest.raises(ValueError, match=r"use them with Logger\('mlflow'"):
        tb_microscope.Logger(tmp_path / "run", tiny, example, run_id="abc")
    with pytest.raises(RunNotFoundError, match="is not an MLflow run URI"):
        tb_microscope.open_run("runs:/")
    with pytest.raises(RunNotFoundError, match=f"run {'0' * 32} does not exist at the MLflow"):
        tb_microscope.open_run("runs:/" + "0" * 32)
    empty = reader.create_run(reader.create_experiment("exp-empty")).info.run_id
    with pytest.raises(RunNotFoundError, match=r"holds no tb_microscope data.*Logger\('mlflow'"):
        tb_microscope.open_run(f"runs:/{empty}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MlflowUnavailableError, match="check that the server is running"):
        tb_microscope.open_run(f"runs:/{empty}", tracking_uri=nowhere)
    # a Logger that logs nothing leaves the active run as it was
    with mlflow.start_run(experiment_id=reader.create_experiment("exp-idle")) as active:
        tb_microscope.Logger("mlflow", tiny, example).close()
    assert TAG not in reader.get_run(active.info.run_id).data.tags
    assert reader.list_artifacts(active.info.run_id) == []
    tb_microscope.Logger(tmp_path / "local", tiny, example).close()
    proc = run_python(
        "-m", "tb_microscope.cli", "render", tmp_path / "local", "--log-to-mlflow", check=False
    )
    assert proc.returncode != 0 and "give the run as runs:/<run_id>" in proc.stderr


def runs_of(base) -> dict:
    status, _, body = http(f"{base}{PLUGIN}/runs")
    assert status == 200, body
    return {r["run"]: r for r in json.loads(body)}


def runs_once_listed(base, *names: str, within: float = 60) -> dict:
    """The tab's runs, once `names` are among them: MLflow runs are listed in the background, and
    the first listing (or one after a new run) may come after the tab asks."""
    deadline = time.monotonic() + within
    while not set(names) <= set(runs := runs_of(base)):
        assert time.monotonic() < deadline, sorted(runs)
        time.sleep(0.2)
    return runs


def test_tensorboard_lists_mlflow_runs_renders_them_and_follows_new_snapshots(
    mlflow_server, tmp_path, reader, tiny, example
):
    watched = train(mlflow_server, tmp_path, "tb-exp", "watched", "0,3")
    # runs that say they hold our data: one in an experiment not listed, one whose index is
    # broken, one deleted
    listed = reader.get_experiment_by_name("tb-exp").experiment_id
    tags = {TAG: "0" * 32}
    reader.create_run(reader.create_experiment("tb-other"), run_name="unlisted", tags=tags)
    broken = reader.create_run(listed, run_name="broken", tags=tags).info.run_id
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    reader.log_artifact(broken, str(tmp_path / "bad" / "index.json"), "tb_microscope")
    deleted = reader.create_run(listed, run_name="deleted", tags=tags).info.run_id
    reader.delete_run(deleted)
    with pytest.raises(RunNotFoundError, match=f"run {deleted} .deleted. was deleted; restore it"):
        tb_microscope.open_run(f"runs:/{deleted}")
    logdir = tmp_path / "logs"
    with tb_microscope.Logger(logdir / "local", tiny, example) as logger:
        logger.log(0)

    flags = ["--microscope_mlflow_tracking_uri", mlflow_server.url]
    flags += ["--microscope_mlflow_experiments", "tb-exp", "--microscope_size", "32"]
    flags += ["--microscope_iterations", "8", "--microscope_preview_size", "0"]
    env = env_for(mlflow_server, tmp_path / "tb-cache")
    with tensorboard(logdir, *flags, env=env) as base:
        runs = runs_once_listed(base, "mlflow:tb-exp/watched")
        assert sorted(runs) == [
            "local",
            "mlflow:tb-exp/broken",
            "mlflow:tb-exp/deleted",
            "mlflow:tb-exp/watched",
        ]
        assert runs["mlflow:tb-exp/watched"]["steps"] == [0, 3]
        assert runs["mlflow:tb-exp/watched"]["model"]["class"] == "conftest.TinyCNN"
        assert runs["local"]["steps"] == [0]
        assert "index.json" in runs["mlflow:tb-exp/broken"]["error"]
        assert "broken (not JSON" in runs["mlflow:tb-exp/broken"]["error"]
        assert "was deleted; restore it" in runs["mlflow:tb-exp/deleted"]["error"]

        query = urllib.parse.urlencode(
            {"run": "mlflow:tb-exp/watched", "step": 3, "node": "conv2", "unit": 1}
        )
        deadline = time.monotonic() + 120
        while (got := http(f"{base}{PLUGIN}/image?{query}"))[0] == 202:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert got[0] == 200, got[2]
        image = np.asarray(Image.open(io.BytesIO(got[2])).convert("RGB"))
        assert image.shape == (32, 32, 3) and image.std() > 0

        status, _, listing = http(f"{base}/data/plugins_listing")
        assert json.loads(listing)["tb_microscope"]["enabled"]

        # training goes on in the watched run: the tab's run list follows
        train(mlflow_server, tmp_path, "tb-exp", "watched", "5", "--run-id", watched)
        deadline = time.monotonic() + 60
        while runs_of(base)["mlflow:tb-exp/watched"]["steps"] != [0, 3, 5]:
            assert time.monotonic() < deadline, runs_of(base)["mlflow:tb-exp/watched"]
            time.sleep(0.5)


def test_local_runs_answer_while_the_mlflow_server_hangs_and_its_runs_come_back(
    mlflow_server, tmp_path, reader, tiny, example
):
    remote = "mlflow:hang-exp/remote"
    train(mlflow_server, tmp_path, "hang-exp", "remote", "0,2")
    logdir = tmp_path / "logs"
    with tb_microscope.Logger(logdir / "local", tiny, example) as logger:
        logger.log(0)
    flags = ["--microscope_mlflow_tracking_uri", mlflow_server.url]
    flags += ["--microscope_mlflow_experiments", "hang-exp", "--microscope_size", "32"]
    flags += ["--microscope_iterations", "8", "--microscope_preview_size", "0"]
    output: list[str] = []

    def answered_within(seconds: float, route: str) -> tuple[int, bytes]:
        start = time.monotonic()
        status, _, body = http(f"{base}{PLUGIN}/{route}")
        assert time.monotonic() - start < seconds, f"{route} took {time.monotonic() - start} s"
        return status, body

    def outage_lines() -> list[str]:  # any line about the MLflow server
        return [line for line in list(output) if mlflow_server.url in line]

    env = env_for(mlflow_server, tmp_path / "tb-cache")
    with tensorboard(logdir, *flags, env=env, output=output) as base:
        assert runs_once_listed(base, "local", remote)[remote]["steps"] == [0, 2]
        # the server hangs: it accepts connections and answers none (its whole process group)
        os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
        try:
            query = urllib.parse.urlencode({"run": "local", "step": 0, "node": "conv2", "unit": 1})
            # the first asks may hold one sync of the MLflow run, bounded by the request timeout
            status, body = answered_within(30, "runs")
            assert status == 200, body
            assert answered_within(10, "nodes?run=local")[0] == 200
            deadline = time.monotonic() + 120
            while (got := answered_within(10, f"image?{query}"))[0] == 202:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert got[0] == 200, got[1]
            deadline = time.monotonic() + 60
            while not outage_lines():
                assert time.monotonic() < deadline, "".join(output)
                time.sleep(0.2)
            assert "MLflow runs are shown as last fetched until it answers" in outage_lines()[0]
            # the outage is known: nothing waits on the server any more; the MLflow run is shown
            # from its mirror
            status, body = answered_within(5, "runs")
            runs = {r["run"]: r for r in json.loads(body)}
            assert runs["local"]["steps"] == [0] and runs[remote]["steps"] == [0, 2]
            assert answered_within(5, "nodes?run=local")[0] == 200
            assert answered_within(5, f"image?{query}")[0] == 200
        finally:
            os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
        # back: a run made now is listed at the next listing
        after = reader.get_experiment_by_name("hang-exp").experiment_id
        reader.create_run(after, run_name="after", tags={TAG: "0" * 32})
        runs = runs_once_listed(base, "mlflow:hang-exp/after")
        assert runs[remote]["steps"] == [0, 2] and "error" not in runs[remote]
        assert len(outage_lines()) == 1, "".join(output)


class Silent:
    """A server on 127.0.0.1 that accepts connections and never answers (what a hung server's
    clients see); `accepted` counts the connections."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.listener.accept()[0])

    def close(self) -> None:
        self.listener.close()
        for sock in self.accepted:
            sock.close()


def test_the_tabs_mlflow_list_never_waits_on_a_hung_server_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(listing, "LIST_EVERY_S", 0.2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the user's own: kept
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")  # recorded, so that the default
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # MlflowRuns sets is undone after
    caplog.set_level(logging.INFO, logger="tb_microscope")
    silent = Silent()
    runs = MlflowRuns(silent.url)
    try:
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert runs.names() == [] and runs.pending()  # the first listing waits for an answer
        deadline = time.monotonic() + 30
        while not silent.accepted:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()  # the lister waits on the server, and nothing else does
        assert runs.names() == [] and runs.store("local") is None
        assert runs.store("mlflow:exp/unlisted") is None
        assert time.monotonic() - start < 1
        while len(silent.accepted) < 3:  # three listings, three timeouts
            assert time.monotonic() < deadline
            time.sleep(0.05)
            runs.names()  # the tab is in use
        said = [r for r in caplog.records if silent.url in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in said]
        assert "MLflow runs are shown as last fetched until it answers" in said[0].getMessage()
        assert not runs.pending()
    finally:
        runs.close()
        silent.close()


def test_the_lightning_callback_logs_into_the_trainers_mlflow_run(mlflow_server, tmp_path, reader):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import MLFlowLogger

    from tb_microscope.integrations.lightning import MicroscopeCallback

    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=mlflow_server.url)
    data = torch.utils.data.TensorDataset(torch.rand(12, 3, 8, 8), torch.randint(0, 2, (12,)))
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[MicroscopeCallback(steps=[0, 3, 6])],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(lightning_module(), torch.utils.data.DataLoader(data, batch_size=2))
    run = tb_microscope.open_run(f"runs:/{logger.run_id}")
    assert run.steps == [0, 3, 6]
    assert [n.name for n in run.nodes][:2] == ["net", "net.0"]


def test_training_goes_on_while_the_server_is_away_and_nothing_is_lost(
    mlflow_server, tmp_path, monkeypatch
):
    # the training reaches the server through a port that can be cut: the server (the module's,
    # whose start takes 17 s) stays up, and what the training sees is a server that died and came
    # back: its connections drop, new ones are refused, then it answers again
    server = Cuttable(mlflow_server.port)
    steps = list(range(0, 30, 2))
    progress = tmp_path / "progress"
    env = env_for(
        server,
        tmp_path / "train-cache",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",  # fail fast: the uploader retries by itself
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    command = [sys.executable, str(TRAIN), "outage", "r", ",".join(map(str, steps))]
    command += [str(tmp_path / "weights"), "--pause", "0.3", "--progress", str(progress)]
    out, err = tmp_path / "out", tmp_path / "err"

    def reached() -> int:
        return int(progress.read_text() or -1) if progress.exists() else -1

    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, text=True)
    try:
        client = mlflow.MlflowClient(mlflow_server.url)
        deadline = time.monotonic() + 120
        uploaded, run_id = [], ""
        while len(uploaded) < 2:  # two snapshots are up: the server goes away
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
            if len(run_id := out.read_text().strip()) == 32:
                uploaded = client.list_artifacts(run_id, "tb_microscope/snapshots")
        server.cut()
        down_at = reached()
        deadline = time.monotonic() + 60
        while reached() < down_at + 8:  # training goes on meanwhile
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.1)
        server.restore()
        assert proc.wait(timeout=240) == 0, err.read_text()

        log = err.read_text()
        assert f"uploading to MLflow run {run_id} at {server.url} failed" in log
        assert "training goes on, and snapshots wait in" in log
        assert "is reachable again; the snapshots that waited are uploaded" in log
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "reader-cache"))
        run = tb_microscope.open_run(f"runs:/{run_id}", tracking_uri=mlflow_server.url)
        assert run.steps == steps
        for step in steps:
            assert same_weights(run.load_state_dict(step), weights_at(tmp_path, step))
        staged = tmp_path / "train-cache" / "tb_microscope" / "mlflow-upload"
        assert not list(staged.rglob("step-*.safetensors"))
    finally:
        proc.kill()
        server.cut()


def test_while_mlflow_is_unreachable_snapshots_wait_on_disk_up_to_the_bound(
    tmp_path, monkeypatch, tiny, example
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nowhere = f"http://127.0.0.1:{free_port()}"
    snapshot_mb = sum(v.numel() * v.element_size() for v in tiny.state_dict().values()) / 2**20
    with pytest.warns(RuntimeWarning) as warned:
        logger = tb_microscope.Logger(
            "mlflow", tiny, example, run_id="f" * 32, tracking_uri=nowhere,
            backlog_mb=snapshot_mb * 1.5, upload_timeout=1,
        )  # fmt: skip
        assert logger.log(0, force=True)
        logger.flush()  # written to the staging directory; the upload fails
        assert logger.log(1, force=True)  # one snapshot waits: still under the bound
        logger.flush()
        assert not logger.log(2, force=True)  # two wait: over it, step 2 is skipped
        logger.close()
    said = "\n".join(str(w.message) for w in warned)
    assert f"uploading to MLflow run {'f' * 32} at {nowhere} failed" in said
    assert "step 2 is not logged: 2 snapshots" in said and "more than backlog_mb=" in said
    assert "2 snapshots" in said and "could not be uploaded" in said
    assert f"Logger('mlflow', ..., run_id='{'f' * 32}')" in said
    staged = RunStore(staging_dir(nowhere, "f" * 32))
    assert staged.steps() == [0, 1] and logger.logged_steps == [0, 1]
    assert staged.read_manifest().model.cls == "conftest.TinyCNN"
