"""Runs at an fsspec URL, on fsspec's in-memory filesystem: the uploader's order, the mirror's
reads, new steps, a truncated object, the bounded snapshot cache and finding runs."""

import json
import time
import uuid

import fsspec
import pytest
import torch
from test_manifest import manifest

from tb_microscope.errors import CorruptSnapshotError, RunNotFoundError
from tb_microscope.store import mirror as mirror_module
from tb_microscope.store.local import RunStore, write_bytes_atomic
from tb_microscope.store.paths import MANIFEST, find_runs, is_remote_url, relative_run
from tb_microscope.store.remote import mirror as remote_mirror
from tb_microscope.store.remote.mirror import RemoteRunStore
from tb_microscope.store.remote.upload import RemoteUploader, adopt_remote
from tb_microscope.store.upload import uploaded_steps


class RecordingUploader(RemoteUploader):
    def __init__(self, *args):
        self.order = []
        super().__init__(*args)

    def put(self, rel):
        self.order.append(rel)
        super().put(rel)


@pytest.fixture
def url(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(remote_mirror, "LIST_EVERY_S", 0.0)
    base = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    yield f"{base}/runs/exp1"
    memory = fsspec.filesystem("memory")
    if memory.exists(base.removeprefix("memory://")):
        memory.rm(base.removeprefix("memory://"), recursive=True)


def weights(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": torch.randn(8, 3, 3, 3, generator=g), "conv1.bias": torch.zeros(8)}


def staged(tmp_path) -> RunStore:
    store = RunStore(tmp_path / "staging")
    store.root.mkdir(parents=True)
    write_bytes_atomic(store.root / "model.pt2", b"not really a program")
    store.write_manifest(manifest())
    return store


def upload(store: RunStore, url: str, *steps: int) -> RecordingUploader:
    for step in steps:
        store.write_snapshot(step, weights(step), {}, {})
    uploader = RecordingUploader(store, url, store.read_manifest().run_id)
    assert uploader.wait(30)
    uploader.close(5)
    return uploader


def test_urls_are_told_from_paths():
    assert (
        is_remote_url("s3://lab/runs") and is_remote_url("gs://b/x") and is_remote_url("memory://x")
    )
    assert not is_remote_url("runs:/abc") and not is_remote_url("/tmp/x")
    assert not is_remote_url("file:///tmp/x") and not is_remote_url("s3:/lab/runs")


def test_the_manifest_goes_up_after_what_it_names_and_each_snapshot_whole(tmp_path, url):
    store = staged(tmp_path)
    uploader = upload(store, url, 10, 20)
    assert uploader.order[:2] == ["model.pt2", MANIFEST]
    assert uploader.order[2:] == [f"snapshots/step-{s:09d}.safetensors" for s in (10, 20)]
    assert store.steps() == [] and uploaded_steps(store) == [10, 20]  # staged copies are gone

    run = RemoteRunStore(url)
    run.sync()
    assert run.name == url and run.steps() == [10, 20]
    assert run.read_manifest().run_id == store.read_manifest().run_id
    got = run.read_snapshot(20)
    assert torch.equal(got["conv1.weight"], weights(20)["conv1.weight"])
    assert run.snapshot_version(20) == RemoteRunStore(url).snapshot_version(20)


def test_a_new_step_is_listed_and_a_replaced_snapshot_is_fetched_again(tmp_path, url):
    store = staged(tmp_path)
    upload(store, url, 10)
    run = RemoteRunStore(url)
    assert run.steps() == [10]
    before = run.snapshot_version(10)
    run.read_snapshot(10)
    upload(store, url, 30)
    assert run.steps() == [10, 30]
    store.write_snapshot(10, weights(99), {}, {})  # logged again: a new object
    upload(store, url)
    assert run.steps() == [10, 30] and run.snapshot_version(10) != before
    assert torch.equal(run.read_snapshot(10)["conv1.weight"], weights(99)["conv1.weight"])
    upload(store, url, 40)  # read before any listing shows it
    assert torch.equal(run.read_snapshot(40)["conv1.weight"], weights(40)["conv1.weight"])


def test_a_truncated_object_is_never_read_as_a_snapshot(tmp_path, url):
    store = staged(tmp_path)
    upload(store, url, 10)
    fs = fsspec.filesystem("memory")
    prefix = url.removeprefix("memory://") + "/plugins/tb_microscope/snapshots"
    whole = fs.cat_file(f"{prefix}/step-000000010.safetensors")
    fs.pipe_file(f"{prefix}/step-000000011.safetensors", whole[: len(whole) // 2])
    run = RemoteRunStore(url)
    assert run.steps() == [10, 11]
    with pytest.raises(CorruptSnapshotError, match="delete this object") as err:
        run.read_snapshot(11)
    assert f"({url}/plugins/tb_microscope/snapshots/step-000000011.safetensors: " in str(err.value)
    assert not run.snapshot_path(11).exists()  # nothing half is kept in the mirror
    assert torch.equal(run.read_snapshot(10)["conv1.bias"], torch.zeros(8))


def test_a_url_without_a_run_says_so(url):
    with pytest.raises(RunNotFoundError, match="holds no tb_microscope data"):
        RemoteRunStore(url).sync()


def test_fetched_snapshots_stay_under_their_bound(tmp_path, url, monkeypatch):
    store = staged(tmp_path)
    upload(store, url, 1, 2, 3)
    run = RemoteRunStore(url)
    assert run.steps() == [1, 2, 3]
    size = run.listed(1)[0]
    run.budget = mirror_module.SnapshotBudget(run.budget.root, max_bytes=2 * size)
    for step in (1, 2, 3):
        run.read_snapshot(step)
    held = sorted(p.name for p in run.snapshot_path(1).parent.glob("*.safetensors"))
    assert len(held) == 2 and not run.snapshot_path(1).exists()
    assert torch.equal(run.read_snapshot(1)["conv1.weight"], weights(1)["conv1.weight"])


def test_a_new_staging_folder_goes_on_with_the_run_at_the_url(tmp_path, url):
    store = staged(tmp_path)
    upload(store, url, 10, 20)
    again = RunStore(tmp_path / "elsewhere")
    assert adopt_remote(again, url) == store.read_manifest().run_id
    assert uploaded_steps(again) == [10, 20]
    assert again.read_manifest().run_id == store.read_manifest().run_id


def test_runs_are_found_under_a_url(tmp_path, url):
    upload(staged(tmp_path), url, 1)
    top = url.rsplit("/", 2)[0]
    assert find_runs(top) == [url]
    assert relative_run(url, top) == "runs/exp1" and relative_run(url, url) == "."
    assert find_runs(top + "/nothing") == []


def test_the_event_file_goes_up_after_its_snapshot(tmp_path, url):
    store = staged(tmp_path)
    (store.run_dir / "events.out.tfevents.1.host.1.0.tb_microscope").write_bytes(b"x" * 10)
    upload(store, url, 5)
    fs = fsspec.filesystem("memory")
    names = [n.rsplit("/", 1)[-1] for n in fs.ls(url.removeprefix("memory://"), detail=False)]
    assert "events.out.tfevents.1.host.1.0.tb_microscope" in names
    assert json.loads((store.root / "index.json").read_bytes())["snapshots"]["5"]["size"] > 0


def test_in_the_background_a_listing_never_holds_up_a_reader(tmp_path, url):
    store = staged(tmp_path)
    upload(store, url, 10)
    run = RemoteRunStore(url)
    run.background = True
    assert run.steps() == [10]  # the first sync is waited for: nothing is mirrored before
    upload(store, url, 20)
    deadline = time.monotonic() + 30
    while run.steps() != [10, 20]:  # each call starts at most one sync and returns at once
        assert time.monotonic() < deadline, "the new step never appeared"
        time.sleep(0.05)
