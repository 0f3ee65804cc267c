"""The DAPO overlong penalty against its formula."""

import pytest

from sdpg_mcore.rewards import OverlongConfig, overlong_penalties, overlong_penalty


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (3584, 0.0), (3585, -1 / 512), (3840, -0.5), (4096, -1.0), (4608, -2.0)],
)
def test_linear_penalty_over_the_buffer(length, expected):
    assert overlong_penalty(length, 4096, buffer_len=512, penalty_factor=1.0) == pytest.approx(expected)


def test_factor_config_and_disabled():
    assert overlong_penalty(4096, 4096, 512, penalty_factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalties([10, 4096], 4096, OverlongConfig()) == [0.0, 0.0]
    got = overlong_penalties([3584, 3840, 4096], 4096, OverlongConfig(enable=True))
    assert got == pytest.approx([0.0, -0.5, -1.0])


def test_invalid_config():
    with pytest.raises(ValueError, match="overlong.buffer_len=1024 > max_response_length=512"):
        overlong_penalties([1], 512, OverlongConfig(enable=True, buffer_len=1024))
    with pytest.raises(ValueError, match="buffer_len=0"):
        overlong_penalty(1, 512, buffer_len=0)
