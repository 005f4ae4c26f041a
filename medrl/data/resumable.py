"""A shuffling training DataLoader that a mid-epoch checkpoint can resume exactly.

Lightning saves and restores the ``state_dict`` of any training loader that has one, but a plain shuffled
DataLoader has none: after a resume it draws a new order and starts the epoch from its first batch, so the
run sees some items twice and others never. Here the order of epoch ``e`` is a pure function of
``(seed, e)`` (as in ``DistributedSampler``, which this sampler is, so Lightning keeps it under DDP instead
of swapping in its own), and the loader records how many batches the trainer has consumed, so a resumed
run continues with the very next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """A seeded per-epoch permutation (sharded by rank like ``DistributedSampler``) that can start mid-epoch.

    Args:
        dataset: the dataset to index.
        seed: seeds every epoch's permutation (epoch ``e`` uses ``seed + e``).
        drop_last: drop the tail that does not divide evenly among ranks.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, drop_last: bool = False) -> None:
        replicas, rank = _world()
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # a skip applies to one pass only
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A shuffling DataLoader with Lightning's ``state_dict`` / ``load_state_dict`` protocol.

    Lightning's training fetcher reads a batch ahead only from loaders without a length; this one has a
    length, so the batches it has handed out when a checkpoint is written are the batches trained on.

    Args:
        dataset: the training dataset.
        batch_size: items per batch.
        seed: seeds the order of every epoch, and the worker seeds.
        **kwargs: passed to ``DataLoader`` (``collate_fn``, ``num_workers``, ...); not ``shuffle`` or ``sampler``.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, seed: int = 0, **kwargs) -> None:
        if kwargs.pop("shuffle", None) or "sampler" in kwargs or "batch_sampler" in kwargs:
            raise ValueError("ResumableLoader makes its own shuffling sampler: pass neither shuffle nor a sampler")
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))  # worker seeds leave global RNG be
        sampler = ResumableSampler(dataset, seed=seed, drop_last=kwargs.get("drop_last", False))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._yielded = 0
        self._epoch_started = 0  # the epoch whose order the current pass follows

    def __iter__(self) -> Iterator[Any]:
        self._epoch_started = self.sampler.epoch
        self._yielded = self.sampler.skip // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch in progress and how many of its batches were trained on."""
        return {"epoch": self._epoch_started, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``state["batches"]`` batches of epoch ``state["epoch"]`` (a finished epoch: the next one)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
