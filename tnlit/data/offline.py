"""Data that ships inside Python packages, for the embedded quickstart: nothing downloads, ever.

- ``DigitsDataModule``: scikit-learn's 1797 handwritten 8x8 digits, upsampled to CIFAR's 32x32x3 layout, so
  the CIFAR ResNet-34 topology (and every CIFAR config) runs on it unchanged.
- ``PydocTextDataModule``: the standard library's ``pydoc_data.topics`` (about 466 KB of English prose and
  Python code), read as UTF-8 bytes: the 256 byte values are the vocabulary, so no tokenizer is downloaded.

Both splits are fixed functions of the data and the seed, so a teacher trained here and the students distilled
from it later see the same train / val / test examples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DigitsDataModule",
    "PydocTextDataModule",
    "RandomWindows",
    "TokenWindows",
    "decode_bytes",
    "encode_bytes",
    "pydoc_text",
]

# --------------------------------------------------------------------------------------------- images


class _ImageDataset(Dataset):
    """Images and labels held in memory; ``shift > 0`` moves each image by up to that many pixels (train only)."""

    def __init__(self, images: Tensor, labels: Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.shift:
            # Pad by repeating the border (background) and crop back at a random offset: a shift of -s..s pixels.
            s = self.shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            padded = F.pad(image[None], (s, s, s, s), mode="replicate")[0]
            image = padded[:, dy : dy + image.shape[-2], dx : dx + image.shape[-1]]
        return image, self.labels[index]


class DigitsDataModule(LightningDataModule):
    """scikit-learn's bundled digits as a small CIFAR-shaped image classification task (10 classes).

    The 8x8 images are upsampled to ``image_size`` by bilinear interpolation, repeated to 3 channels and normalised
    to zero mean and unit variance with statistics of the train split. The 1797 images are split once, by a
    permutation seeded with ``seed``, into 1297 train / 200 val / 300 test images.
    """

    num_classes: int = 10
    split_sizes: tuple[int, int, int] = (1297, 200, 300)

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        train_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        """
        Args:
            batch_size: Images per batch (train, val and test).
            image_size: Side of the square images after upsampling from 8x8 (32 matches CIFAR).
            train_size: Train on a seeded subset of this many of the 1297 train images (the analogue of the
                paper's 10k / 30k / 50k training images); None uses all of them.
            seed: Seed of the train / val / test split and of the train subset.
            num_workers: DataLoader worker processes (0 loads in the main process, fastest for data this small).
            augment: Shift train images randomly by up to 2 pixels each time they are drawn.
        """
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.train_size = batch_size, image_size, train_size
        self.seed, self.num_workers, self.augment = seed, num_workers, augment
        self.indices: dict[str, Tensor] = {}  # rows of load_digits() in each split, after setup()
        self.train_dataset: _ImageDataset | None = None
        self.val_dataset: _ImageDataset | None = None
        self.test_dataset: _ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits at once (it takes milliseconds), so that any stage sees the same ones."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits  # the data ships inside scikit-learn: no download

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1).contiguous()

        n_train, n_val, n_test = self.split_sizes
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
        assert len(test) == n_test, "scikit-learn's digits changed size"
        if self.train_size is not None:
            if not 0 < self.train_size <= n_train:
                raise ValueError(f"train_size must be in 1..{n_train}, got {self.train_size}")
            # A separate generator, so the subset does not move the val / test split.
            pick = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed + 1))
            train = train[pick[: self.train_size]]

        self.indices = {"train": train, "val": val, "test": test}
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_dataset = _ImageDataset(images[train], labels[train], shift=2 if self.augment else 0)
        self.val_dataset = _ImageDataset(images[val], labels[val])
        self.test_dataset = _ImageDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------- text


def pydoc_text() -> str:
    """The standard library's pydoc topics (79 of them), joined by blank lines in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def encode_bytes(text: str) -> Tensor:
    """Text -> its UTF-8 bytes as token ids (LongTensor of values 0..255)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode_bytes(ids: Tensor | list[int]) -> str:
    """Token ids -> text; a byte sequence cut inside a multi-byte character decodes to U+FFFD, not an error."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


class TokenWindows(Dataset):
    """Windows of ``seq_len`` tokens of a stream; window ``i`` starts at token ``i * stride``."""

    def __init__(self, tokens: Tensor, seq_len: int, stride: int) -> None:
        if len(tokens) < seq_len:
            raise ValueError(f"a split of {len(tokens)} tokens is shorter than seq_len={seq_len}")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len) // self.stride + 1

    def __getitem__(self, index: int) -> Tensor:
        start = index * self.stride
        return self.tokens[start : start + self.seq_len]


