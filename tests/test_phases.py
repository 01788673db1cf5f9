"""compress(init=activation): the fit recorded and kept in init.safetensors, resumed, refitted when damaged; old run
directories that predate a setting stay resumable; per-source metrics of a TextSourcesDataModule."""

import json
import math
import shutil

import pytest
import torch
from lightning.pytorch import LightningDataModule
from safetensors.torch import load_file, save_file, save_model
from torch.utils.data import DataLoader

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.data.text_sources import TextSourcesDataModule
from tnlit.evaluate import perplexity
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.models import load_model
from tnlit.pipeline import InitSettings, RunDirError, SliceSettings, compress, load_teacher

MLP = r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"
LAYERS = [f"transformer.h.{i}.mlp.c_{kind}" for i in (0, 1) for kind in ("fc", "proj")]
# Low rank: its activation-aware fit is exact and takes a fraction of a second (MPO's sweeps take seconds).
PLAN = TensorizePlan([Rule(MLP, "lowrank", cr=0.5)])


class TokensFile(LightningDataModule):
    """Token sequences from a safetensors file, in a fixed order; the test split is the first ``test_sequences``."""

    def __init__(self, path: str, batch_size: int = 8, test_sequences: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.path, self.batch_size, self.test_sequences = path, batch_size, test_sequences

    def setup(self, stage: str | None = None) -> None:
        self.tokens = load_file(self.path)["tokens"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens[: self.test_sequences], batch_size=self.batch_size)


@torch.no_grad()
def sample(model, n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences the model itself generates: the teacher is the true model of this data, so a student's perplexity
    on it measures how far the student is from the teacher (random tokens would not: a random teacher is no better
    at them than a perturbed one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=g)
    for _ in range(length - 1):
        probs = torch.softmax(model(ids).logits[:, -1], dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny-gpt2 with its weight matrices scaled 10x (sharp predictions, activations far from 0), and 32
    sequences of 16 tokens sampled from it."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teacher = load_model("tiny-gpt2").eval()
    with torch.no_grad():
        for p in teacher.parameters():
            if p.ndim == 2:
                p.mul_(10)
    save_model(teacher, str(root / "teacher.safetensors"))
    save_file({"tokens": sample(teacher, 32, 16, seed=0)}, str(root / "tokens.safetensors"))
    return {"weights": root / "teacher.safetensors", "tokens": str(root / "tokens.safetensors")}


def run(run_dir, files, **overrides):
    kwargs = dict(
        teacher="tiny-gpt2",
        teacher_weights=files["weights"],
        data=TokensFile(files["tokens"]),
        plan=PLAN,
        task="causal_lm",
        run_dir=run_dir,
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
        init=InitSettings(method="activation"),
    )
    kwargs.update(overrides)
    return compress(**kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, files):
    """Two finished runs that differ only in init.method: ``activation`` and ``svd``."""
    root = tmp_path_factory.mktemp("runs")
    states = {m: run(root / m, files, init=InitSettings(method=m)) for m in ("activation", "svd")}
    return {m: (root / m, state) for m, state in states.items()}


def relocated(run_dir, to):
    """A copy of a run directory elsewhere (its config names its run_dir)."""
    shutil.copytree(run_dir, to)
    config = json.loads((to / "config.json").read_text())
    config["run_dir"] = str(to)
    (to / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return to


def same_weights(a, b):
    a, b = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_activation_init_is_recorded_kept_and_beats_svd(runs, files):
    run_dir, state = runs["activation"]
    assert state["done"] and json.loads((run_dir / "state.json").read_text())["init"] == state["init"]
    assert sorted(state["init"]) == sorted(LAYERS)
    for name, errors in state["init"].items():
        assert errors["output_error_after"] < errors["output_error_before"], name
        assert errors["weight_error_after"] >= errors["weight_error_before"] - 1e-6, "SVD has the least weight error"
    times = state["times"]["init"]
    assert times["optimisation_s"] > 0 and times["wall_s"] >= times["optimisation_s"]
    assert json.loads((run_dir / "config.json").read_text())["init"]["method"] == "activation"

    # init.safetensors holds every factor of the student as fitted: loaded into a fresh student, the init metric.
    teacher = load_teacher("tiny-gpt2", files["weights"]).eval()
    student, _ = tensorize(teacher, PLAN)
    fitted = load_file(run_dir / "init.safetensors")
    assert sorted(fitted) == sorted(f"{n}.{f}" for n in LAYERS for f in ("a", "b"))
    student.load_state_dict(fitted, strict=False)
    data = TokensFile(files["tokens"])
    data.setup()
    assert perplexity(student, data.test_dataloader()) == pytest.approx(state["init_metric"]["perplexity"], rel=1e-5)

    svd_dir, svd = runs["svd"]
    assert "init" not in svd and "init" not in svd["times"] and not (svd_dir / "init.safetensors").exists()
    assert svd["teacher_metric"] == state["teacher_metric"]
    # The teacher's own samples: the fitted student predicts them far better than the SVD one (measured: ~1.6x).
    assert state["init_metric"]["perplexity"] < 0.9 * svd["init_metric"]["perplexity"]


def test_a_rerun_resumes_from_init_safetensors_without_fitting_again(tmp_path, files, runs, monkeypatch):
    step = SliceDistillation.training_step

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(SliceDistillation, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", files)
    assert (tmp_path / "run/init.safetensors").exists()
    assert "init" in json.loads((tmp_path / "run/state.json").read_text())

    monkeypatch.setattr(SliceDistillation, "training_step", step)
    monkeypatch.setattr("tnlit.pipeline.phases.activation_init_", lambda *a, **k: pytest.fail("fitted again"))
    monkeypatch.setattr("tnlit.pipeline.phases.input_covariances", lambda *a, **k: pytest.fail("calibrated again"))
    state = run(tmp_path / "run", files)
    assert state["done"] and state["init"] == runs["activation"][1]["init"]
    assert state["final_metric"] == pytest.approx(runs["activation"][1]["final_metric"])
    assert same_weights(tmp_path / "run", runs["activation"][0]), "the same student as a run never interrupted"


def test_a_damaged_init_file_is_said_and_fitted_again(tmp_path, files, runs):
    run_dir = relocated(runs["activation"][0], tmp_path / "run")
    # Copies: load_file maps the file, whose bytes the truncation below takes away.
    original = {k: v.clone() for k, v in load_file(run_dir / "init.safetensors").items()}
    data = (run_dir / "init.safetensors").read_bytes()
    (run_dir / "init.safetensors").write_bytes(data[: len(data) // 2])  # as a kill during a copy would leave it
    # A run stopped before it finished (a finished run's student holds its factors: it fits no init).
    state = json.loads((run_dir / "state.json").read_text())
    del state["done"]
    (run_dir / "state.json").write_text(json.dumps(state))
    # (Editing state.json by hand is itself said: its checksum no longer matches, and its record starts afresh.)
    with pytest.warns(UserWarning, match="init.safetensors is damaged.*computed again"):
        state = run(run_dir, files)
    refitted = load_file(run_dir / "init.safetensors")
    assert refitted.keys() == original.keys()
    assert all(torch.allclose(refitted[k], original[k], atol=1e-6) for k in original)
    assert state["done"] and state["final_metric"] == runs["activation"][1]["final_metric"]


def test_a_run_dir_from_before_the_new_settings_is_the_same_run(tmp_path, files, runs, monkeypatch):
    run_dir = relocated(runs["svd"][0], tmp_path / "old")
    config = json.loads((run_dir / "config.json").read_text())
    # As tnlit wrote it before init.method and slicewise.loss existed (and the plan's budget, where it exists).
    del config["init"], config["slicewise"]["loss"]
    if config["plan"].get("budget", "absent") is None:
        del config["plan"]["budget"]
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *a, **k: pytest.fail("a finished run trained"))
    state = run(run_dir, files, init=InitSettings())
    assert state["done"] and state["metrics"] == runs["svd"][1]["metrics"]

    with pytest.raises(RunDirError, match=r"differs in: slicewise\)"):
        run(run_dir, files, init=InitSettings(), slicewise=SliceSettings(mode="stream", epochs=1, lr=2e-2))
    with pytest.raises(RunDirError, match=r"differs in: init\)"):
        run(run_dir, files)  # activation: not what the old run computed
    with pytest.raises(RunDirError, match=r"differs in: slicewise\)"):
        run(run_dir, files, init=InitSettings(), slicewise=SliceSettings(mode="stream", lr=1e-2, loss="relative"))


def write_texts(tmp_path):
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz \n"
    for name, n in (("a", 3000), ("b", 1500), ("c", 800)):
        text = "".join(letters[i] for i in torch.randint(len(letters), (n,), generator=g).tolist())
        (tmp_path / f"{name}.txt").write_text(text)
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], [str(tmp_path / "c.txt")]


def test_text_sources_give_a_metric_per_source_and_unseen_text(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_layer=2, n_embd=32, n_head=4, n_positions=64, bos_token_id=10, eos_token_id=10)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")  # a byte-level GPT-2, loaded as a local HF directory
    sources, unseen = write_texts(tmp_path)
    data = TextSourcesDataModule(
        sources, unseen, tokenizer="bytes", seq_len=16, batch_size=4, train_sequences=16, eval_sequences=4
    )
    state = compress(
        teacher=str(tmp_path / "gpt2"),
        data=data,
        plan=PLAN,
        task="causal_lm",
        run_dir=tmp_path / "run",
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="stream", epochs=1),
        eval_each_epoch=True,
    )
    keys = {"perplexity", "perplexity/a", "perplexity/b", "perplexity/unseen:c"}
    for metric in (state["teacher_metric"], state["init_metric"], state["metrics"]["slicewise"], state["final_metric"]):
        assert set(metric) == keys and all(math.isfinite(v) and v > 1 for v in metric.values())
        # Each text gives 4 windows of 16 tokens: the pooled log-perplexity is the mean of the texts'.
        pooled = sum(math.log(metric[k]) for k in keys - {"perplexity"}) / 3
        assert math.log(metric["perplexity"]) == pytest.approx(pooled, rel=1e-6)
    assert keys <= set(state["curve"][-1])
    assert json.loads((tmp_path / "run/state.json").read_text())["final_metric"] == state["final_metric"]


def test_auto_and_budget_plans_run_through_compress_and_leave_their_records(tmp_path, files):
    import csv

    auto = run(tmp_path / "auto", files, plan=TensorizePlan([Rule(MLP, "auto", cr=0.5)]), init=InitSettings())
    with (tmp_path / "auto" / "choices.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["layer"] for r in rows} == set(LAYERS)
    assert sum(r["chosen"] == "True" for r in rows) == len(LAYERS), "one chosen candidate per layer"
    assert auto["done"] and auto["compression"]["compression_rate"] > 0
    budget = run(tmp_path / "budget", files, plan=TensorizePlan([Rule(MLP, "lowrank", cr=0.5)], budget=0.3))
    assert budget["compression"]["compression_rate"] >= 0.3
    assert not (tmp_path / "budget" / "choices.csv").exists()
