"""CIFAR-10 and CIFAR-100 as LightningDataModules, read from the pickled batches torchvision downloads.

The files are read directly (``cifar-10-batches-py/data_batch_1..5, test_batch``; ``cifar-100-python/train,
test``) and held in memory as uint8 tensors (150 MB for the 50k train images), so no PIL decode runs per image.
torchvision is used only to download them, in ``prepare_data`` and only when ``download`` is true: offline, a
missing directory is an error that names it.

Splits, all fixed by ``seed``: ``val_size`` images are held out of the 50k train images (the held-out split of the
sensitivity sweep; 0 holds none and validates on the test set, the usual CIFAR practice when training a teacher on
all 50k); ``train_size`` images are drawn from the rest (the paper's 10k / 30k / 50k); the test split is the
10k test images.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset

from tnlit.data.splits import ImageLoaders, held_out_split

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule", "CIFARImages", "write_made_cifar"]


class CIFARImages(Dataset):
    """uint8 images (N, 3, 32, 32) and labels in memory; float, normalised images out.

    With ``augment``: the standard CIFAR augmentation, a random 32x32 crop of the image zero-padded by 4 pixels,
    then a horizontal flip with probability 1/2 (torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip).
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, augment: bool = False) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = (self.images[index].float() / 255 - self.mean) / self.std
        if self.augment:
            # Padding after normalising with zeros would pad with the mean colour; pad the 0..1 image's black instead.
            pad = (0 - self.mean) / self.std
            padded = F.pad(image - pad, (4, 4, 4, 4)) + pad
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index]


class CIFARDataModule(ImageLoaders, LightningDataModule):
    """CIFAR-10 or CIFAR-100 (``name``); use :class:`CIFAR10DataModule` / :class:`CIFAR100DataModule` in configs."""

    name: ClassVar[str] = "cifar10"
    num_classes: ClassVar[int] = 10
    folder: ClassVar[str] = "cifar-10-batches-py"
    archive: ClassVar[str] = "cifar-10-python.tar.gz"
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    label_key: ClassVar[bytes] = b"labels"
    # The train set's channel statistics (the values every CIFAR recipe uses), fixed so that a train subset does not
    # change the normalisation a teacher was trained with.
    mean: ClassVar[tuple[float, float, float]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, float, float]] = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        root: Path = Path("data"),
        batch_size: int = 128,
        train_size: int | None = None,
        val_size: int = 5000,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 4,
        download: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        """
        Args:
            root: The folder that holds (or will hold, with ``download``) ``cifar-10-batches-py`` /
                ``cifar-100-python``, as torchvision lays them out.
            batch_size: Train images per batch (the paper: 8 for slice-wise distillation, 64 for global finetuning).
            train_size: Train on a seeded subset of this many images (the paper's 10000 / 30000 / 50000); None: all
                the train images not held out for validation.
            val_size: Train images held out (seeded) as the validation split; 0: none, the test set validates.
            augment: Random crop (padding 4) and horizontal flip of train images; val and test are never augmented.
            seed: Seed of the held-out split and of the train subset.
            num_workers: DataLoader worker processes.
            download: Let ``prepare_data`` download the data into ``root`` when it is missing (torchvision).
            eval_batch_size: Images per batch of val and test; None: the larger of batch_size and 256.
        """
        super().__init__()
        self.save_hyperparameters()
        self.root, self.batch_size, self.train_size, self.val_size = Path(root), batch_size, train_size, val_size
        self.augment, self.seed, self.num_workers, self.download = augment, seed, num_workers, download
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.indices: dict[str, Tensor] = {}  # rows of the train file set in the train / val split, after setup()
        self.train_dataset: CIFARImages | None = None
        self.val_dataset: CIFARImages | None = None
        self.test_dataset: CIFARImages | None = None

    @property
    def directory(self) -> Path:
        """Where the pickled batches are expected."""
        return self.root / self.folder

    def prepare_data(self) -> None:
        """Download the data when it is missing and ``download`` is on; otherwise say where it was expected."""
        missing = [f for f in (*self.train_files, *self.test_files) if not (self.directory / f).is_file()]
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(
                f"{self.name}: {self.directory} lacks {', '.join(missing)}. Put torchvision's {self.folder} folder "
                f"under {self.root} (tar xzf {self.archive} -C {self.root}), or set download: true "
                "(data.init_args.download) where the network is reachable"
            )
        import torchvision

        dataset = torchvision.datasets.CIFAR10 if self.num_classes == 10 else torchvision.datasets.CIFAR100
        dataset(str(self.root), train=True, download=True)

    def _read(self, files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: {path} is missing (see prepare_data / download)")
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[self.label_key], dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    def setup(self, stage: str | None = None) -> None:
        """Read the files and cut the splits (all at once, so that every stage sees the same ones)."""
        if self.train_dataset is not None:
            return
        images, labels = self._read(self.train_files)
        pool, val = held_out_split(len(labels), self.val_size, self.train_size, self.seed)
        self.indices = {"train": pool, "val": val}
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        self.train_dataset = CIFARImages(images[pool], labels[pool], mean, std, augment=self.augment)
        test_images, test_labels = self._read(self.test_files)
        self.test_dataset = CIFARImages(test_images, test_labels, mean, std)
        self.val_dataset = CIFARImages(images[val], labels[val], mean, std) if self.val_size else self.test_dataset


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50k train / 10k test 32x32 images of 10 classes (``root/cifar-10-batches-py``)."""


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50k train / 10k test 32x32 images of 100 classes, fine labels (``root/cifar-100-python``)."""

    name = "cifar100"
    num_classes = 100
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


def write_made_cifar(root: Path, name: str = "cifar10", train: int = 100, test: int = 50, seed: int = 0) -> Path:
    """Write made (random) data in CIFAR's real on-disk layout under ``root``, for tests and smoke runs offline.

    Each class is a colour with noise around it, so that a network learns something from a few images. CIFAR-10:
    ``cifar-10-batches-py/data_batch_1..5`` (``train`` images split across them), ``test_batch``, ``batches.meta``;
    CIFAR-100: ``cifar-100-python/train``, ``test``, ``meta``. Returns the data's folder.
    """
    module = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule}[name]
    folder = Path(root) / module.folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (module.num_classes, 3, 1, 1), generator=generator)

    def batch(n: int) -> dict[bytes, object]:
        labels = torch.randint(0, module.num_classes, (n,), generator=generator)
        noise = torch.randint(-40, 41, (n, 3, 32, 32), generator=generator)
        images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
        return {b"data": images.view(n, -1).numpy(), module.label_key: labels.tolist()}

    def dump(path: Path, content: dict) -> None:
        with path.open("wb") as f:
            pickle.dump(content, f)

    if name == "cifar10":
        parts = [len(c) for c in torch.arange(train).chunk(5)]
        for i, n in enumerate(parts, 1):
            dump(folder / f"data_batch_{i}", batch(n))
        dump(folder / "test_batch", batch(test))
        dump(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    else:
        dump(folder / "train", batch(train))
        dump(folder / "test", batch(test))
        dump(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)]})
    return folder
