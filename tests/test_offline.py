"""The offline DataModules: digits (images) and pydoc topics (bytes). Shapes, splits, determinism, round trips."""

import pytest
import torch

from tnlit.data import DigitsDataModule, PydocTextDataModule, decode_bytes, encode_bytes, pydoc_text


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=50)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pydoc() -> PydocTextDataModule:
    dm = PydocTextDataModule(seq_len=64, batch_size=8)
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------------- digits


def test_digits_splits_are_fixed_sizes_disjoint_and_cover_the_data(digits):
    train, val, test = (digits.indices[k] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1297, 200, 300)
    assert (len(digits.train_dataset), len(digits.val_dataset), len(digits.test_dataset)) == (1297, 200, 300)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(1797))


def test_digits_batches_are_cifar_shaped_and_normalised(digits):
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (50,) and labels.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 2])  # grey repeated to 3 channels
    everything = digits.train_dataset.images
    assert abs(everything.mean().item()) < 1e-4 and abs(everything.std().item() - 1) < 1e-4
    assert set(digits.train_dataset.labels.tolist()) == set(range(DigitsDataModule.num_classes))
    # Val and test come in a fixed order, the last batch short.
    assert [len(y) for _, y in digits.val_dataloader()] == [50, 50, 50, 50]
    assert [len(y) for _, y in digits.test_dataloader()] == [50] * 6


def test_digits_are_deterministic_per_seed():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_dataset.images, b.test_dataset.images)
    assert torch.equal(a.indices["val"], b.indices["val"])
    assert not torch.equal(a.indices["val"], c.indices["val"])


def test_digits_train_size_is_a_seeded_subset_that_leaves_val_and_test_alone(digits):
    small = DigitsDataModule(train_size=300)
    small.setup()
    assert len(small.train_dataset) == 300
    assert set(small.indices["train"].tolist()) <= set(digits.indices["train"].tolist())
    assert torch.equal(small.indices["test"], digits.indices["test"])
    again = DigitsDataModule(train_size=300)
    again.setup()
    assert torch.equal(small.indices["train"], again.indices["train"])
    with pytest.raises(ValueError, match="train_size"):
        DigitsDataModule(train_size=5000).setup()


def test_digits_image_size_and_augmentation():
    dm = DigitsDataModule(image_size=16, augment=True)
    dm.setup()
    plain = dm.train_dataset.images[:40]
    shifted = torch.stack([dm.train_dataset[i][0] for i in range(40)])
    assert shifted.shape == plain.shape == (40, 3, 16, 16)
    assert not torch.equal(shifted, plain)  # 40 draws of 25 shifts: all (0, 0) has odds 25**-40
    # A shift only moves pixels (and repeats the border): no new values appear.
    assert shifted.min() >= plain.min() and shifted.max() <= plain.max()
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset.images[0])  # val is never augmented


# ----------------------------------------------------------------------------------------------- text


def test_pydoc_text_is_the_standard_librarys_topics():
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert len(topics) > 50 and topics[sorted(topics)[0]] in text
    assert 300_000 < len(text.encode("utf-8")) < 1_000_000


def test_byte_encode_decode_round_trip():
    text = "def f(x):\n    return 'naïve → ✓'\n"
    ids = encode_bytes(text)
    assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < PydocTextDataModule.vocab_size
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # multi-byte characters are several tokens
    assert decode_bytes(ids) == text == PydocTextDataModule.decode(PydocTextDataModule.encode(text))
    assert decode_bytes(ids[:-3].tolist()) == text[:-3] + "\ufffd"  # list input; a cut character is U+FFFD


def test_pydoc_splits_are_contiguous_90_5_5(pydoc):
    whole = encode_bytes(pydoc_text())
    parts = (pydoc.train_tokens, pydoc.val_tokens, pydoc.test_tokens)
    assert torch.equal(torch.cat(parts), whole)
    fractions = [len(p) / len(whole) for p in parts]
    assert fractions == pytest.approx([0.90, 0.05, 0.05], abs=1e-4)


def test_pydoc_val_windows_are_consecutive_and_do_not_overlap(pydoc):
    batches = list(pydoc.val_dataloader())
    assert all(b.dtype == torch.int64 and b.shape[1] == 64 for b in batches)
    stream = torch.cat(batches).flatten()
    assert len(stream) == len(pydoc.val_tokens) // 64 * 64
    assert torch.equal(stream, pydoc.val_tokens[: len(stream)])


def test_pydoc_train_windows_are_random_seeded_per_epoch(pydoc):
    loader = pydoc.train_dataloader()
    assert len(loader.sampler) == len(pydoc.train_tokens) // 64  # the default count
    first = torch.cat(list(loader))
    assert first.shape == (len(pydoc.train_tokens) // 64, 64)
    assert torch.equal(first, torch.cat(list(loader)))  # same epoch, same windows
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(loader)))  # the next epoch draws others
    # Every window is a piece of the train split, not of val / test.
    train_text = bytes(pydoc.train_tokens.tolist())
    assert all(bytes(row.tolist()) in train_text for row in first[:20])


def test_pydoc_train_sequences_sets_the_epoch_length():
    dm = PydocTextDataModule(seq_len=32, batch_size=10, train_sequences=25, seed=3)
    dm.setup()
    assert [b.shape for b in dm.train_dataloader()] == [(10, 32), (10, 32), (5, 32)]
    other = PydocTextDataModule(seq_len=32, batch_size=10, train_sequences=25, seed=4)
    other.setup()
    assert not torch.equal(next(iter(dm.train_dataloader())), next(iter(other.train_dataloader())))
