"""reproduce/gpt2_xl.py --smoke: a tiny GPT-2 on made text runs global, stream and serial slice-wise (and, slow,
a torchrun job of 2 CPU processes) end to end and writes the quality and time tables beside the paper's."""

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "reproduce" / "gpt2_xl.py"


def script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpt2_xl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
