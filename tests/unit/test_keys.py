"""Cache keys and their digests, the planner's arithmetic, and safetensors headers checked
before anything is read: pure logic, no run, no server."""

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tb_microscope.execution.cache import RenderKey, ResultKey
from tb_microscope.execution.planner import Group, Settings, group_size, picture_keys
from tb_microscope.optvis.batching import BATCH_CAPS
from tb_microscope.store.local import header_version, read_header

RUN = "0" * 32
KEY = RenderKey(step=100, version="abc-10", node="conv2", unit=3, technique="channel",
                size=64, iterations=128, seed=0)  # fmt: skip


def test_a_key_digest_is_stable_and_names_a_file():
    again = RenderKey(**dataclasses.asdict(KEY))
    assert KEY.digest(RUN) == again.digest(RUN)
    assert len(KEY.digest(RUN)) == 32 and all(c in "0123456789abcdef" for c in KEY.digest(RUN))


@pytest.mark.parametrize(
    "change",
    [
        {"step": 101},
        {"version": "abd-10"},
        {"node": "conv1"},
        {"unit": 4},
        {"technique": "neuron"},
        {"size": 65},
        {"iterations": 129},
        {"seed": 1},
        {"image": 1},
        {"bands": (2, 1, 0)},
    ],
)
def test_every_field_of_a_render_key_changes_its_digest(change):
    assert dataclasses.replace(KEY, **change).digest(RUN) != KEY.digest(RUN)


def test_the_run_id_changes_every_digest_so_a_relogged_run_never_gets_old_pictures():
    assert KEY.digest(RUN) != KEY.digest("1" * 32)
    result = ResultKey("examples", "conv2", 3, (("count", 8),), ((100, "abc-10"),))
    assert result.digest(RUN) != result.digest("1" * 32)


def test_result_keys_differ_by_kind_options_and_snapshots():
    base = ResultKey("examples", "conv2", 3, (("count", 8),), ((100, "abc-10"),))
    others = [
        dataclasses.replace(base, kind="history"),
        dataclasses.replace(base, options=(("count", 9),)),
        dataclasses.replace(base, snapshots=((100, "abc-11"),)),
        dataclasses.replace(base, snapshots=((100, "abc-10"), (200, "def-10"))),
    ]
    digests = {k.digest(RUN) for k in [base, *others]}
    assert len(digests) == 5


def test_a_technique_with_several_images_per_unit_has_a_key_for_each():
    keys = Settings(technique="diversity", size=32, iterations=8).keys(5, "v", "conv1", 2)
    assert [k.image for k in keys] == [0, 1, 2, 3]
    assert len({k.digest(RUN) for k in keys}) == 4
    group = Group("src", RUN, 5, "v", "conv1", (2, 7))
    settings = Settings(technique="diversity")
    # a group's result lists each unit once per image, in order
    keys = picture_keys(group, settings, [2, 2, 2, 2, 7, 7, 7, 7])
    assert [(k.unit, k.image) for k in keys] == [(2, i) for i in range(4)] + [
        (7, i) for i in range(4)
    ]


def test_groups_hold_a_batch_of_images_whatever_the_technique():
    assert group_size("channel", "cpu", None) == BATCH_CAPS["cpu"]
    assert group_size("channel", "cuda", None) == BATCH_CAPS["cuda"]
    assert group_size("diversity", "cpu", None) == BATCH_CAPS["cpu"] // 4
    assert group_size("channel", "cpu", 5) == 5
    assert group_size("diversity", "cpu", 2) == 1  # never none


def write(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_sound_header_is_read_without_its_tensors(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, str(path),
              metadata={"tb_microscope.crc32": "0000abcd"})  # fmt: skip
    header = read_header(path)
    assert header.tensors == {"w": ("float32", (2, 3)), "b": ("bfloat16", (3,))}
    assert header.size == path.stat().st_size
    assert header_version(header, "fallback") == f"0000abcd-{header.size}"


@pytest.mark.parametrize(
    "header, data, says",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "extended"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "metadata"),
    ],
)
def test_a_bad_header_is_refused_saying_what_is_wrong(tmp_path, header, data, says):
    path = tmp_path / "bad.safetensors"
    write(path, header, data)
    with pytest.raises(ValueError, match=says):
        read_header(path)


def test_a_header_longer_than_its_file_or_a_file_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="claims"):
        read_header(path)
    path.write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="too short"):
        read_header(path)
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(64)}, str(big))
    with pytest.raises(ValueError, match="allowed"):
        read_header(big, max_bytes=100)
