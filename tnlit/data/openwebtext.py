"""Text for causal LMs, tokenized once into memory-mapped token files (nanoGPT's layout): OpenWebText, any Hugging
Face hub text dataset, or local text files.

``prepare_data`` reads the documents, tokenizes them with the model's tokenizer (an EOS token after each document,
as nanoGPT does), holds out a seeded fraction of the *documents*, and writes, under
``cache_dir/<name>-<fingerprint>/``::

    train.bin  val.bin          every token of the split, back to back (uint16 when the vocabulary fits, else uint32)
    train.idx.npy  val.idx.npy  the index: where each document starts in the .bin (int64, documents + 1 entries)
    manifest.json               what was read and how (the fingerprint), and each file's size and checksum

written last, so a cache is whole or absent. A cache whose manifest does not match the settings (another tokenizer,
changed local files, another split) or whose files are damaged is said and built again.

Training serves ``train_sequences`` windows of ``seq_len`` tokens (the paper: 25k sequences of 1024) starting at
seeded random offsets of train.bin, the same windows in the same order for a given seed; evaluation serves
non-overlapping windows of val.bin (the held-out documents), at most ``eval_sequences`` of them. Batches are
LongTensors ``(batch, seq_len)``: the model shifts the labels itself (``labels=input_ids``).

``datasets`` (the ``lm`` extra) reads hub datasets; local files are read by its ``text`` builder when it is
installed and as plain files otherwise, one document per file either way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tnlit.atomic import atomic_text

__all__ = ["TokenizedTextDataModule", "load_tokenizer", "word_level_tokenizer"]

_FORMAT = 1  # bump when the layout changes: every cache is then built again
_CHUNK = 1024  # documents tokenized per call (a fast tokenizer parallelises inside one call)
_CHECK_BYTES = 1 << 20  # the checksum covers the first and last MiB (and the size): whole-file hashes of 17 GB cost


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer by hub name or local directory (saved with ``save_pretrained``)."""
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name)


def word_level_tokenizer(texts: list[str], out: Path) -> Path:
    """A word-level fast tokenizer over the words and punctuation of ``texts`` (plus ``<unk>`` and ``<eos>``), saved
    with ``save_pretrained`` into ``out``: a tokenizer for made text, with nothing downloaded (tests, smoke runs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(out)
    return Path(out)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer does: its full serialisation when fast, its vocabulary otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _file_check(path: Path) -> str:
    """Size plus a hash of the first and last MiB: a truncated, extended or overwritten file fails it."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_CHECK_BYTES))
        f.seek(max(0, size - _CHECK_BYTES))
        digest.update(f.read(_CHECK_BYTES))
    return digest.hexdigest()


