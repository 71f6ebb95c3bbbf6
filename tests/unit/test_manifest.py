"""The manifest's one type: what it writes it reads back, and what it refuses it names."""

import copy
import json

import pytest

from tb_microscope.errors import IncompatibleRunError
from tb_microscope.nodes import CHANNELS_FIRST, TOKENS, Node
from tb_microscope.store.manifest import (
    EXPORT,
    FORMAT_VERSION,
    NONE,
    Architecture,
    InputSpec,
    Manifest,
    ModelInfo,
    ProbeSpec,
    new_run_id,
)


def manifest() -> Manifest:
    return Manifest(
        run_id=new_run_id(),
        created="2026-01-01T00:00:00Z",
        tb_microscope="0.1.0",
        torch="2.14.1",
        model=ModelInfo(
            "demo.SmallCNN",
            1234,
            {"conv1.weight": ("float32", (8, 3, 3, 3)), "conv1.bias": ("float32", (8,))},
            Architecture(EXPORT, "model.pt2", None),
        ),
        input=InputSpec(
            [3, 32, 32],
            "float32",
            [0.0, 1.0],
            [-2.0, 2.5],
            {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            [{"name": "height", "size": 32, "min": 16, "max": 256}],
        ),
        nodes=[
            Node("conv1", CHANNELS_FIRST, 8, (8, 32, 32), "Conv2d", 1),
            Node("blocks.0", TOKENS, 16, (17, 16), "Block", 1, 1, (0,)),
        ],
        edges=[("conv1", "blocks.0")],
        probe=ProbeSpec(64, [3, 32, 32]),
        schedule="every 100",
    )


def as_bytes(data: dict) -> bytes:
    return json.dumps(data).encode()


def test_a_manifest_reads_back_as_it_was_written():
    written = manifest()
    assert Manifest.parse(as_bytes(written.to_json()), "m.json") == written
    assert written.to_json()["version"] == FORMAT_VERSION


def edit(path: str, value):
    """The written manifest's JSON with the key at dotted `path` set to `value` (or deleted,
    for the `DELETE` marker)."""
    data = copy.deepcopy(manifest().to_json())
    *parents, last = path.split(".")
    here = data
    for part in parents:
        here = here[int(part)] if isinstance(here, list) else here[part]
    if value is DELETE:
        del here[last]
    elif isinstance(here, list):
        here[int(last)] = value
    else:
        here[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    "path, value, named",
    [
        ("run_id", "not-hex", "run_id"),
        ("run_id", DELETE, "run_id"),
        ("version", "2", "version"),
        ("version", 0, "version"),
        ("version", True, "version"),
        ("model.architecture.kind", "compiled", "model.architecture.kind"),
        ("model.architecture.file", "../../etc/passwd", "model.architecture.file"),
        ("model.weights", {"conv1.weight": ["float32", [-1]]}, "model.weights.conv1.weight"),
        ("model.parameters", 1.5, "model.parameters"),
        ("input.shape", [], "input.shape"),
        ("input.shape", [3, 1 << 20], "input.shape"),
        ("input.normalize", {"mean": [0.5], "std": [1, 1, 1]}, "input.normalize.mean"),
        (
            "input.normalize",
            {"mean": [0, 0, 0], "std": [1, float("nan"), 1]},
            "input.normalize.std",
        ),
        ("input.value_range", [0.0], "input.value_range"),
        ("input.dims", [{"size": 3}], "input.dims.0"),
        ("nodes.0.units", 0, "nodes.0.units"),
        ("nodes.0.layout", "sideways", "nodes.0.layout"),
        ("nodes.1.output", [[0]], "nodes.1.output"),
        ("nodes.0", "conv1", "nodes.0"),
        ("edges", [["conv1"]], "edges.0"),
        ("probe.shape", "3x32x32", "probe.shape"),
        ("created", DELETE, "created"),
    ],
)
def test_a_wrong_key_is_refused_naming_the_file_and_the_key(path, value, named):
    raw = json.dumps(edit(path, value), allow_nan=True).encode()
    with pytest.raises(IncompatibleRunError) as e:
        Manifest.parse(raw, "runs/x/manifest.json")
    message = str(e.value)
    assert message.startswith("runs/x/manifest.json"), message
    assert f"'{named}" in message, message


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"{", "not valid JSON"),
        (b"[]", "must be an object"),
        (b'{"format": "something.else"}', "not a tb_microscope manifest"),
    ],
)
def test_a_file_that_is_no_manifest_says_so(raw, says):
    with pytest.raises(IncompatibleRunError, match=says):
        Manifest.parse(raw, "m.json")


def test_a_newer_format_asks_for_an_upgrade():
    raw = as_bytes(edit("version", FORMAT_VERSION + 1))
    with pytest.raises(IncompatibleRunError, match="upgrade tb-microscope"):
        Manifest.parse(raw, "m.json")


def test_a_version_1_manifest_gets_a_run_id_from_its_bytes_and_layouts_from_kinds():
    data = edit("version", 1)
    del data["run_id"]
    for node in data["nodes"]:
        node["kind"] = "spatial"
        del node["layout"]
    raw = as_bytes(data)
    first, again = Manifest.parse(raw, "m.json"), Manifest.parse(raw, "m.json")
    assert first.run_id == again.run_id and len(first.run_id) == 32
    assert {n.layout for n in first.nodes} == {CHANNELS_FIRST}
    data["created"] = "2026-01-02T00:00:00Z"  # another run, another id
    assert Manifest.parse(as_bytes(data), "m.json").run_id != first.run_id


def test_optional_keys_may_be_missing_or_null():
    data = edit("probe", None)
    del data["schedule"]
    del data["input"]["example_range"]
    data["model"]["architecture"] = {"kind": NONE, "file": None, "note": None}
    parsed = Manifest.parse(as_bytes(data), "m.json")
    assert parsed.probe is None and parsed.schedule == ""
    assert parsed.input.example_range == parsed.input.value_range
    assert parsed.model.architecture == Architecture(NONE, None, None)
