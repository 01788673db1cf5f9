"""Run directories: one made by the code before the redesign (tests/fixtures/old_run, a hybrid stopped in its global
phase by commit 5426920) resumes and finishes with today's code, to the same student as an uninterrupted run."""

import json
import shutil
from pathlib import Path

import lightning.pytorch
import torch
from safetensors.torch import load_file

from tnlit import Rule, TensorizePlan
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.pipeline import FinetuneSettings, SliceSettings, compress

OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"


def run(run_dir):
    """The call of tests/fixtures/make_old_run.py."""
    return compress(
        teacher="tiny-gpt2",
        data=RandomTokensDataModule(),
        task="causal_lm",
        method="hybrid",
        plan=TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)]),
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
        finetune=FinetuneSettings(epochs=2, lr=1e-3),
        run_dir=Path(run_dir),
        accelerator="cpu",
        progress=False,
    )


def test_a_run_directory_of_the_flat_layout_resumes_and_finishes(tmp_path, monkeypatch):
    shutil.copytree(OLD_RUN, tmp_path / "old_run")
    monkeypatch.chdir(tmp_path)  # the old run's identity holds its relative run_dir
    assert "done" not in json.loads((tmp_path / "old_run" / "state.json").read_text())
    fits = []
    fit = lightning.pytorch.Trainer.fit
    monkeypatch.setattr(
        lightning.pytorch.Trainer, "fit", lambda self, *a, **k: fits.append(k["ckpt_path"]) or fit(self, *a, **k)
    )
    resumed = run("old_run")
    assert len(fits) == 1 and fits[0] is not None, "only the global phase trains, from its epoch checkpoint"
    assert resumed["done"] and set(resumed["metrics"]) == {"slicewise", "global"}

    monkeypatch.setattr(lightning.pytorch.Trainer, "fit", fit)
    fresh = run("fresh")
    a, b = (load_file(tmp_path / d / "student.safetensors") for d in ("old_run", "fresh"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_metric"] == fresh["final_metric"]
