"""The DAPO overlong penalty: a linear penalty over the last ``buffer_len`` tokens before the limit.

``penalty = min(0, -(length - (max_response_length - buffer_len)) / buffer_len * factor)`` — 0 up to
``max_response_length - buffer_len`` tokens, then falling linearly to ``-factor`` at the limit (as
verl's DAPO reward manager). Added to the verifier reward. Off in the paper recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class OverlongConfig:
    """DAPO overlong reward shaping."""

    enable: bool = False
    """Add the penalty to the reward (the reference scripts set it where the code ignores it: off)."""
    buffer_len: int = 512
    """Tokens before ``max_response_length`` over which the penalty grows from 0 to ``-penalty_factor``."""
    penalty_factor: float = 1.0
    """Penalty at the limit."""

    def validate(self, max_response_length: int) -> None:
        if self.buffer_len <= 0:
            raise ValueError(
                f"overlong.buffer_len={self.buffer_len}: must be > 0 (set enable=false to turn it off)"
            )
        if max_response_length < self.buffer_len:
            raise ValueError(
                f"overlong.buffer_len={self.buffer_len} > max_response_length={max_response_length}; lower the buffer"
            )


def overlong_penalty(
    response_length: int, max_response_length: int, buffer_len: int = 512, penalty_factor: float = 1.0
) -> float:
    """The penalty (<= 0) for one response of ``response_length`` tokens."""
    if buffer_len <= 0:
        raise ValueError(f"buffer_len={buffer_len}: must be > 0")
    expected = max_response_length - buffer_len
    return min(-(response_length - expected) / buffer_len * penalty_factor, 0.0)


def overlong_penalties(
    response_lengths: Sequence[int], max_response_length: int, config: OverlongConfig
) -> list[float]:
    """Per-response penalties; all zeros when ``config.enable`` is False."""
    if not config.enable:
        return [0.0] * len(response_lengths)
    config.validate(max_response_length)
    return [
        overlong_penalty(n, max_response_length, config.buffer_len, config.penalty_factor)
        for n in response_lengths
    ]
