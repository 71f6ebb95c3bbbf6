"""The render cache and a log directory it cannot trust, with real runs, real files and a real
`tensorboard`: a cache folder symlinked out of its run, foreign files in a cache, a symlink at a
cached file's name, corrupt cached files, a killed writer's leftovers."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import tb_microscope
from conftest import http, tensorboard
from tb_microscope.demo.train import train
from tb_microscope.execution.cache import (
    DiskBudget,
    RenderCache,
    RenderKey,
    ResultKey,
    is_cache_file,
)

SIZE, ITERATIONS = 128, 2  # noise-like pictures of ~45 KB: a few dozen fill a megabyte
LIMIT_MB = 1
BASE = "/data/plugin/tb_microscope"
STEP, NODE = 3, "conv3"  # conv3 has 64 units


def png_bytes(color, size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def plant(folder, files: dict) -> dict:
    """Write `files` (relative path -> bytes) under `folder`; what each is: its bytes and
    mtime, to find any change later."""
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return snapshot(folder)


def snapshot(folder) -> dict:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def key_of(run, unit: int, size=SIZE, iterations=ITERATIONS) -> RenderKey:
    """The key the image route uses for a unit's channel picture at STEP of NODE."""
    return RenderKey(STEP, run.snapshot_version(STEP), NODE, unit, "channel", size, iterations, 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two runs: 'linked', whose cache folder is a symlink to a folder of 40 pictures and
    other files (some with names the cache would give); 'real', whose real cache folder holds
    foreign files and, at the name of unit 0's picture, a symlink to a picture elsewhere."""
    root = tmp_path_factory.mktemp("cache-trust")
    logdir = root / "logdir"
    for name in ("linked", "real"):
        train(logdir / name, steps=STEP, log=lambda *_: None)
    pictures = root / "pictures"
    files = {f"photo-{i}.png": png_bytes((i, 0, 0), 64) for i in range(10)}
    files |= {f"album-{i}.json": json.dumps({"album": i}).encode() for i in range(10)}
    files |= {f"scan-{i}.npz": os.urandom(20_000) for i in range(10)}
    files |= {f"step-{STEP}/{i:032x}.png": png_bytes((0, i, 0), 64) for i in range(5)}
    files |= {f"results/{i:032x}.json": b"{}" * 10_000 for i in range(5)}
    assert len(files) == 40
    planted = plant(pictures, files)
    linked = tb_microscope.open_run(logdir / "linked")
    (linked.store.root / "cache").symlink_to(pictures, target_is_directory=True)

    real = tb_microscope.open_run(logdir / "real")
    cache = real.store.root / "cache"
    foreign = {
        "notes.png": png_bytes("blue") + os.urandom(300_000),
        f"step-{STEP}/holiday.png": png_bytes("green") + os.urandom(300_000),
        "results/other.json": json.dumps({"x": 1}).encode() + b" " * 300_000,
        f"results/{'e' * 32}.txt": os.urandom(300_000),
    }
    foreign_planted = plant(cache, foreign)
    outside = root / "outside.png"
    outside.write_bytes(png_bytes("red", SIZE))
    outside_before = outside.read_bytes()
    link = real.store.root / "cache" / f"step-{STEP}" / f"{key_of(real, 0).digest(real.id)}.png"
    link.symlink_to(outside)

    flags = ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
    flags += ["--microscope_preview_size", "0", "--microscope_cache_max_mb", str(LIMIT_MB)]
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "xdg")}
    with tensorboard(logdir, *flags, env=env) as url:
        yield {
            "base": url + BASE,
            "root": root,
            "pictures": pictures,
            "planted": planted,
            "linked": linked,
            "real": real,
            "foreign": foreign_planted,
            "outside": (outside, outside_before),
            "link": link,
            "user_cache": root / "xdg" / "tb_microscope",
        }


def poll(base, route, query, seconds=180) -> tuple[bytes, list[dict]]:
    """The route's answer once it is 200, and every waiting status before it."""
    waits = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, _, body = http(f"{base}/{route}?{query}")
        if status == 200:
            return body, waits
        assert status == 202, (status, body)
        waits.append(json.loads(body))
        time.sleep(0.05)
    pytest.fail(f"no answer from {route}?{query} in {seconds} s; last: {waits[-1:]}")


def render_all(base, run: str) -> list[np.ndarray]:
    """Every unit of NODE at STEP, sixteen (one group) at a time; the decoded pictures."""
    pictures = []
    for first in range(0, 64, 16):
        units = list(range(first, first + 16))
        body = {"run": run, "step": STEP, "node": NODE, "units": units}
        assert http(f"{base}/render", body)[0] == 200
        for unit in units:
            data, _ = poll(base, "image", f"run={run}&step={STEP}&node={NODE}&unit={unit}")
            pictures.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return pictures


