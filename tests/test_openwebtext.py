"""TokenizedTextDataModule on local text files with a tokenizer built in memory: the nanoGPT-layout cache, its
manifest (reused when sound, rebuilt when damaged), seeded windows, the held-out split, and compress on it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tnlit.data.offline import pydoc_text
from tnlit.data.openwebtext import TokenizedTextDataModule, load_tokenizer, word_level_tokenizer


def made_corpus(root: Path, n: int = 40) -> tuple[list[Path], Path]:
    """``n`` documents cut from the pydoc text, one file each, and a tokenizer for them."""
    text = pydoc_text()
    size = len(text) // n
    docs = [text[i * size : (i + 1) * size] for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, doc in enumerate(docs):
        (path := root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
        files.append(path)
    return files, word_level_tokenizer(docs, root / "tokenizer")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return made_corpus(tmp_path_factory.mktemp("corpus"))


def module(corpus, cache: Path, **kwargs) -> TokenizedTextDataModule:
    files, tokenizer = corpus
    args = dict(
        tokenizer=str(tokenizer),
        data_files=files,
        cache_dir=cache,
        seq_len=64,
        batch_size=4,
        train_sequences=20,
        eval_sequences=8,
        val_fraction=0.1,
    )
    return TokenizedTextDataModule(**{**args, **kwargs})


def test_cache_holds_every_document_once_in_nanogpt_layout(corpus, tmp_path):
    data = module(corpus, tmp_path)
    data.prepare_data()
    root = data.cache_path
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == {"train": 36, "val": 4}
    tok = load_tokenizer(str(corpus[1]))
    expected = sum(len(tok(f.read_text(), add_special_tokens=False)["input_ids"]) + 1 for f in corpus[0])
    assert sum(manifest["tokens"].values()) == expected
    train = np.memmap(root / "train.bin", dtype=np.uint16, mode="r")
    index = np.load(root / "train.idx.npy")
    assert index[0] == 0 and index[-1] == len(train) == manifest["tokens"]["train"]
    # Each document ends with the EOS token, right before the next one starts.
    assert all(train[i - 1] == tok.eos_token_id for i in index[1:])

    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 64) and batch.dtype == torch.int64
    assert len(data.train_dataloader().dataset) == 20 and len(data.test_dataloader().dataset) == 8
    again = module(corpus, tmp_path)
    again.prepare_data()
    again.setup("fit")
    torch.testing.assert_close(next(iter(again.train_dataloader())), batch)  # same seed, same windows
    other = module(corpus, tmp_path, seed=1)
    other.prepare_data()
    other.setup("fit")
    assert other.cache_path != root, "another held-out split is another cache"


def test_sound_cache_is_reused_and_damaged_one_rebuilt(corpus, tmp_path):
    data = module(corpus, tmp_path)
    data.prepare_data()
    train = data.cache_path / "train.bin"
    stamp = train.stat().st_mtime_ns
    module(corpus, tmp_path).prepare_data()
    assert train.stat().st_mtime_ns == stamp, "a sound cache is not tokenized again"
    good = train.read_bytes()
    train.write_bytes(good[:-2])  # truncated, as a kill during a copy leaves it
    with pytest.raises(RuntimeError, match="damaged"):
        module(corpus, tmp_path).setup("fit")
    with pytest.warns(UserWarning, match="train.bin is damaged"):
        module(corpus, tmp_path).prepare_data()
    assert train.read_bytes() == good


def test_compress_a_tiny_gpt2_on_tokenized_text(corpus, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tnlit import Rule, TensorizePlan
    from tnlit.pipeline import SliceSettings, compress

    tok = load_tokenizer(str(corpus[1]))
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "teacher")
    state = compress(
        teacher=str(tmp_path / "teacher"),
        data=module(corpus, tmp_path / "cache"),
        task="causal_lm",
        plan=TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)]),
        accelerator="cpu",
        progress=False,
        run_dir=tmp_path / "run",
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
    )
    assert state["done"] and state["final_metric"]["perplexity"] > 1
