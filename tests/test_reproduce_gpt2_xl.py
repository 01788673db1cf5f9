"""reproduce/gpt2_xl.py --smoke: a tiny GPT-2 on made text runs global, stream and serial slice-wise (and, slow,
a torchrun job of 2 CPU processes) end to end and writes the quality and time tables beside the paper's."""

import csv
from pathlib import Path

import pytest
from conftest import reproduce_script


def script(tmp_path, monkeypatch):
    module = reproduce_script("gpt2_xl")
    monkeypatch.setattr(module, "SMOKE", tmp_path / "smoke")
    return module


def check_tables(results: Path, nproc: int) -> None:
    quality = {(r["benchmark"], r["metric"]): r for r in csv.DictReader((results / "gpt2_xl.csv").open())}
    assert quality["lambada_openai", "acc"]["paper_dense"] == "51.21"
    held_out = quality["openwebtext (held out)", "perplexity"]
    assert all(float(held_out[c]) > 1 for c in ("dense", "slicewise", "global"))
    times = {r["run"]: r for r in csv.DictReader((results / "gpt2_xl_time.csv").open())}
    assert times["serial"]["paper_min"] == "531.35" and float(times["serial"]["optimisation_min"]) >= 0
    assert times["distributed"]["status"] == ("done" if nproc > 1 else "not run")
    assert (results / "gpt2_xl.md").read_text().startswith("# GPT-2 XL")
    assert (results / "gpt2_xl.provenance.json").exists()


def test_smoke_writes_its_tables(tmp_path, monkeypatch):
    gpt2_xl = script(tmp_path, monkeypatch)
    gpt2_xl.main(["--smoke", "--nproc", "1"])
    check_tables(tmp_path / "smoke" / "results", nproc=1)


@pytest.mark.slow
def test_smoke_with_a_torchrun_job(tmp_path, monkeypatch):
    gpt2_xl = script(tmp_path, monkeypatch)
    gpt2_xl.main(["--smoke"])
    check_tables(tmp_path / "smoke" / "results", nproc=2)


def test_c4_perplexity_reads_validation_text_into_windows(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from tnlit.data.openwebtext import load_tokenizer, word_level_tokenizer

    gpt2_xl = script(tmp_path, monkeypatch)
    texts = [f"document {i} : the quick brown fox jumps over the lazy dog ." for i in range(30)]
    tokenizer = load_tokenizer(str(word_level_tokenizer(texts, tmp_path / "tok")))
    (tmp_path / "c4.json").write_text("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts))
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, vocab_size=len(tokenizer)))
    value = gpt2_xl.c4_perplexity(
        model, tokenizer, dataset="json", data_files=str(tmp_path / "c4.json"), sequences=4, seq_len=16
    )
    assert 1 < value < 10 * len(tokenizer)
