"""Deterministic, resumable batches of prompt indices.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``, so it
depends only on (seed, epoch) — not on global RNG state, the number of ranks or how far a previous
run got. The whole state is ``(epoch, position, seed)``; a checkpoint saves ``state_dict()`` and a
resumed run continues with exactly the batches the uninterrupted run would have drawn.

    sampler = PromptSampler(len(dataset), batch_size=128, seed=1)
    indices = sampler.next_batch()          # crosses epoch boundaries by itself
    ckpt["sampler"] = sampler.state_dict()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class PromptSampler:
    """Batches of ``batch_size`` prompt indices, shuffled per epoch by seed; state saved and restored.

    With ``drop_last`` (the default, as RL steps need full batches) the tail of each epoch that
    cannot fill a batch is skipped; otherwise the last batch of an epoch is short.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if drop_last and batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} > {num_samples} prompts with drop_last: no batch would ever be full; "
                "lower the batch size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The index order of ``epoch`` (a pure function of seed and epoch)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _epoch_end(self) -> int:
        if self.drop_last:
            return self.batches_per_epoch * self.batch_size
        return self.num_samples

    def next_batch(self) -> list[int]:
        """The next batch; moves to the next epoch (new order) when the current one is used up."""
        if self.position >= self._epoch_end():
            self.epoch += 1
            self.position = 0
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        end = min(self.position + self.batch_size, self._epoch_end())
        batch = self._order[self.position : end].tolist()
        self.position = end
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches of the current epoch (state advances as each batch is yielded)."""
        if self.position >= self._epoch_end():
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < self._epoch_end():
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; the dataset size must match (a changed dataset gives a different order)."""
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} prompts but the dataset has {self.num_samples}; "
                "resume with the same data files and length filter"
            )
        if not 0 <= state["position"] <= self.num_samples:
            raise ValueError(f"sampler state position={state['position']} outside [0, {self.num_samples}]")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order_epoch = -1
