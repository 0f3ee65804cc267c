"""Response lengths of one RL step: a mean, a cap, and the share of responses the cap cuts off.

Generation time is set by the *longest* response of the step (every engine waits for it), and decode
speed by how many sequences are still running, so a mean alone is not enough. Lengths of RL responses
are long-tailed: most stop early, a few run to ``max_response_length``. The model here: a share
``truncated`` of the responses hits the cap; the rest are exponential (the memoryless tail of "stop
with the same small probability at every token"), cut at the cap, with the scale that makes the
overall mean right. ``truncated`` is a property of the run (RL reports it as the clip ratio); 2 % is
the default when it is not known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TRUNCATED = 0.02


@dataclass(frozen=True)
class ResponseLengths:
    """Mean ``mean``, cap ``cap``; a share ``truncated`` ends at the cap (module docstring)."""

    mean: float
    cap: int
    truncated: float = DEFAULT_TRUNCATED

    def __post_init__(self) -> None:
        if not 0 < self.mean <= self.cap:
            raise ValueError(f"mean response length {self.mean} must be in (0, cap={self.cap}]")
        if not 0 <= self.truncated <= 1:
            raise ValueError(f"truncated share {self.truncated} must be in [0, 1]")
        if self.truncated == 1 and self.mean != self.cap:
            raise ValueError("a truncated share of 1 means every response has the cap's length: mean = cap")

    @classmethod
    def fixed(cls, length: int) -> ResponseLengths:
        """Every response exactly ``length`` tokens (a benchmark's synthetic batch)."""
        return cls(mean=length, cap=length, truncated=1.0)

    @property
    def _share(self) -> float:
        """The capped share actually used: no more than the mean allows (half of ``mean / cap``)."""
        return 1.0 if self.truncated == 1 else min(self.truncated, 0.5 * self.mean / self.cap)

    @property
    def scale(self) -> float:
        """Mean of the exponential part (before the cap), solved so the overall mean is ``mean``."""
        c, cap = self._share, self.cap
        if c == 1:
            return math.inf
        target = (self.mean - c * cap) / (1 - c)  # E[min(X, cap)] for the uncapped share
        lo, hi = 1e-9, 1e9
        for _ in range(200):  # E[min(X, cap)] = s (1 - exp(-cap / s)) rises with s
            mid = math.sqrt(lo * hi)
            if mid * -math.expm1(-cap / mid) < target:
                lo = mid
            else:
                hi = mid
        return math.sqrt(lo * hi)

    def survival(self, t: float) -> float:
        """Share of responses still generating after ``t`` tokens."""
        if t >= self.cap:
            return 0.0
        c = self._share
        return c + (1 - c) * math.exp(-t / self.scale)

    def mean_square(self) -> float:
        """``E[L^2]`` (attention cost and the KV context of running sequences grow with it)."""
        c, cap, s = self._share, self.cap, self.scale
        if c == 1:
            return float(cap * cap)
        tail = math.exp(-cap / s)
        exp_part = 2 * s * s * (1 - tail * (1 + cap / s)) + cap * cap * tail
        return c * cap * cap + (1 - c) * exp_part

    def longest_expected(self, count: int) -> float:
        """Expected longest of ``count`` responses (``E[max] = integral of P(max > t)``): the cap once
        a capped response is likely among them."""
        stride = max(1.0, self.cap / 1024)
        total, t = 0.0, 0.0
        while t < self.cap:
            total += (1 - (1 - self.survival(t)) ** count) * min(stride, self.cap - t)
            t += stride
        return total
