"""A server that can be trusted with any log directory, against a real `tensorboard`: crafted
architecture files run nothing, a run logged again gets new pictures, a broken manifest breaks
only its own run, cross-site requests are refused, abandoned renders stop, caches stay bounded."""

import io
import json
import pickle
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import tb_microscope
from conftest import http, run_python, tensorboard
from tb_microscope.demo.model import SmallCNN
from tb_microscope.demo.train import train
from tb_microscope.store.architecture import UnsafeProgramError, load_program
from tb_microscope.store.local import RunStore

SIZE, ITERATIONS = 16, 4
BASE = "/data/plugin/tb_microscope"


class _CreatesFile:
    """Unpickling this creates a file: the payload a crafted archive carries."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft_pickled_weight(good_archive, evil_archive, marker):
    """A copy of a torch.export.save archive whose first weight is a pickled payload."""
    with zipfile.ZipFile(good_archive) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    config_name = next(n for n in entries if n.endswith("model_weights_config.json"))
    config = json.loads(entries[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[config_name] = json.dumps(config).encode()
    root = config_name.split("/")[0]
    entries[f"{root}/data/weights/{first['path_name']}"] = pickle.dumps(_CreatesFile(marker))
    with zipfile.ZipFile(evil_archive, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)


def edited(data: dict, dotted: str, value=None, delete=True) -> dict:
    """A copy of `data` with the key at `dotted` (e.g. "nodes.0.units") deleted or set."""
    data = json.loads(json.dumps(data))
    *parents, last = dotted.split(".")
    target = data
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = int(last) if isinstance(target, list) else last
    if delete:
        del target[last]
    else:
        target[last] = value
    return data


MISSING_KEYS = [
    "version",
    "run_id",
    "created",
    "model",
    "model.class",
    "model.weights",
    "model.architecture",
    "model.architecture.kind",
    "input",
    "input.shape",
    "input.value_range",
    "input.dims",
    "nodes",
    "nodes.0.units",
    "nodes.0.name",
    "edges",
]
WRONG_VALUES = {
    "nodes.0.units": 10**12,
    "input.dims.2.min": 10**9,
    "model.architecture.file": "../../../../etc/passwd",
    "run_id": "../../x",
    "edges": "all",
    "input.normalize": {"mean": [0.5], "std": [1.0]},
}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    logdir = root / "logdir"
    train(logdir / "good", steps=3, log=lambda *_: None)
    # a run whose architecture file is a torch archive carrying a pickled payload
    shutil.copytree(logdir / "good", logdir / "evil")
    marker = root / "marker"
    good_archive = root / "torch-archive.pt2"
    torch.export.save(
        torch.export.export(SmallCNN().eval(), (torch.rand(2, 3, 32, 32),)), good_archive
    )
    craft_pickled_weight(good_archive, logdir / "evil/plugins/tb_microscope/model.pt2", marker)
    # runs whose manifest lacks one required key each
    manifest = json.loads(RunStore(logdir / "good").manifest_path.read_text())
    for key in MISSING_KEYS:
        shutil.copytree(logdir / "good", logdir / f"broken-{key}")
        store = RunStore(logdir / f"broken-{key}")
        store.manifest_path.write_text(json.dumps(edited(manifest, key)))
    for key, value in WRONG_VALUES.items():
        shutil.copytree(logdir / "good", logdir / f"wrong-{key}")
        store = RunStore(logdir / f"wrong-{key}")
        store.manifest_path.write_text(json.dumps(edited(manifest, key, value, delete=False)))
    return root, logdir, marker


@pytest.fixture(scope="module")
def server(logdir):
    root, path, _ = logdir
    flags = ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
    flags += ["--microscope_cache_dir", str(root / "cache")]  # outlives a deleted run
    flags += ["--microscope_max_iterations", "100000"]  # for the abandoned render below
    with tensorboard(path, *flags) as url:
        yield url + BASE


def poll_png(base, query, seconds=120, missing_ok=False) -> np.ndarray:
    """The image once rendered; `missing_ok`: the run may be briefly unlisted (TensorBoard
    drops a deleted run before it finds the new one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, kind, body = http(f"{base}/image?{query}")
        if status == 200:
            return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        assert status == 202 or (missing_ok and status == 404), (status, body)
        time.sleep(0.1)
    pytest.fail(f"no image for {query}")


def listed(base) -> dict:
    status, _, body = http(f"{base}/runs")
    assert status == 200, body
    return {r["run"]: r for r in json.loads(body)}


def test_the_crafted_archive_would_run_its_payload_if_torch_loaded_it(logdir, tmp_path):
    """The payload is real: torch.export.load runs it (in a throwaway process)."""
    _, path, _ = logdir
    marker = tmp_path / "proof"
    craft_pickled_weight(path.parent / "torch-archive.pt2", tmp_path / "evil.pt2", marker)
    script = "import sys, torch\ntry:\n torch.export.load(sys.argv[1])\nexcept Exception:\n pass"
    run_python("-c", script, tmp_path / "evil.pt2")
    assert marker.exists()


def test_a_pickled_payload_in_the_archive_is_refused_and_never_runs(server, logdir):
    _, _, marker = logdir
    runs = listed(server)
    error = runs["evil"]["error"]
    assert "use_pickle" in error and "--microscope_allow_pickle" in error
    status, _, body = http(f"{server}/image?run=evil&step=3&node=conv1&unit=0")
    assert status == 400 and b"use_pickle" in body
    status, _, body = http(f"{server}/nodes?run=evil")
    assert status == 400 and b"refused" in body
    assert "error" not in runs["good"]  # one bad run breaks nothing else
    assert poll_png(server, "run=good&step=3&node=conv1&unit=0").shape == (SIZE, SIZE, 3)
    assert not marker.exists()  # nor did the refused run's payload run meanwhile


def test_a_manifest_missing_or_mistyping_a_key_breaks_only_its_run(server):
    runs = listed(server)
    for key in MISSING_KEYS:
        error = runs[f"broken-{key}"]["error"]
        assert "manifest.json" in error and (f"'{key}'" in error or key == "version"), error
        status, _, body = http(f"{server}/nodes?run=broken-{key}")
        assert status == 400 and b"manifest.json" in body
    for key in WRONG_VALUES:
        error = runs[f"wrong-{key}"]["error"]
        assert "manifest.json" in error and key.split(".")[-1] in error, error
    assert runs["good"]["steps"] == [0, 1, 2, 3]
    assert http(f"{server}/nodes?run=good")[0] == 200


@pytest.mark.parametrize(
    "headers, code, words",
    [
        ({"Content-Type": "text/plain"}, 415, b"application/json"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, b"application/json"),
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, b"evil"),
    ],
)
def test_a_cross_site_request_cannot_start_a_render(server, headers, code, words):
    body = json.dumps({"run": "good", "step": 2, "node": "conv3", "units": "all"}).encode()
    for route in ("render", "cancel"):
        status, _, answer = http(f"{server}/{route}", body, headers)
        assert status == code and words in answer, (status, answer)
    status, _, answer = http(f"{server}/status")
    assert json.loads(answer)["queued"] == 0 and json.loads(answer)["running"] == 0


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port of this host: another program's page
]
STARTS_WORK = [
    "image?run=good&step=2&node=conv3&unit=0&seed=7",
    "examples?run=good&step=2&node=conv3&unit=0",
    "weights?run=good&step=2&node=conv3&unit=0",
    "history?run=good&node=conv3&unit=0",
    "attribution?run=good&step=2&node=conv3&unit=0&image=0",
    "atlas?run=good&step=2&node=conv3",
    "dynamics?run=good&node=conv3",
]


