"""Which files the render cache owns: the disk budget counts and deletes only these (names the
cache writes, in the folders it writes them to); pure logic, no run, no server."""

import pytest

from tb_microscope.execution.cache import RenderKey, ResultKey, is_cache_file

DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "path",
    [
        f"/cache/run/step-3/{DIGEST}.png",
        f"step-1200/{DIGEST}.png",
        f"results/{DIGEST}.json",
        f"results/{DIGEST}.npz",
        f"results/{DIGEST}.png",  # an atlas's picture
    ],
)
def test_a_digest_with_its_kind_in_a_step_or_results_folder_is_the_caches(path):
    assert is_cache_file(path)


@pytest.mark.parametrize(
    "path",
    [
        "step-3/notes.png",  # someone's picture
        "results/other.json",
        f"{DIGEST}.png",  # at a cache's root: the cache never writes there
        f"pictures/{DIGEST}.png",  # another folder
        f"step-x/{DIGEST}.png",
        f"step-/{DIGEST}.png",
        f"results/{DIGEST.upper()}.json",  # the cache writes lower case
        f"results/{DIGEST[:-1]}.json",  # 31 digits
        f"results/{DIGEST}0.json",  # 33
        f"results/{DIGEST}.json.bak",
        f"results/{DIGEST}.txt",
        f"results/{DIGEST}.PNG",
        f"results/.{DIGEST}.png",
        f"step-3/.tmp-123-4/{DIGEST}.png",  # a write's staging folder
        "step-3/.write-test-abc",
    ],
)
def test_any_other_file_is_not_the_caches(path):
    assert not is_cache_file(path)


def test_the_names_the_cache_gives_its_files_are_its_own(tmp_path):
    """What `RenderCache` writes passes the filter that the budget applies (the two agree)."""
    from tb_microscope.execution.cache import CACHE, RESULTS

    key = RenderKey(step=7, version="v-1", node="conv", unit=1, technique="channel", size=8,
                    iterations=1, seed=0)  # fmt: skip
    result = ResultKey("examples", "conv", 1, (("count", 8),), ((7, "v-1"),))
    run = "f" * 32
    assert is_cache_file(tmp_path / CACHE / f"step-{key.step}" / f"{key.digest(run)}.png")
    for suffix in (".json", ".png", ".npz"):
        assert is_cache_file(tmp_path / CACHE / RESULTS / f"{result.digest(run)}{suffix}")
