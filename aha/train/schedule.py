"""Which training sequences each step uses, and the step counters a checkpoint keeps.

The batch order is a pure function of ``(seed, step)`` (:class:`BatchSchedule`), so a resumed run
feeds exactly the batches the uninterrupted run would have, and every process knows the token
counts of the global batch without communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from aha.data import PackedDataset
    from aha.data.passkey import PasskeyMixDataset


@dataclass
class TrainProgress:
    """Checkpointed counters: optimizer steps taken and target tokens consumed."""

    step: int = 0
    targets_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.targets_seen = int(state["step"]), int(state["targets_seen"])


class BatchSchedule:
    """Which training sequences each process uses at each step: a pure function of ``(seed, step)``.

    The sequences form an endless stream, one seeded permutation per epoch. Step ``s`` takes stream
    positions ``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * num_processes``, laid out as
    ``[grad_accum, num_processes, batch_size]``: process ``r`` uses ``[:, r, :]``.
    """

    def __init__(self, num_sequences: int, seed: int, batch_size: int, grad_accum: int, num_processes: int):
        if num_sequences < 1:
            raise ValueError("no training sequences")
        self.num_sequences = num_sequences
        self.seed = seed
        self.shape = (grad_accum, num_processes, batch_size)
        self._epoch_orders: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return int(np.prod(self.shape))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:  # keep the previous epoch: a step may straddle two
            self._epoch_orders = {e: o for e, o in self._epoch_orders.items() if e == epoch - 1}
            self._epoch_orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._epoch_orders[epoch]

    def step_indices(self, step: int) -> np.ndarray:
        """Sequence indices of step ``step``, int64 ``[grad_accum, num_processes, batch_size]``."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self._order(int(epoch))[offsets[in_epoch]]
        return indices.reshape(self.shape)


def collate(dataset: PackedDataset | PasskeyMixDataset, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
    """Stack the sequences ``indices`` of ``dataset`` into one batch on ``device``."""
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def eval_indices(seed: int, num_heldout: int, count: int) -> np.ndarray:
    """The held-out sequences evaluated during training: ``count`` of ``num_heldout``, fixed by ``seed``."""
    order = np.random.default_rng([seed, 1]).permutation(num_heldout)
    return np.sort(order[:count])
