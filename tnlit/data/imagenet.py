"""ImageNet (ILSVRC-2012) as a LightningDataModule: torchvision's ImageFolder over a root with train/ and val/.

The layout is the usual one, one folder per class (the WordNet ids, ``n01440764``, ...) in both splits::

    root/train/<class>/*.JPEG
    root/val/<class>/*.JPEG

Transforms are the standard ones of torchvision's reference recipe (and of its IMAGENET1K_V1 weights): train,
RandomResizedCrop(224) and a horizontal flip; val, Resize(256) then CenterCrop(224); both normalised with the
ImageNet channel statistics. The val folder is the test split (the 50k validation images, where ImageNet top-1 is
reported); ``val_size`` train images can be held out (seeded) as a validation split of their own.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset, Subset

from tnlit.data.splits import ImageLoaders, held_out_split

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageLoaders, LightningDataModule):
    """ImageNet from an ImageFolder root (train/ and val/), with the standard 224x224 transforms."""

    def __init__(
        self,
        root: Path = Path("data/imagenet"),
        batch_size: int = 64,
        train_size: int | None = None,
        val_size: int = 0,
        image_size: int = 224,
        resize_size: int = 256,
        seed: int = 0,
        num_workers: int = 8,
        eval_batch_size: int | None = None,
    ) -> None:
        """
        Args:
            root: The folder holding ``train/<class>/*`` and ``val/<class>/*`` (ImageFolder layout).
            batch_size: Train images per batch.
            train_size: Train on a seeded subset of this many train images; None: all not held out.
            val_size: Train images held out (seeded) as the validation split; 0: the val folder validates.
            image_size: Side of the crops (224 is the standard; smaller only to test quickly).
            resize_size: Shorter side the val images are resized to before the center crop (256 for 224).
            seed: Seed of the held-out split and of the train subset.
            num_workers: DataLoader worker processes (JPEG decoding needs several).
            eval_batch_size: Images per batch of val and test; None: batch_size.
        """
        super().__init__()
        self.save_hyperparameters()
        self.root, self.batch_size, self.train_size, self.val_size = Path(root), batch_size, train_size, val_size
        self.image_size, self.resize_size, self.seed, self.num_workers = image_size, resize_size, seed, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.classes: list[str] = []
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def prepare_data(self) -> None:
        """Check the layout (ImageNet cannot be downloaded: its licence asks for a login)."""
        for split in ("train", "val"):
            folder = self.root / split
            if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
                raise FileNotFoundError(
                    f"imagenet: {folder} is missing or has no class folders. Give data.init_args.root a folder with "
                    "train/<class>/*.JPEG and val/<class>/*.JPEG (the validation images sorted into class folders, "
                    "e.g. by the valprep.sh script of torchvision's reference scripts)"
                )

    def transforms(self, train: bool) -> torch.nn.Module:
        """The standard transforms: RandomResizedCrop + flip for training; Resize + CenterCrop otherwise."""
        from torchvision.transforms import v2

        head = (
            [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        )
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return v2.Compose([v2.ToImage(), *head, *tail])

    def setup(self, stage: str | None = None) -> None:
        """Index the folders and cut the splits (the same ones for every stage)."""
        if self.train_dataset is not None:
            return
        self.prepare_data()
        from torchvision.datasets import ImageFolder

        train = ImageFolder(str(self.root / "train"), transform=self.transforms(train=True))
        # The held-out images are train/ read without augmentation: a shallow copy shares the index (1.28M paths
        # scanned once), with the eval transform.
        held = copy.copy(train)
        held.transform = self.transforms(train=False)
        test = ImageFolder(str(self.root / "val"), transform=self.transforms(train=False))
        if test.classes != train.classes:
            raise ValueError(
                f"imagenet: {self.root}/train and {self.root}/val hold different class folders "
                f"({len(train.classes)} and {len(test.classes)}): the labels would not match"
            )
        self.classes = train.classes
        pool, val = held_out_split(len(train), self.val_size, self.train_size, self.seed)
        self.train_dataset = Subset(train, _ints(pool))
        self.val_dataset = Subset(held, _ints(val)) if self.val_size else test
        self.test_dataset = test


def _ints(indices: Tensor) -> list[int]:
    return indices.tolist()
