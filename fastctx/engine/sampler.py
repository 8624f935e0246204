"""Samplers whose order is a pure function of (seed, position): exact resume and DDP sharding.

The training sampler yields batches of `(index, seed)` pairs; fastctx datasets
take `ds[(index, seed)]` and draw every random augmentation from that seed, so
neither DataLoader worker timing nor worker count can change what a batch is.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["TrainBatchSampler", "ShardSampler", "collate_samples"]


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless epoch-shuffled batches of (dataset index, augmentation seed) for one process.

    Epoch e draws, from `np.random.default_rng([seed, e])`, a permutation of the
    dataset and one augmentation seed per image. The epoch is cut into global
    batches of `batch_size * world_size` images (the tail that does not fill a
    global batch is dropped); process `rank` takes the rank-th contiguous
    `batch_size` slice of each, so the ranks' batches concatenated in rank order
    are exactly the batch one process with the global batch size would see.
    `start_batch` skips that many of this process's batches (resume).
    """

    def __init__(self, dataset_size: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise ValueError(f"the training set has {dataset_size} images, fewer than one global batch of "
                             f"{global_batch} ({batch_size} per process x {world_size} processes)")
        self.dataset_size, self.batch_size, self.world_size, self.rank = dataset_size, batch_size, world_size, rank
        self.seed, self.shuffle, self.start_batch = seed, shuffle, start_batch
        self.batches_per_epoch = dataset_size // global_batch

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices in visiting order, augmentation seed per dataset index) of `epoch`."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.dataset_size) if self.shuffle else np.arange(self.dataset_size)
        seeds = rng.integers(0, 2 ** 31 - 1, size=self.dataset_size)
        return order, seeds

    def batch(self, position: int) -> list[tuple[int, int]]:
        """This process's `position`-th batch (0-based, counted from the start of training)."""
        epoch, within = divmod(position, self.batches_per_epoch)
        return self._take(*self.epoch_order(epoch), within)

    def _take(self, order: np.ndarray, seeds: np.ndarray, within: int) -> list[tuple[int, int]]:
        start = (within * self.world_size + self.rank) * self.batch_size
        return [(int(i), int(seeds[i])) for i in order[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position, cached_epoch, order, seeds = self.start_batch, None, None, None
        while True:
            epoch, within = divmod(position, self.batches_per_epoch)
            if epoch != cached_epoch:
                (order, seeds), cached_epoch = self.epoch_order(epoch), epoch
            yield self._take(order, seeds, within)
            position += 1

    def state_dict(self, batches_consumed: int) -> dict:
        """What a checkpoint records: enough to rebuild the sampler at `batches_consumed`."""
        return dict(seed=self.seed, shuffle=self.shuffle, dataset_size=self.dataset_size,
                    batch_size=self.batch_size, world_size=self.world_size, batches_consumed=batches_consumed)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... of a dataset, in order, without padding.

    Evaluation sums per-class pixel counts over processes, so every image must
    be seen exactly once: no padding to equal shard sizes.
    """

    def __init__(self, dataset_size: int, world_size: int = 1, rank: int = 0):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_samples(samples: list[dict]) -> dict:
    """Batch dataset samples: `img` and `label` stacked, `name` and `ori_shape` kept as lists."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(s["img"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"images of one batch must have one size (train crops are fixed), got {sorted(shapes)}")
    batch = {
        "img": torch.stack([s["img"] for s in samples]),
        "label": torch.stack([torch.as_tensor(s["label"]) for s in samples]),
        "name": [s.get("name", "") for s in samples],
        "ori_shape": [tuple(int(v) for v in s["ori_shape"]) if "ori_shape" in s else tuple(s["label"].shape)
                      for s in samples],
    }
    return batch
