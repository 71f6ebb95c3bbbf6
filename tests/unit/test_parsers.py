"""Parsers and checks of what users type: render settings, step and unit lists, error lines."""

import pytest

import tb_microscope
from tb_microscope.cli.common import parse_indexes
from tb_microscope.errors import first_line, summarize
from tb_microscope.limits import SettingError, check_iterations, check_size


@pytest.mark.parametrize("size", [8, 128, 1024])
def test_sizes_within_bounds_are_taken(size):
    assert check_size(size) == size


@pytest.mark.parametrize("size", [7, 1025, 0, -1, 64.0, True, "64", None])
def test_sizes_out_of_bounds_or_not_whole_numbers_are_refused_naming_the_flag(size):
    with pytest.raises(SettingError, match=rf"^--size must be .* from 8 to 1024, got {size!r}$"):
        check_size(size, "--size")


def test_iterations_are_checked_like_sizes():
    assert check_iterations(1) == 1 and check_iterations(100_000) == 100_000
    for bad in (0, 100_001, 2.5):
        with pytest.raises(ValueError, match="iterations must be a whole number from 1 to 100000"):
            check_iterations(bad)


def test_steps_and_units_take_numbers_ranges_and_open_ranges():
    assert parse_indexes("0-2,5,7-", 10, "units") == [0, 1, 2, 5, 7, 8, 9]
    assert parse_indexes("8-20,3,3", 10, "units") == [8, 9, 3]  # never past the limit, once each
    assert parse_indexes("all", 3, "steps") == [0, 1, 2]
    for bad in ("-3", "2-x", "1,,2", "five"):
        with pytest.raises(tb_microscope.MicroscopeError, match=f"got '{bad}'"):
            parse_indexes(bad, 10, "steps")


def test_an_error_in_one_line_names_its_type_and_first_line():
    assert first_line(ValueError("bad size\ntraceback lines")) == "ValueError: bad size"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(RuntimeError("x" * 1000))) == 300


def test_long_lists_of_names_are_summarized_with_their_count():
    names = [f"layer{i}" for i in range(20)]
    assert summarize(names[:3]) == "layer0, layer1, layer2"
    assert summarize(names, 4) == "layer0, layer1 … layer18, layer19 (20 in all)"