def idle(base) -> dict:
    """The service's status once nothing is queued or running (what an earlier test asked for
    is done)."""
    deadline = time.monotonic() + 120
    while (state := json.loads(http(f"{base}/status")[2]))["queued"] or state["running"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_a_page_on_another_site_cannot_make_the_server_work_through_a_get(server, headers):
    """What an `<img>` or a `fetch` on any site can send to a local TensorBoard is refused by
    every route that starts work, before anything is queued."""
    idle(server)
    for route in STARTS_WORK:
        status, _, answer = http(f"{server}/{route}", headers=headers)
        assert status == 403 and b"may not start or stop work" in answer, (route, answer)
    state = json.loads(http(f"{server}/status")[2])
    assert state["queued"] == 0 and state["running"] == 0, state
    # what only reads is served as before, and the tab's own requests start work
    assert http(f"{server}/runs", headers=headers)[0] == 200
    status, _, _ = http(f"{server}/{STARTS_WORK[0]}", headers={"Sec-Fetch-Site": "same-origin"})
    assert status in (200, 202)
    poll_png(server, STARTS_WORK[0].split("?", 1)[1])  # done: the server is idle again


@pytest.mark.parametrize(
    "route, flag",
    [
        ("image?run=good&step=2&node=conv3&unit=0&size=1024", "--microscope_max_size"),
        ("image?run=good&step=2&node=conv3&unit=0&size=17", "--microscope_max_size"),
        ("atlas?run=good&step=2&node=conv3&grid=50", "--microscope_max_grid"),
        ("examples?run=good&step=2&node=conv3&unit=0&count=65", "count must be from 1 to 64"),
    ],
)
def test_a_request_asks_for_no_more_work_than_the_servers_flags_allow(server, route, flag):
    idle(server)
    status, _, answer = http(f"{server}/{route}")
    assert status == 400 and flag.encode() in answer, answer
    state = json.loads(http(f"{server}/status")[2])
    assert state["queued"] == 0 and state["running"] == 0, state
    limits = json.loads(http(f"{server}/settings")[2])["limits"]
    assert limits == {"size": SIZE, "iterations": 100_000, "grid": 40, "count": 64}


def test_a_render_abandoned_by_its_client_is_cancelled(server):
    body = {"run": "good", "step": 1, "node": "conv3", "units": "all", "iterations": 100_000}
    status, _, answer = http(f"{server}/render", body)
    assert status == 200, answer
    before = json.loads(http(f"{server}/status")[2])
    deadline = time.monotonic() + 60
    while (state := json.loads(http(f"{server}/status")[2]))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    # nobody polled: dropped after 5 s (the default) and stopped, long before its 100,000
    # iterations were done
    assert state["running"] == 0 and state["queued"] == 0
    assert state["renders"] == before["renders"]


def test_a_run_logged_again_under_the_same_name_gets_new_pictures(server, logdir):
    _, path, _ = logdir

    def log(seed):
        torch.manual_seed(seed)
        with tb_microscope.Logger(path / "again", SmallCNN(), torch.rand(2, 3, 32, 32)) as lg:
            lg.log(0)

    def direct():
        run = tb_microscope.open_run(path / "again")
        return tb_microscope.render(
            run, 0, "conv2", [5], size=SIZE, iterations=ITERATIONS, device="cpu"
        ).images[0]

    log(seed=1)
    old = poll_png(server, "run=again&step=0&node=conv2&unit=5", missing_ok=True)
    np.testing.assert_array_equal(old, direct())
    old_id = tb_microscope.open_run(path / "again").id
    shutil.rmtree(path / "again")
    log(seed=2)  # a new model, the same name, the same step
    assert tb_microscope.open_run(path / "again").id != old_id
    new = poll_png(server, "run=again&step=0&node=conv2&unit=5", missing_ok=True)
    assert not np.array_equal(new, old)
    np.testing.assert_array_equal(new, direct())
    # a snapshot written again with other weights is a new snapshot too
    store = RunStore(path / "again")
    torch.manual_seed(3)
    store.write_snapshot(0, SmallCNN().state_dict(), {}, {})
    newer = poll_png(server, "run=again&step=0&node=conv2&unit=5", missing_ok=True)
    assert not np.array_equal(newer, new)
    np.testing.assert_array_equal(newer, direct())


def test_the_caches_stay_within_their_limits(tmp_path):
    logdir = tmp_path / "logdir"
    train(logdir / "demo", steps=3, log=lambda *_: None)
    cache = tmp_path / "cache"
    limit_mb = 0.03
    flags = ["--microscope_size", "32", "--microscope_iterations", "2"]
    flags += ["--microscope_cache_dir", str(cache), "--microscope_cache_max_mb", str(limit_mb)]
    flags += ["--microscope_memory_mb", "0.01"]  # smaller than one model: one entry at a time
    with tensorboard(logdir, *flags) as url:
        base = url + BASE
        for step in (0, 3):  # 128 pictures: far more than the limit holds
            http(f"{base}/render", {"run": "demo", "step": step, "node": "conv3", "units": "all"})
            for unit in range(64):
                poll_png(base, f"run=demo&step={step}&node=conv3&unit={unit}")
        state = json.loads(http(f"{base}/status")[2])
        files = [p for p in cache.rglob("*.png")]
        on_disk = sum(p.stat().st_size for p in files)
        assert on_disk <= limit_mb * (1 << 20) and state["cache_bytes"] <= limit_mb * (1 << 20)
        assert 0 < len(files) < 64  # the least recently used went
        assert state["memory_entries"] == 1
        # an evicted image is rendered again when asked for
        status, _, _ = http(f"{base}/image?run=demo&step=0&node=conv3&unit=0")
        assert status == 202
        assert poll_png(base, "run=demo&step=0&node=conv3&unit=0").shape == (32, 32, 3)


# --- crafted programs, read directly (no server needed) -----------------------------------------


def _rewrite_program(archive, change):
    with zipfile.ZipFile(archive) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    program = json.loads(entries["program.json"])
    change(program)
    entries["program.json"] = json.dumps(program).encode()
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)


