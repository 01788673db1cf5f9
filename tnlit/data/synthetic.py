"""Random token sequences made in memory: for smoke runs, speed measurements and tests of the pipeline.

There is nothing to learn in them beyond what a teacher makes of them, which is all slice-wise distillation and
a timing need; they are drawn once from a seeded generator, so every run sees the same ones.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

__all__ = ["RandomTokensDataModule"]


class RandomTokensDataModule(LightningDataModule):
    """Uniformly random token ids, ``(num_sequences, seq_len)``; the test split is the first ``test_sequences``."""

    def __init__(
        self,
        num_sequences: int = 32,
        seq_len: int = 16,
        batch_size: int = 8,
        vocab_size: int = 512,
        shuffle: bool = False,
        test_sequences: int = 8,
        seed: int = 0,
    ) -> None:
        """
        Args:
            num_sequences: Train sequences (one epoch).
            seq_len: Tokens per sequence.
            batch_size: Sequences per batch (train and test).
            vocab_size: Token ids are drawn from 0 .. vocab_size - 1 (at most the model's vocabulary).
            shuffle: Reshuffle the train sequences every epoch (from torch's global generator, as Lightning seeds
                it); off, every epoch sees them in the same order.
            test_sequences: Sequences of the test split (the first train ones: a check of the pipeline, not of
                generalisation).
            seed: Seed of the tokens.
        """
        super().__init__()
        self.save_hyperparameters()
        self.num_sequences, self.seq_len, self.batch_size, self.vocab_size = (
            num_sequences,
            seq_len,
            batch_size,
            vocab_size,
        )
        self.shuffle, self.test_sequences, self.seed = shuffle, test_sequences, seed
        self.tokens: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.tokens = torch.randint(0, self.vocab_size, (self.num_sequences, self.seq_len), generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._ready(), batch_size=self.batch_size, shuffle=self.shuffle)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._ready()[: self.test_sequences], batch_size=self.batch_size)

    def _ready(self) -> torch.Tensor:
        if self.tokens is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return self.tokens
