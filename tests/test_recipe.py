"""compress(): the run directory, resuming after a crash, refusing another config, damaged checkpoints."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from tnlit import Rule, TensorizePlan
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.pipeline import FinetuneSettings, LogSettings, RunDirError, SliceSettings, callbacks, compress

PLAN = TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)])


# The DataModule of these tests: made token sequences in a fixed order, so runs compare weight for weight.
TokenData = RandomTokensDataModule


def run(run_dir, **overrides):
    kwargs = dict(
        teacher="tiny-gpt2",
        data=TokenData(),
        plan=PLAN,
        task="causal_lm",
        run_dir=run_dir,
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="serial", epochs=2, lr=1e-2),
    )
    kwargs.update(overrides)
    return compress(**kwargs)


def weights(run_dir):
    return load_file(run_dir / "student.safetensors")


def test_run_directory_holds_everything(tmp_path):
    state = run(tmp_path / "run")
    files = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    for name in (
        "config.json",
        "state.json",
        "report.csv",
        "report.json",
        "student.safetensors",
        "slices/transformer.h.0.mlp.safetensors",
        "slices/transformer.h.1.mlp.safetensors",
        "cache/manifest.json",
        "cache/shard-000003.safetensors",
    ):
        assert name in files
    assert not any(f.startswith("ckpt/") for f in files), "finished phases leave no epoch checkpoints behind"
    assert state["done"] and state["metrics"]["slicewise"]["perplexity"] > 1
    times = dict(state["times"])
    cache = times.pop("cache")  # serial slices read the activation store, built once
    assert cache["wall_s"] > 0 and cache["optimisation_s"] == 0 and cache["shards_built"] == 4
    assert set(times) == {"slice:transformer.h.0.mlp", "slice:transformer.h.1.mlp"}
    assert all(t["optimisation_s"] > 0 and t["wall_s"] >= t["optimisation_s"] for t in times.values())
    assert json.loads((tmp_path / "run" / "state.json").read_text())["done"]


def test_finished_run_does_no_training_when_rerun(tmp_path, monkeypatch):
    first = run(tmp_path / "run")
    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *a, **k: pytest.fail("a finished run trained"))
    again = run(tmp_path / "run")
    assert again["metrics"] == first["metrics"]


@pytest.mark.parametrize("source", [{"serial_source": "teacher"}, {"cache_shuffle": False}], ids=["teacher", "cache"])
def test_stream_and_serial_runs_agree(tmp_path, source):
    run(tmp_path / "serial", slicewise=SliceSettings(mode="serial", epochs=2, lr=1e-2, **source))
    run(tmp_path / "stream", slicewise=SliceSettings(mode="stream", epochs=2, lr=1e-2))
    a, b = weights(tmp_path / "serial"), weights(tmp_path / "stream")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_crash_in_a_slice_resumes_to_the_same_result(tmp_path, monkeypatch):
    run(tmp_path / "clean")
    step = SliceDistillation.training_step
    calls = {"n": 0}

    def crash_in_second_epoch_of_second_slice(self, batch, batch_idx):
        if self.slices[0].name == "transformer.h.1.mlp":
            calls["n"] += 1
            if calls["n"] == 6:  # 4 batches an epoch: the 2nd batch of epoch 2, after epoch 1's checkpoint
                raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SliceDistillation, "training_step", crash_in_second_epoch_of_second_slice)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed")
    assert (tmp_path / "crashed/slices/transformer.h.0.mlp.safetensors").exists()
    assert (tmp_path / "crashed/ckpt/slice_transformer.h.1.mlp/last.ckpt").exists()
    monkeypatch.setattr(SliceDistillation, "training_step", step)
    state = run(tmp_path / "crashed")
    assert state["done"]
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "crashed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_non_finite_loss_stops_its_slice_and_marks_nothing_done(tmp_path, monkeypatch):
    losses = SliceDistillation.slice_losses

    def nan_in_second_slice(self, batch):
        out = losses(self, batch)
        return {k: v * float("nan") if k == "transformer.h.1.mlp" else v for k, v in out.items()}

    monkeypatch.setattr(SliceDistillation, "slice_losses", nan_in_second_slice)
    with pytest.raises(FloatingPointError, match="transformer.h.1.mlp"):
        run(tmp_path / "run", slicewise=SliceSettings(mode="serial", serial_source="teacher", epochs=1))
    assert (tmp_path / "run/slices/transformer.h.0.mlp.safetensors").exists()
    assert not (tmp_path / "run/slices/transformer.h.1.mlp.safetensors").exists()
    state = json.loads((tmp_path / "run/state.json").read_text())
    assert "done" not in state and "slicewise" not in state.get("metrics", {})


def test_damaged_checkpoint_is_said_and_not_used(tmp_path):
    run(tmp_path / "clean")
    ckpt = tmp_path / "run/ckpt/slice_transformer.h.0.mlp/last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")  # as a kill during a write would leave it
    with pytest.warns(UserWarning, match="unreadable"):
        run(tmp_path / "run")
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "run")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_another_config_in_the_same_run_dir_is_refused(tmp_path):
    run(tmp_path / "run")
    with pytest.raises(RunDirError, match="differs in: slicewise"):
        run(tmp_path / "run", slicewise=SliceSettings(mode="serial", epochs=3, lr=1e-2))
    state = run(tmp_path / "run", slicewise=SliceSettings(mode="serial", epochs=1, lr=1e-2), overwrite=True)
    assert state["done"]


@pytest.mark.parametrize("method", ["global", "hybrid"])
def test_global_and_hybrid(tmp_path, method):
    state = run(tmp_path / method, method=method, finetune=FinetuneSettings(epochs=1, lr=1e-3, kd_weight=0.5))
    assert "global" in state["metrics"] and state["final_metric"] == state["metrics"]["global"]
    assert ("slicewise" in state["metrics"]) == (method == "hybrid")


def test_eval_each_epoch_records_the_metric_against_optimisation_time(tmp_path):
    state = run(
        tmp_path / "run",
        method="hybrid",
        eval_each_epoch=True,
        slicewise=SliceSettings(mode="stream", epochs=2),
        finetune=FinetuneSettings(epochs=2, lr=1e-3),
    )
    curve = state["curve"]
    expected = [("slicewise", 1), ("slicewise", 2), ("global", 1), ("global", 2)]
    assert [(p["phase"], p["epoch"]) for p in curve] == expected
    times = [p["optimisation_s"] for p in curve]
    assert all(a < b for a, b in zip(times, times[1:])), "time so far counts every phase before the point"
    assert times[-1] == pytest.approx(sum(t["optimisation_s"] for t in state["times"].values()))
    # A phase's last point is the student that phase ends with.
    assert curve[1]["perplexity"] == pytest.approx(state["metrics"]["slicewise"]["perplexity"])
    assert curve[-1]["perplexity"] == pytest.approx(state["final_metric"]["perplexity"])


def wandb_records(wandb_dir, run_id):
    """The offline W&B runs of ``run_id`` under ``wandb_dir``, and the bytes of their transaction logs (metric keys
    and summary keys stand in them as plain text)."""
    runs = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    return runs, b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))


def test_wandb_offline_logs_every_phase_and_resumes_with_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    step = SliceDistillation.training_step

    def crash_in_second_slice(self, batch, batch_idx):
        if self.slices[0].name == "transformer.h.1.mlp":
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SliceDistillation, "training_step", crash_in_second_slice)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", log=LogSettings(wandb=True))
    run_id = json.loads((tmp_path / "run/state.json").read_text())["wandb_id"]
    # As a new process would: the crashed call's W&B run finished, compress() knows of no open run.
    for open_run in callbacks._WANDB_RUNS.values():
        open_run.finish(exit_code=1)
    monkeypatch.setattr(callbacks, "_WANDB_RUNS", {})
    monkeypatch.setattr(SliceDistillation, "training_step", step)

    state = run(tmp_path / "run", log=LogSettings(wandb=True))
    assert state["done"] and state["wandb_id"] == run_id
    keys = ("slice:transformer.h.0.mlp-train/mse", "slice:transformer.h.1.mlp-train/mse", "final_metric")
    # W&B's service process writes the transaction log after finish() returns: on a busy machine, seconds later.
    for _ in range(60):
        runs, log = wandb_records(tmp_path / "wandb", run_id)
        if all(key.encode() in log for key in keys):
            break
        time.sleep(0.5)
    assert len(runs) == 2, "the rerun resumed the W&B run of the run directory (same id)"
    for key in keys:
        assert key.encode() in log, key

    # Logging is not part of the run's config: without W&B, the finished run only reports.
    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *a, **k: pytest.fail("a finished run trained"))
    assert run(tmp_path / "run")["metrics"] == state["metrics"]


def test_wandb_mode_in_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # as in a sandbox or CI: never online, whatever the config says
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    state = run(
        tmp_path / "run",
        log=LogSettings(wandb=True, wandb_mode="online"),
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
    )
    assert state["done"]
    assert wandb_records(tmp_path / "wandb", state["wandb_id"]) == ([], b"")


def test_teacher_weights_load_with_tied_embeddings_and_bad_files_say_so(tmp_path):
    from safetensors.torch import save_model

    from tnlit.pipeline import load_teacher

    teacher = load_teacher("tiny-gpt2")
    with torch.no_grad():
        teacher.transformer.wte.weight.add_(1.0)  # tied to lm_head: save_model stores one copy
    save_model(teacher, str(tmp_path / "t.safetensors"))
    loaded = load_teacher("tiny-gpt2", tmp_path / "t.safetensors")
    torch.testing.assert_close(loaded.lm_head.weight, teacher.lm_head.weight, rtol=0, atol=0)

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable.*train the teacher again"):
        load_teacher("tiny-gpt2", tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="do not fit model 'tiny-gpt2-bytes'"):
        load_teacher("tiny-gpt2-bytes", tmp_path / "t.safetensors")
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        load_teacher("tiny-gpt2", tmp_path / "missing.safetensors")


def test_finetune_batch_size_applies_to_the_global_phase_only(tmp_path, monkeypatch):
    from tnlit.methods.global_finetune import GlobalFinetune

    seen = {"slice": set(), "global": set()}
    slice_step, global_step = SliceDistillation.training_step, GlobalFinetune.training_step

    def record(kind, step):
        def wrapped(self, batch, batch_idx):
            seen[kind].add(len(batch))
            return step(self, batch, batch_idx)

        return wrapped

    monkeypatch.setattr(SliceDistillation, "training_step", record("slice", slice_step))
    monkeypatch.setattr(GlobalFinetune, "training_step", record("global", global_step))
    data = TokenData()
    stream = SliceSettings(mode="stream", epochs=1)
    run(
        tmp_path / "run",
        method="hybrid",
        data=data,
        slicewise=stream,
        finetune=FinetuneSettings(epochs=1, batch_size=4),
    )
    assert seen == {"slice": {8}, "global": {4}}
    assert data.batch_size == 8, "the DataModule is given back as it came"

    class NoAttribute(TokenData):
        def __init__(self):
            super().__init__()
            del self.batch_size

    with pytest.raises(ValueError, match="finetune.batch_size needs a DataModule"):
        run(tmp_path / "other", method="global", data=NoAttribute(), finetune=FinetuneSettings(batch_size=4))
    assert not (tmp_path / "other").exists()