def _nodes(program):
    return program["graph_module"]["graph"]["nodes"]


def _first_expression(program):
    def find(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str":
                    return value
                found = find(item)
                if found is not None:
                    return found
        elif isinstance(value, list):
            for item in value:
                found = find(item)
                if found is not None:
                    return found
        return None

    return find(program["graph_module"])


CRAFTED = {
    "a shape expression that is Python": lambda p, m: _first_expression(p).update(
        expr_str=f"__import__('builtins').open('{m}', 'w')"
    ),
    "an op that is any torch attribute": lambda p, m: _nodes(p)[0].update(target="torch.os.system"),
    "an aten op with side effects": lambda p, m: _nodes(p)[0].update(
        target="torch.ops.aten.save.default"
    ),
    "a module path that is not a name": lambda p, m: _nodes(p)[0]["metadata"].update(
        nn_module_stack="L__self__conv1,conv1;import os,torch.nn.Conv2d"
    ),
}


@pytest.mark.parametrize("what", list(CRAFTED))
def test_a_crafted_program_is_refused_before_it_is_built(tmp_path, what):
    train(tmp_path / "run", steps=1, log=lambda *_: None)
    archive = tmp_path / "run/plugins/tb_microscope/model.pt2"
    marker = tmp_path / "marker"
    _rewrite_program(archive, lambda program: CRAFTED[what](program, marker))
    with pytest.raises(UnsafeProgramError, match="allow_pickle"):
        load_program(archive)
    run = tb_microscope.open_run(tmp_path / "run")
    assert "refused" in run.problem()
    with pytest.raises(tb_microscope.PickleNotAllowedError):
        run.load_model(1)
    assert not marker.exists()


def test_guard_code_and_debugging_metadata_are_dropped_from_what_is_loaded(tmp_path):
    train(tmp_path / "run", steps=1, log=lambda *_: None)
    archive = tmp_path / "run/plugins/tb_microscope/model.pt2"
    _rewrite_program(archive, lambda program: program.update(guards_code=["1/0"]))
    program = load_program(archive)
    assert program._guards_code == []
    assert all("stack_trace" not in n.meta for n in program.graph.nodes)
