"""CIFAR-10/100 and ImageNet DataModules on made data in the real on-disk layout; the ResNet-34 table models."""

import pickle

import numpy as np
import pytest
import torch

from tnlit.data.cifar import CIFAR10DataModule, CIFAR100DataModule, write_made_cifar
from tnlit.data.imagenet import ImageNetDataModule


@pytest.mark.parametrize(
    ("module", "name", "classes"), [(CIFAR10DataModule, "cifar10", 10), (CIFAR100DataModule, "cifar100", 100)]
)
def test_cifar_reads_the_pickled_batches_and_cuts_seeded_splits(tmp_path, module, name, classes):
    folder = write_made_cifar(tmp_path, name, train=100, test=30)
    expected = {
        "cifar10": {"data_batch_1", "data_batch_5", "test_batch", "batches.meta"},
        "cifar100": {"train", "test", "meta"},
    }[name]
    assert expected <= {p.name for p in folder.iterdir()}
    data = module(root=tmp_path, batch_size=8, train_size=40, val_size=20, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (40, 20, 30)
    assert not set(data.indices["train"].tolist()) & set(data.indices["val"].tolist())
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.max() < classes
    # Fixed by the seed: the same subset again; the 20-image subset is the start of the 40-image one.
    again = module(root=tmp_path, train_size=40, val_size=20, num_workers=0)
    again.setup()
    assert torch.equal(again.indices["train"], data.indices["train"])
    small = module(root=tmp_path, train_size=20, val_size=20, num_workers=0)
    small.setup()
    assert torch.equal(small.indices["train"], data.indices["train"][:20])
    # The test images are never augmented: the same tensor twice.
    assert torch.equal(data.test_dataset[0][0], data.test_dataset[0][0])


def test_cifar_augmentation_crops_and_flips_and_val_size_0_validates_on_test(tmp_path):
    write_made_cifar(tmp_path, "cifar10", train=20, test=10)
    data = CIFAR10DataModule(root=tmp_path, val_size=0, num_workers=0)
    data.setup()
    assert data.val_dataset is data.test_dataset and len(data.train_dataset) == 20
    torch.manual_seed(0)
    views = torch.stack([data.train_dataset[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32)
    assert (views - views[0]).abs().amax() > 0  # random crops / flips differ
    plain = CIFAR10DataModule(root=tmp_path, val_size=0, augment=False, num_workers=0)
    plain.setup()
    files = [tmp_path / f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    raw = np.concatenate([pickle.load(f.open("rb"), encoding="bytes")[b"data"] for f in files])
    first = torch.as_tensor(raw[plain.indices["train"][0].item()]).view(3, 32, 32).float() / 255
    mean, std = torch.tensor(plain.mean).view(3, 1, 1), torch.tensor(plain.std).view(3, 1, 1)
    assert torch.allclose(plain.train_dataset[0][0], (first - mean) / std, atol=1e-5)


def test_cifar_missing_data_names_the_directory_and_bad_sizes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(root=tmp_path / "nowhere").prepare_data()
    write_made_cifar(tmp_path, "cifar10", train=20, test=10)
    with pytest.raises(ValueError, match="train_size must be in 1..15"):
        CIFAR10DataModule(root=tmp_path, train_size=16, val_size=5).setup()


def _image_folder(root, classes=("n01", "n02", "n03"), per_class=4):
    from PIL import Image

    for split in ("train", "val"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                pixels = torch.full((40, 48, 3), 60 * i + j, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{j}.png")


def test_imagenet_reads_an_image_folder_with_the_standard_transforms(tmp_path):
    _image_folder(tmp_path)
    data = ImageNetDataModule(
        root=tmp_path, batch_size=4, train_size=6, val_size=3, image_size=32, resize_size=36, num_workers=0
    )
    data.prepare_data()
    data.setup("fit")
    assert data.classes == ["n01", "n02", "n03"]
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (6, 3, 12)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    test_images, test_labels = next(iter(data.test_dataloader()))
    assert test_images.shape == (4, 3, 32, 32) and test_labels.tolist() == [0, 0, 0, 0]
    # Standard 224 pipeline by default.
    full = ImageNetDataModule(root=tmp_path, num_workers=0)
    full.setup()
    assert full.test_dataset[0][0].shape == (3, 224, 224)
    # Held-out train images are not augmented: the same tensor twice (the train split crops at random).
    assert torch.equal(data.val_dataset[0][0], data.val_dataset[0][0])
    assert data.val_dataset.dataset.samples is data.train_dataset.dataset.samples


def test_imagenet_missing_folders_are_a_clear_error(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"val is missing"):
        ImageNetDataModule(root=tmp_path).prepare_data()


def test_the_table_models_have_the_right_heads():
    from tnlit.models import load_model

    assert load_model("cifar100-resnet34", meta=True).fc.out_features == 100
    narrow = load_model("cifar100-resnet34-w8")
    assert narrow.fc.out_features == 100 and narrow(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert load_model("cifar-resnet34-w8").fc.in_features == 64


def test_the_imagenet_teacher_asks_torchvision_for_its_weights_and_says_where_they_go(monkeypatch):
    import torchvision

    from tnlit.models import ModelNotFoundError, load_model

    asked = []

    def get_model(name, weights=None):
        asked.append((name, weights))
        if weights is not None:
            raise OSError("no network")
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    with pytest.raises(ModelNotFoundError, match="torch's cache"):
        load_model("resnet34-imagenet1k")
    assert asked == [("resnet34", "DEFAULT")]  # DEFAULT is IMAGENET1K_V1, resnet34's only weights