def cached_files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file() and is_cache_file(p)]


def test_a_cache_symlinked_out_of_its_run_leaves_the_files_there_alone(setup):
    base, linked = setup["base"], setup["linked"]
    pictures = render_all(base, "linked")
    assert all(p.shape == (SIZE, SIZE, 3) for p in pictures)
    # 64 pictures of ~45 KB: over the budget, so the oldest were evicted, from the user cache
    rendered = cached_files(setup["user_cache"] / linked.id)
    assert 0 < len(rendered) < 64
    state = json.loads(http(f"{base}/status")[2])
    assert state["cache_bytes"] <= LIMIT_MB << 20
    # every planted file is there, unchanged, and nothing was added beside them
    assert snapshot(setup["pictures"]) == setup["planted"]
    assert sorted(os.listdir(setup["pictures"])) == sorted(
        {name.split("/")[0] for name in setup["planted"]}
    )
    assert (linked.store.root / "cache").is_symlink()


def test_a_symlink_at_a_cached_pictures_name_is_never_read_through(setup):
    """Unit 0's picture name held a symlink to a red square elsewhere: the route rendered the
    unit instead, and wrote it in place of the link, not through it."""
    base = setup["base"]
    outside, before = setup["outside"]
    data, _ = poll(base, "image", f"run=real&step={STEP}&node={NODE}&unit=0")
    assert data != before
    served = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert served.std() > 2  # a render, not the planted square
    assert outside.read_bytes() == before
    link = setup["link"]
    assert not link.is_symlink()  # replaced by the render, never followed


def test_foreign_files_in_a_cache_are_neither_counted_nor_evicted(setup):
    base, real = setup["base"], setup["real"]
    render_all(base, "real")
    cache = real.store.root / "cache"
    rendered = cached_files(cache)
    assert 0 < len(rendered) < 64  # evicted: over the budget
    state = json.loads(http(f"{base}/status")[2])
    assert state["cache_bytes"] <= LIMIT_MB << 20  # the 1.2 MB of foreign files not counted
    assert sum(p.stat().st_size for p in rendered) <= LIMIT_MB << 20
    now = snapshot(cache)
    assert {name: now.get(name) for name in setup["foreign"]} == setup["foreign"]  # unchanged
    assert not list((setup["user_cache"]).glob(f"{real.id}/step-*/*.png"))  # it stayed in the run