class _Windows(Dataset):
    """Windows of ``seq_len`` tokens of a memory-mapped token file, starting at the given offsets."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> None:
        self.tokens, self.starts, self.seq_len = tokens, starts, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Tensor:
        start = int(self.starts[index])
        # int64 copy: uint16 / uint32 have no torch embedding lookup, and the memmap stays read-only.
        return torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))


class TokenizedTextDataModule(LightningDataModule):
    """OpenWebText (or any Hugging Face text dataset, or local text files) tokenized once into memmapped token files,
    served as fixed-length sequences: a seeded subset for training, held-out documents for evaluation."""

    def __init__(
        self,
        tokenizer: str = "gpt2",
        dataset: str = "openwebtext",
        dataset_config: str | None = None,
        split: str = "train",
        data_files: list[Path] | None = None,
        text_column: str = "text",
        cache_dir: Path = Path("data/tokens"),
        seq_len: int = 1024,
        batch_size: int = 8,
        train_sequences: int = 25_000,
        eval_sequences: int | None = 256,
        val_fraction: float = 0.0005,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: The model's tokenizer: a hub name (``gpt2``) or a local directory.
            dataset: A Hugging Face hub dataset (``openwebtext``); ignored when ``data_files`` is given.
            dataset_config: The hub dataset's configuration name, if it has several.
            split: The hub dataset's split to read (the held-out documents are cut from it).
            data_files: Local text files instead of a hub dataset, each one document.
            text_column: The hub dataset's column that holds the text.
            cache_dir: Where the tokenized caches live (one folder per source, tokenizer and split settings).
            seq_len: Tokens per sequence (1024 for GPT-2).
            batch_size: Sequences per batch (the paper: 8).
            train_sequences: Training sequences per epoch (the paper: 25k), at seeded random offsets of train.bin.
            eval_sequences: Held-out sequences for evaluation (non-overlapping windows of val.bin); None: all.
            val_fraction: Fraction of the documents held out (nanoGPT: 0.0005); at least one document.
            seed: Seed of the held-out documents and of the training windows.
            num_workers: DataLoader worker processes (0: the main process; windows of a memmap are cheap).
        """
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size  # an attribute, as in tnlit's other DataModules: compress may set it per phase
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.tokens: dict[str, np.ndarray] = {}
        self.train_dataset: _Windows | None = None
        self.test_dataset: _Windows | None = None

    # ------------------------------------------------------------------ cache

    def _source(self) -> dict[str, Any]:
        """What is read, for the fingerprint: a hub dataset by name, or local files by path, size and mtime."""
        h = self.hparams
        if h.data_files:
            files = [Path(f).expanduser().resolve() for f in h.data_files]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"data_files not found: {', '.join(missing)}")
            return {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
        return {"dataset": h.dataset, "config": h.dataset_config, "split": h.split, "column": h.text_column}

    def _fingerprint(self, tokenizer: Any) -> dict[str, Any]:
        h = self.hparams
        return {
            "format": _FORMAT,
            "source": self._source(),
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "eos": tokenizer.eos_token_id,
            "val_fraction": h.val_fraction,
            "seed": h.seed,
        }

    @property
    def cache_path(self) -> Path:
        """This source's cache folder (needs the tokenizer, so it loads it)."""
        tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._cache_path(self._fingerprint(tokenizer))

    def _cache_path(self, fingerprint: dict[str, Any]) -> Path:
        h = self.hparams
        name = "files" if h.data_files else re.sub(r"[^A-Za-z0-9_.-]+", "_", h.dataset)
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        return Path(h.cache_dir) / f"{name}-{digest}"

    def prepare_data(self) -> None:
        """Tokenize the documents into the cache, unless a sound cache of the same settings is there already."""
        tokenizer = load_tokenizer(self.hparams.tokenizer)
        fingerprint = self._fingerprint(tokenizer)
        root = self._cache_path(fingerprint)
        problem = _cache_problem(root, fingerprint)
        if problem is None:
            return
        if problem != "absent":
            warnings.warn(f"token cache {root}: {problem}; building it again", stacklevel=2)
        shutil.rmtree(root, ignore_errors=True)
        _build(root, fingerprint, self._documents(), tokenizer, self.hparams.val_fraction, self.hparams.seed)

    def _documents(self) -> tuple[int, Iterator[str]]:
        """The number of documents and an iterator over their texts, in a fixed order."""
        h = self.hparams
        if h.data_files:
            files = [Path(f).expanduser() for f in h.data_files]
            try:
                import datasets
            except ImportError:
                return len(files), (f.read_text(encoding="utf-8") for f in files)
            data = datasets.load_dataset(
                "text", data_files=[str(f) for f in files], sample_by="document", split="train"
            )
            return len(data), (row["text"] for row in data)
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"reading the hub dataset {h.dataset!r} needs the datasets package: pip install 'tnlit[lm]'"
            ) from err
        data = datasets.load_dataset(h.dataset, h.dataset_config, split=h.split)
        return len(data), (row[h.text_column] for row in data)

    # ------------------------------------------------------------------ Lightning

    def setup(self, stage: str | None = None) -> None:
        """Map the cache's token files and pick the windows (the cache must exist: prepare_data builds it)."""
        if self.train_dataset is not None:
            return
        h = self.hparams
        root = self.cache_path
        problem = _cache_problem(root, None)
        if problem is not None:
            raise RuntimeError(f"token cache {root}: {problem}; call prepare_data() first")
        manifest = json.loads((root / "manifest.json").read_text())
        dtype = np.dtype(manifest["dtype"])
        self.tokens = {s: np.memmap(root / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}
        for split, tokens in self.tokens.items():
            if len(tokens) < h.seq_len:
                raise ValueError(f"the {split} split holds {len(tokens)} tokens, fewer than seq_len={h.seq_len}")
        # Seeded random offsets, as nanoGPT draws its batches; a separate generator from the held-out split's.
        rng = np.random.default_rng(h.seed + 1)
        starts = rng.integers(0, len(self.tokens["train"]) - h.seq_len + 1, size=h.train_sequences)
        self.train_dataset = _Windows(self.tokens["train"], starts, h.seq_len)
        val_starts = np.arange(0, len(self.tokens["val"]) - h.seq_len + 1, h.seq_len)
        if h.eval_sequences is not None:
            val_starts = val_starts[: h.eval_sequences]
        self.test_dataset = _Windows(self.tokens["val"], val_starts, h.seq_len)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def _loader(self, dataset: _Windows | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call prepare_data() and setup() before asking for a dataloader")
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.hparams.num_workers)


def _cache_problem(root: Path, fingerprint: dict[str, Any] | None) -> str | None:
    """Why the cache at ``root`` cannot be used (``absent`` when there is none), or None when it can."""
    manifest_file = root / "manifest.json"
    if not manifest_file.exists():
        return "absent"
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        return "unreadable manifest"
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        return "built from other data or another tokenizer"
    for name, expected in manifest.get("files", {}).items():
        path = root / name
        if not path.exists():
            return f"{name} is missing"
        if _file_check(path) != expected:
            return f"{name} is damaged (size or checksum differs)"
    return None


def _build(
    root: Path,
    fingerprint: dict[str, Any],
    documents: tuple[int, Iterator[str]],
    tokenizer: Any,
    val_fraction: float,
    seed: int,
) -> None:
    """Tokenize every document into train / val token files and their indexes; the manifest is written last."""
    count, texts = documents
    if count < 2:
        raise ValueError(f"{count} document(s): a train and a held-out split need at least 2")
    n_val = max(1, round(count * val_fraction))
    held_out = np.zeros(count, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(count)[:n_val]] = True
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    root.mkdir(parents=True, exist_ok=True)
    starts: dict[str, list[int]] = {"train": [0], "val": [0]}
    outs = {split: (root / f"{split}.bin").open("wb") for split in starts}
    try:
        index = 0
        chunk: list[str] = []
        for text in itertools.chain(texts, [None]):  # None: the end, to tokenize the last chunk
            if text is not None:
                chunk.append(text)
                if len(chunk) < _CHUNK:
                    continue
            if not chunk:
                break
            for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                split = "val" if held_out[index] else "train"
                np.asarray(ids + eos, dtype=dtype).tofile(outs[split])
                starts[split].append(starts[split][-1] + len(ids) + len(eos))
                index += 1
            chunk = []
    finally:
        for f in outs.values():
            f.close()
    files = {}
    for split, offsets in starts.items():
        np.save(root / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
        files[f"{split}.bin"] = _file_check(root / f"{split}.bin")
        files[f"{split}.idx.npy"] = _file_check(root / f"{split}.idx.npy")
    manifest = {
        "fingerprint": fingerprint,
        "dtype": np.dtype(dtype).name,
        "documents": {split: len(offsets) - 1 for split, offsets in starts.items()},
        "tokens": {split: offsets[-1] for split, offsets in starts.items()},
        "files": files,
    }
    atomic_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