class RandomWindows(Sampler[int]):
    """``num_samples`` window indices drawn uniformly with replacement, reseeded from (seed, epoch) every epoch.

    Lightning calls ``set_epoch`` at the start of each epoch, so every epoch sees fresh windows and a rerun with
    the same seed sees the same ones.
    """

    def __init__(self, num_windows: int, num_samples: int, seed: int) -> None:
        self.num_windows, self.num_samples, self.seed, self.epoch = num_windows, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randint(self.num_windows, (self.num_samples,), generator=generator).tolist()


class PydocTextDataModule(LightningDataModule):
    """Byte-level language modelling on the standard library's pydoc topics (about 466 KB, vocabulary 256).

    The byte stream is cut into contiguous ranges: the first 90% for training, the next 5% for validation, the
    last 5% for test. Batches are LongTensors (batch_size, seq_len) of token ids; train with HF's
    ``labels=input_ids`` convention (the model shifts the labels itself).
    """

    vocab_size: int = 256
    split_fractions: tuple[float, float, float] = (0.90, 0.05, 0.05)

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        train_sequences: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            seq_len: Tokens (bytes) per sequence.
            batch_size: Sequences per batch (train, val and test).
            train_sequences: Random train windows per epoch; None draws as many as fit in the train split
                without overlap (len(train) // seq_len).
            seed: Seed of the random train windows (each epoch reseeds from seed and epoch).
            num_workers: DataLoader worker processes (0 loads in the main process, fastest for data this small).
        """
        super().__init__()
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.train_sequences = seq_len, batch_size, train_sequences
        self.seed, self.num_workers = seed, num_workers
        self.train_tokens: Tensor | None = None
        self.val_tokens: Tensor | None = None
        self.test_tokens: Tensor | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self.test_dataset: TokenWindows | None = None

    encode = staticmethod(encode_bytes)
    decode = staticmethod(decode_bytes)

    def setup(self, stage: str | None = None) -> None:
        """Split the byte stream and build the windows (milliseconds; all stages see the same splits)."""
        if self.train_dataset is not None:
            return
        tokens = encode_bytes(pydoc_text())
        n = len(tokens)
        end_train = round(n * self.split_fractions[0])
        end_val = round(n * (self.split_fractions[0] + self.split_fractions[1]))
        self.train_tokens, self.val_tokens = tokens[:end_train], tokens[end_train:end_val]
        self.test_tokens = tokens[end_val:]
        # Train windows may start at any token (stride 1, drawn by the sampler); val / test windows do not overlap.
        self.train_dataset = TokenWindows(self.train_tokens, self.seq_len, stride=1)
        self.val_dataset = TokenWindows(self.val_tokens, self.seq_len, stride=self.seq_len)
        self.test_dataset = TokenWindows(self.test_tokens, self.seq_len, stride=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        dataset = self._ready(self.train_dataset)
        count = self.train_sequences or len(self.train_tokens) // self.seq_len
        sampler = RandomWindows(len(dataset), count, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._ready(self.val_dataset), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._ready(self.test_dataset), batch_size=self.batch_size, num_workers=self.num_workers)

    @staticmethod
    def _ready(dataset: TokenWindows | None) -> TokenWindows:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset
