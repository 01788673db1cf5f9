"""Teacher activations read back from an activation store (``tnlit.activations.store``) for slice-wise distillation.

Every batch is ``{slice name: (input, target)}`` in float32, what ``SliceDistillation`` trains on without running
the teacher. The batches are the training batches the store was built from, whole: in their stored order, or
in a new order every epoch (``shuffle``); the examples inside a batch stay together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from tnlit.activations.store import ActivationStore

__all__ = ["ActivationDataModule"]


class _StoredBatches(Dataset):
    """Item ``i`` is stored batch ``i`` (already a whole batch: the DataLoader does not batch again)."""

    def __init__(self, store: ActivationStore, slices: list[str] | None) -> None:
        self.store, self.slices = store, slices

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.store.read(index, self.slices)


class _EpochShuffle(Sampler[int]):
    """A permutation of ``n`` batch indices drawn from ``seed + epoch`` (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # A generator, so the order is drawn at the first batch: a DataLoader iterator may be made before
        # Lightning calls set_epoch (as when a run resumes from a checkpoint).
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()


class ActivationDataModule(LightningDataModule):
    """Batches ``{slice name: (input, target)}`` from a finished activation store (train split only)."""

    def __init__(
        self,
        root: str | Path,
        slices: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            root: The store's directory (see ``tnlit.activations.store.open_store``).
            slices: The slices to read (only their tensors are read from disk); None reads every slice.
            shuffle: Visit the stored batches in a new order every epoch, drawn from ``seed + epoch``; off, in the
                stored order (the order the DataModule gave when the store was built).
            seed: Seed of the batch order.
            num_workers: DataLoader worker processes reading the shards.
        """
        super().__init__()
        self.save_hyperparameters()
        # A str, not a Path: Lightning puts these in epoch checkpoints, which resuming loads weights-only.
        self.hparams.root = str(root)
        self.store: ActivationStore | None = None

    def setup(self, stage: str | None = None) -> None:
        self.store = ActivationStore(self.hparams.root)
        unknown = sorted(set(self.hparams.slices or ()) - set(self.store.slice_names))
        if unknown:
            raise ValueError(
                f"activation store {self.store.root} holds no slice {', '.join(unknown)}; "
                f"it holds {', '.join(self.store.slice_names)}"
            )

    def train_dataloader(self) -> DataLoader:
        if self.store is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        dataset = _StoredBatches(self.store, self.hparams.slices)
        sampler = _EpochShuffle(len(dataset), self.hparams.seed) if self.hparams.shuffle else None
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.hparams.num_workers)
