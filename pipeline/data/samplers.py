"""Batch samplers: aspect-ratio grouped training batches and complete evaluation shards.

Both shard the data over ``num_replicas`` ranks themselves (Ray Train / torch.distributed
workers), so no ``DistributedSampler`` wrapper is needed.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data

__all__ = ["GroupedBatchSampler", "InferenceBatchSampler", "orientation_groups"]


def orientation_groups(heights: Sequence[int], widths: Sequence[int]) -> np.ndarray:
    """Group id per image: 0 for landscape/square (``w >= h``), 1 for portrait."""
    return (np.asarray(heights) > np.asarray(widths)).astype(np.int64)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Shuffled training batches of one orientation each, sharded over ranks.

    Yields lists of ``(index, seed)``: the per-sample ``seed`` drives that sample's random
    resize and flip, so a run is reproducible from ``seed`` whatever the worker count.

    Every epoch shuffles all images with ``seed + epoch``, pads the permutation to a multiple of
    ``num_replicas`` (as ``DistributedSampler``) and gives rank ``r`` every ``num_replicas``-th
    image from ``r``. Images then wait in a buffer per orientation group until ``batch_size`` of
    one group are available.

    - ``infinite=True`` (iteration-based training): epochs follow one another forever and the
      buffers carry over, so every batch is a single-orientation batch. ``start_iter`` skips
      that many batches (resuming costs index arithmetic only).
    - ``infinite=False``: one epoch per ``iter()``; call :meth:`set_epoch` before each. Each rank
      yields exactly ``len(self) = samples_per_rank // batch_size`` batches so DDP ranks stay in
      step; leftovers that do not fill a group's batch are merged into at most one mixed batch.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, infinite: bool = True, start_iter: int = 0,
                 grouping: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64) if grouping else \
            np.zeros(len(group_ids), dtype=np.int64)
        if len(self.group_ids) == 0:
            raise ValueError("GroupedBatchSampler needs at least one image")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.infinite = infinite
        self.start_iter = int(start_iter)
        self.epoch = 0
        self.samples_per_rank = math.ceil(len(self.group_ids) / self.num_replicas)
        if not infinite and self.samples_per_rank < self.batch_size:
            raise ValueError(f"{len(self.group_ids)} images over {self.num_replicas} rank(s) give "
                             f"{self.samples_per_rank} per rank, fewer than batch_size {self.batch_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the infinite sampler never stops; this is its epoch)."""
        return max(1, self.samples_per_rank // self.batch_size)

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (indices, per-sample seeds) for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.group_ids)
        perm = rng.permutation(n)
        seeds = rng.integers(0, 2**63 - 1, size=n)  # drawn for all ranks alike
        total = self.samples_per_rank * self.num_replicas
        if total > n:
            reps = math.ceil(total / n)
            perm = np.tile(perm, reps)[:total]
            seeds = np.tile(seeds, reps)[:total]
        return perm[self.rank::self.num_replicas], seeds[self.rank::self.num_replicas]

    def _batches(self, epochs: Iterator[int]) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        for epoch in epochs:
            idx, seeds = self._epoch_samples(epoch)
            for i, s in zip(idx.tolist(), seeds.tolist()):
                buf = buffers.setdefault(int(self.group_ids[i]), [])
                buf.append((i, s))
                if len(buf) == self.batch_size:
                    yield list(buf)
                    buf.clear()
            if not self.infinite:
                # Merge the leftovers of all groups into full batches (at most one mixed batch).
                rest = [x for g in sorted(buffers) for x in buffers[g]]
                for k in range(len(rest) // self.batch_size):
                    yield rest[k * self.batch_size:(k + 1) * self.batch_size]
                return

    def __iter__(self):
        if self.infinite:
            def epochs():
                e = self.epoch
                while True:
                    yield e
                    e += 1
            it = self._batches(epochs())
            for _ in range(self.start_iter):
                next(it)
            yield from it
        else:
            yield from self._batches(iter([self.epoch]))


class InferenceBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches in dataset order; rank ``r`` gets a contiguous block of images.

    The ranks' blocks partition the dataset, so every image is seen exactly once overall (no
    padding duplicates, unlike ``DistributedSampler``); ranks may get one image more or less.
    """

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        bounds = np.linspace(0, num_samples, num_replicas + 1).round().astype(int)
        self.indices = list(range(bounds[rank], bounds[rank + 1]))
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for k in range(0, len(self.indices), self.batch_size):
            yield self.indices[k:k + self.batch_size]
