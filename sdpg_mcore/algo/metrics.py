"""Per-token metrics kept as sums, counts, maxima and minima, so they aggregate exactly.

A mean of per-micro-batch means is wrong when micro-batches hold different numbers of tokens;
``MetricSums`` keeps the numerator and denominator apart until the end of the mini-batch (or step):

    acc = MetricSums()
    for mb in micro_batches:
        acc += micro_batch_metrics            # plain tensor adds, no host sync
    logged = acc.reduce(dp_cp_group)          # one all-reduce per kind, then floats

Every rank must add the same metric names (they depend on the algorithm config, never on the
data): ``reduce`` packs them by sorted name into one tensor per collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


@dataclass
class MetricSums:
    """Named running sums; ``reduce`` turns them into floats: sum/count, max, min or the plain total."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    """name -> numerator of a mean (float64 scalar)."""
    counts: dict[str, Tensor] = field(default_factory=dict)
    """name -> denominator of a mean (float64 scalar)."""
    maxes: dict[str, Tensor] = field(default_factory=dict)
    """name -> running maximum (``-inf`` when nothing was seen)."""
    mins: dict[str, Tensor] = field(default_factory=dict)
    """name -> running minimum (``+inf`` when nothing was seen)."""
    totals: dict[str, Tensor] = field(default_factory=dict)
    """name -> plain sum (e.g. the loss contributions, which already carry their normaliser)."""

    def add_mean(self, name: str, values_N: Tensor, mask_N: Tensor) -> None:
        """Accumulate the masked sum and count of ``values_N`` (a bool mask gives a fraction)."""
        v = torch.where(mask_N, _f64(values_N), torch.zeros((), dtype=torch.float64, device=values_N.device))
        self._add(self.sums, name, v.sum())
        self._add(self.counts, name, mask_N.to(torch.float64).sum())

    def add_ratio(self, name: str, numerator: Tensor | float, denominator: Tensor | float) -> None:
        """Accumulate a ready-made numerator / denominator pair (e.g. sequence counts)."""
        self._add(self.sums, name, torch.as_tensor(numerator, dtype=torch.float64))
        self._add(self.counts, name, torch.as_tensor(denominator, dtype=torch.float64))

    def add_max(self, name: str, values_N: Tensor, mask_N: Tensor) -> None:
        v = torch.where(
            mask_N, _f64(values_N), torch.full((), -math.inf, dtype=torch.float64, device=values_N.device)
        )
        m = v.max() if v.numel() else torch.tensor(-math.inf, dtype=torch.float64)
        self.maxes[name] = torch.maximum(self.maxes[name], m) if name in self.maxes else m

    def add_min(self, name: str, values_N: Tensor, mask_N: Tensor) -> None:
        v = torch.where(
            mask_N, _f64(values_N), torch.full((), math.inf, dtype=torch.float64, device=values_N.device)
        )
        m = v.min() if v.numel() else torch.tensor(math.inf, dtype=torch.float64)
        self.mins[name] = torch.minimum(self.mins[name], m) if name in self.mins else m

    def add_total(self, name: str, value: Tensor | float) -> None:
        self._add(self.totals, name, torch.as_tensor(value, dtype=torch.float64).detach())

    @staticmethod
    def _add(store: dict[str, Tensor], name: str, value: Tensor) -> None:
        value = _f64(value)
        store[name] = store[name] + value.to(store[name].device) if name in store else value

    def __iadd__(self, other: MetricSums) -> MetricSums:
        for name, v in other.sums.items():
            self._add(self.sums, name, v)
        for name, v in other.counts.items():
            self._add(self.counts, name, v)
        for name, v in other.totals.items():
            self._add(self.totals, name, v)
        for name, v in other.maxes.items():
            self.maxes[name] = torch.maximum(self.maxes[name], v) if name in self.maxes else v
        for name, v in other.mins.items():
            self.mins[name] = torch.minimum(self.mins[name], v) if name in self.mins else v
        return self

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """All-reduce over ``group`` (when torch.distributed is initialised) and return the floats.

        Means with a zero count and max/min with nothing seen come back as NaN. ``group=None``
        means the default group; without an initialised process group this is a local reduce.
        """
        mean_names, total_names = sorted(self.sums), sorted(self.totals)
        max_names, min_names = sorted(self.maxes), sorted(self.mins)
        if set(self.counts) != set(self.sums):
            raise ValueError(
                f"MetricSums: sums and counts disagree: {sorted(self.sums)} vs {sorted(self.counts)}"
            )
        device = self._device()
        summed = torch.stack(
            [self.sums[n].to(device) for n in mean_names]
            + [self.counts[n].to(device) for n in mean_names]
            + [self.totals[n].to(device) for n in total_names]
            + [torch.zeros((), dtype=torch.float64, device=device)]
        )
        maxed = torch.stack(
            [self.maxes[n].to(device) for n in max_names]
            + [-self.mins[n].to(device) for n in min_names]
            + [torch.zeros((), dtype=torch.float64, device=device)]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
        s, m = summed.tolist(), maxed.tolist()
        k = len(mean_names)
        out: dict[str, float] = {}
        for i, n in enumerate(mean_names):
            out[n] = s[i] / s[k + i] if s[k + i] > 0 else math.nan
        for i, n in enumerate(total_names):
            out[n] = s[2 * k + i]
        for i, n in enumerate(max_names):
            out[n] = m[i] if math.isfinite(m[i]) else math.nan
        for i, n in enumerate(min_names):
            v = -m[len(max_names) + i]
            out[n] = v if math.isfinite(v) else math.nan
        return out

    def _device(self) -> torch.device:
        """The accelerator if any entry lives there (NCCL needs it), else CPU."""
        for store in (self.sums, self.counts, self.totals, self.maxes, self.mins):
            for v in store.values():
                if v.device.type != "cpu":
                    return v.device
        return torch.device("cpu")