def test_a_truncated_cached_picture_is_rendered_again_never_called_done(setup):
    base, real = setup["base"], setup["real"]
    query = f"run=real&step={STEP}&node={NODE}&unit=63"
    first, _ = poll(base, "image", query)
    path = real.store.root / "cache" / f"step-{STEP}" / f"{key_of(real, 63).digest(real.id)}.png"
    assert path.read_bytes() == first
    path.write_bytes(first[: len(first) // 2])
    again, waits = poll(base, "image", query)
    assert waits and all(w["status"] != "done" for w in waits), waits
    image = np.asarray(Image.open(io.BytesIO(again)).convert("RGB"))
    assert image.shape == (SIZE, SIZE, 3)
    assert path.read_bytes() == again  # rendered and cached again: whole
    for corrupt in (b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 100):
        path.write_bytes(corrupt)
        served, waits = poll(base, "image", query)
        assert all(w["status"] != "done" for w in waits), waits
        Image.open(io.BytesIO(served)).load()


def test_a_corrupt_cached_result_is_computed_again_never_called_done(setup):
    base, real = setup["base"], setup["real"]
    results = real.store.root / "cache" / "results"
    before = {p.name for p in cached_files(results)}
    query = f"run=real&step={STEP}&node={NODE}&unit=5&count=4"
    first, _ = poll(base, "examples", query)
    (path,) = [p for p in cached_files(results) if p.name not in before]
    for corrupt in (b"", b'{"examples": [', b"null"):
        path.write_bytes(corrupt)
        again, waits = poll(base, "examples", query)
        assert waits and all(w["status"] != "done" for w in waits), waits
        assert json.loads(again) == json.loads(first)


# --- the cache alone, on real runs and files ---------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache-run") / "run"
    train(path, steps=STEP, log=lambda *_: None)
    return tb_microscope.open_run(path)


@pytest.fixture
def fresh(run, tmp_path, monkeypatch):
    """The run, with no cache folder yet, and the user cache in a folder of this test's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = run.store.root / "cache"
    if cache.is_symlink() or cache.is_file():
        cache.unlink()
    elif cache.exists():
        shutil.rmtree(cache)
    return run


def test_a_symlinked_cache_folder_moves_the_cache_to_the_user_cache_and_says_so(
    fresh, tmp_path, caplog
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (fresh.store.root / "cache").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, "tb_microscope.execution.cache"):
        cache = RenderCache(fresh)
    assert cache.root == tmp_path / "xdg" / "tb_microscope" / fresh.id
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"run '{fresh.name}'" in message and str(fresh.store.root / "cache") in message
    assert os.listdir(elsewhere) == []  # not even a writability probe


def test_a_step_folder_symlinked_later_moves_the_cache_before_a_write(fresh, tmp_path, caplog):
    cache = RenderCache(fresh)
    assert cache.root == fresh.store.root / "cache"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache.root / f"step-{STEP}").symlink_to(elsewhere)  # planted while the server runs
    key = key_of(fresh, 1, size=8, iterations=1)
    with caplog.at_level(logging.WARNING, "tb_microscope.execution.cache"):
        written = cache.put(key, np.zeros((8, 8, 3), np.uint8), 1.0, 2.0)
    assert os.listdir(elsewhere) == []
    assert written.parent.parent == tmp_path / "xdg" / "tb_microscope" / fresh.id
    assert key in cache and cache.get(key).objective == 1.0
    assert len(caplog.records) == 1 and f"step-{STEP} is a symlink" in caplog.records[0].message


def test_a_symlink_at_a_cached_files_name_is_removed_never_read_or_written_through(fresh, tmp_path):
    cache = RenderCache(fresh)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"examples": "not yours"}))
    result = ResultKey("examples", NODE, 0, (("count", 4),), ((STEP, "v"),))
    picture = key_of(fresh, 2, size=8, iterations=1)
    for path in (cache.result_path(result), cache.path(picture)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(secret)
    assert picture not in cache
    assert cache.get_result(result) is None and cache.get(picture) is None
    assert not cache.result_path(result).is_symlink() and not cache.path(picture).is_symlink()
    for path in (cache.result_path(result), cache.path(picture)):
        path.symlink_to(secret)
    cache.put_result(result, {"examples": []})
    cache.put(picture, np.zeros((8, 8, 3), np.uint8), 0.0, 0.0)
    assert json.loads(secret.read_text()) == {"examples": "not yours"}
    assert cache.get_result(result) == {"examples": []} and picture in cache


def test_the_budget_never_walks_through_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    planted = plant(elsewhere, {f"step-1/{i:032x}.png": b"x" * 1000 for i in range(5)})
    root = tmp_path / "root"
    (root / "results").mkdir(parents=True)
    (root / "step-1").symlink_to(elsewhere / "step-1")
    (root / "results" / f"{1:032x}.png").symlink_to(elsewhere / f"step-1/{1:032x}.png")
    mine = root / "results" / f"{9:032x}.json"
    mine.write_bytes(b"{}" * 100)
    budget = DiskBudget(max_bytes=1)
    budget.track(root)
    assert budget.total == 200
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(elsewhere)
    budget.track(linked_root)
    assert budget.total == 200 and snapshot(elsewhere) == planted


def test_a_killed_writers_staging_folders_are_swept_when_the_cache_opens(fresh, tmp_path):
    dead, alive = dead_pid(), os.getpid()
    root = fresh.store.root / "cache"
    elsewhere = tmp_path / "elsewhere"
    kept = plant(elsewhere, {"photo.png": png_bytes("red")})
    stale = [root / f".tmp-{dead}-1", root / f"step-{STEP}/.tmp-{dead}-2"]
    for folder in stale:
        plant(folder, {f"{'a' * 32}.png": b"half a picture"})
    (root / "results").mkdir()
    (root / f"results/.tmp-{dead}-3").symlink_to(elsewhere)  # a link: removed, not followed
    live = root / f".tmp-{alive}-1"
    live.mkdir()
    RenderCache(fresh)
    assert not stale[0].exists() and not stale[1].exists()
    assert not (root / f"results/.tmp-{dead}-3").is_symlink()
    assert live.is_dir()  # a live writer's
    assert snapshot(elsewhere) == kept
    # a cache outside the run (--microscope_cache_dir, the CLI's --cache-dir) too
    other = tmp_path / "cache-dir"
    plant(other / fresh.id / f".tmp-{dead}-4", {"x.png": b"x"})
    RenderCache(fresh, other)
    assert not (other / fresh.id / f".tmp-{dead}-4").exists()
