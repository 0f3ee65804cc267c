"""Statistics of benchmark results."""

import math
import statistics

import pytest

from sdpg_mcore.bench.stats import paired_difference, standard_error, trailing_mean


def test_smooth_is_trailing_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([1.0, 2.0], 1) == [1.0, 2.0]


def test_standard_error_of_the_mean():
    values = [0.1, 0.4, 0.2, 0.7]
    assert standard_error(values) == pytest.approx(statistics.stdev(values) / 2)
    assert math.isnan(standard_error([0.3]))


def test_paired_difference_is_per_seed():
    d = paired_difference([0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    assert d["per_seed"] == pytest.approx([0.3, 0.1, -0.1])
    assert d["mean"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(statistics.stdev([0.3, 0.1, -0.1]) / math.sqrt(3))
    assert not d["all_positive"]
    assert paired_difference([0.2], [0.1])["all_positive"]
    partial = paired_difference([0.5, math.nan, 0.4], [0.2, 0.1, 0.2])  # a seed not run: left out
    assert partial["num_paired"] == 2 and partial["mean"] == pytest.approx(0.25)
    assert not partial["all_positive"] and math.isnan(partial["per_seed"][1])
    with pytest.raises(ValueError, match="length"):
        paired_difference([0.1, 0.2], [0.1])
