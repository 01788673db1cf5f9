"""What the image DataModules share: a seeded held-out split with a training subset, and their loaders."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageLoaders", "held_out_split"]


def held_out_split(n: int, val_size: int, train_size: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``(train, val)`` indices into ``n`` training examples: ``val_size`` held out by a permutation seeded with
    ``seed``, then, when ``train_size`` is given, a subset of the rest drawn with ``seed + 1``. The separate
    generator keeps the held-out examples where they are, and makes the 10k subset the start of the 30k one."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in 0..{n - 1}, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, pool = order[:val_size], order[val_size:]
    if train_size is not None:
        if not 0 < train_size <= len(pool):
            raise ValueError(
                f"train_size must be in 1..{len(pool)} ({n} train examples, {val_size} held out), got {train_size}"
            )
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))
        pool = pool[pick[:train_size]]
    return pool, val


class ImageLoaders:
    """Train / val / test loaders of a DataModule that sets ``train_dataset``, ``val_dataset``, ``test_dataset``,
    ``batch_size``, ``eval_batch_size`` and ``num_workers``."""

    train_dataset: Dataset | None
    val_dataset: Dataset | None
    test_dataset: Dataset | None
    batch_size: int
    eval_batch_size: int
    num_workers: int

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
