"""The run directory is trusted by checks, not blindly (issue #15): damaged weight files, a replaced teacher or data
file, a second process, SIGTERM / SIGINT, bad inputs, class paths named by a run directory, unreadable JSON files
and a moved run directory. Every run here is tiny-gpt2 on made tokens, MPO at CR 0.5."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from tnlit import Rule, TensorizePlan
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.models import load_model
from tnlit.pipeline import FinetuneSettings, RunDirError, SliceSettings, compress
from tnlit.pipeline.lock import LockError, hold
from tnlit.pipeline.run_dir import datamodule_from_config, read_state
from tnlit.pipeline.signals import RunInterrupted

PLAN = TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)])
SLICE = "transformer.h.0.mlp"


class FileTokens(RandomTokensDataModule):
    """Made tokens, with text files named by ``data_files`` (read for their identity and checks only)."""

    def __init__(self, data_files: list[Path] | None = None, seq_len: int = 16, batch_size: int = 8) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size)
        self.save_hyperparameters()


def run(run_dir: Path, **changes) -> dict:
    args = dict(
        teacher="tiny-gpt2",
        data=RandomTokensDataModule(),
        task="causal_lm",
        plan=PLAN,
        method="hybrid",
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
        finetune=FinetuneSettings(epochs=1, lr=1e-3),
        run_dir=Path(run_dir),
        accelerator="cpu",
        progress=False,
    )
    return compress(**{**args, **changes})


def flip(path: Path, count: int = 10) -> None:
    """``count`` bytes near the end of the file inverted (inside the last tensor's data: the file still parses)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 40 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def same_student(a: Path, b: Path) -> bool:
    x, y = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished hybrid run (slices, global.safetensors, student), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("finished") / "run"
    run(root)
    return root


def copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------ 1. damaged weight files


@pytest.mark.parametrize("file", [f"slices/{SLICE}.safetensors", "global.safetensors"])
def test_a_flipped_weight_file_is_said_set_aside_and_recomputed(finished, tmp_path, file):
    run_dir = copy(finished, tmp_path)
    flip(run_dir / file)
    with pytest.warns(UserWarning, match=rf"{Path(file).name} is damaged"):
        state = run(run_dir)
    assert state["done"] and (run_dir / f"{file}.corrupt").exists()
    assert same_student(run_dir, finished)  # recomputed as the sound run computed it: bit for bit


def test_a_flipped_epoch_checkpoint_restarts_its_phase(tmp_path, monkeypatch):
    clean = run(tmp_path / "clean", method="global", finetune=FinetuneSettings(epochs=2, lr=1e-3))
    step, calls = GlobalFinetune.training_step, []

    def crash(self, batch, batch_idx):
        calls.append(1)
        if len(calls) == 6:  # in the second epoch, after the first one's checkpoint
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GlobalFinetune, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", method="global", finetune=FinetuneSettings(epochs=2, lr=1e-3))
    monkeypatch.setattr(GlobalFinetune, "training_step", step)
    flip(tmp_path / "run/ckpt/global/last.ckpt")
    with pytest.warns(UserWarning, match="last.ckpt is damaged"):
        state = run(tmp_path / "run", method="global", finetune=FinetuneSettings(epochs=2, lr=1e-3))
    assert state["final_metric"] == clean["final_metric"] and same_student(tmp_path / "run", tmp_path / "clean")


def test_a_tampered_state_json_is_set_aside(finished, tmp_path):
    run_dir = copy(finished, tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    state["final_metric"] = {"perplexity": 1.0}  # parses, but is not what the run wrote
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="state.json cannot be trusted: its content differs from its checksum"):
        again = run(run_dir)
    assert again["final_metric"] == json.loads((finished / "state.json").read_text())["final_metric"]


# ------------------------------------------------------------------------------------------ 2. the teacher's identity


def teacher_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_model(load_model("tiny-gpt2"), str(path))
    return path


def test_a_replaced_teacher_is_refused_and_overwrite_starts_afresh(tmp_path):
    weights = teacher_file(tmp_path / "teacher.safetensors", seed=1)
    first = run(tmp_path / "run", method="slicewise", teacher_weights=weights)
    teacher_file(weights, seed=2)  # another teacher of the same architecture, at the same path
    with pytest.raises(RunDirError, match="another teacher"):
        run(tmp_path / "run", method="slicewise", teacher_weights=weights)
    fresh = run(tmp_path / "run", method="slicewise", teacher_weights=weights, overwrite=True)
    assert fresh["teacher_metric"] != first["teacher_metric"]


def test_a_replaced_data_file_is_refused(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one document\n")
    data = FileTokens(data_files=[text])
    run(tmp_path / "run", method="slicewise", data=data)
    text.write_text("another document\n")
    with pytest.raises(RunDirError, match="another data file"):
        run(tmp_path / "run", method="slicewise", data=FileTokens(data_files=[text]))


# ------------------------------------------------------------------------------------------ 3. signals


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_non_zero_and_it_resumes(tmp_path, monkeypatch, capfd, signum, code):
    step = GlobalFinetune.training_step

    def signalled(self, batch, batch_idx):
        if self.trainer.current_epoch == 1:
            os.kill(os.getpid(), signum)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GlobalFinetune, "training_step", signalled)
    with pytest.raises(RunInterrupted) as stopped:
        run(tmp_path / "run", method="global", finetune=FinetuneSettings(epochs=2, lr=1e-3))
    assert stopped.value.code == code and "Rerun the same tnlit compress command" in capfd.readouterr().err
    assert not read_state(tmp_path / "run/state.json").get("done")
    assert (tmp_path / "run/ckpt/global/last.ckpt").exists() and not (tmp_path / "run/.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers before the run are back
    monkeypatch.setattr(GlobalFinetune, "training_step", step)
    assert run(tmp_path / "run", method="global", finetune=FinetuneSettings(epochs=2, lr=1e-3))["done"]


# ------------------------------------------------------------------------------------------ 4. the lock


def test_a_held_run_directory_is_refused_at_once_naming_the_holder(tmp_path):
    (tmp_path / "run").mkdir()
    holder = {"pid": os.getppid(), "host": os.uname().nodename, "since": "now"}
    (tmp_path / "run/.lock").write_text(json.dumps(holder))
    with pytest.raises(LockError, match=rf"in use by PID {os.getppid()} on host"):
        run(tmp_path / "run")
    assert not (tmp_path / "run/config.json").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with pytest.warns(UserWarning, match="stale lock"), hold(tmp_path / "run"):
        assert json.loads((tmp_path / "run/.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run/.lock").exists()


# ------------------------------------------------------------------------------------------ 5. bad inputs, early


def empty_file(tmp_path: Path) -> list[Path]:
    (tmp_path / "empty.txt").write_text("")
    return [tmp_path / "empty.txt"]


BAD = {
    "seq_len": (dict(data=RandomTokensDataModule(seq_len=129)), "seq_len=129 is longer than the teacher's 128"),
    "batch_size": (dict(data=RandomTokensDataModule(batch_size=0)), "batch_size must be at least 1"),
    "slicewise.epochs": (dict(slicewise=SliceSettings(epochs=-1)), "slicewise.epochs must be"),
    "finetune.epochs": (dict(finetune=FinetuneSettings(epochs=-1)), "finetune.epochs must be"),
    "finetune.batch_size": (dict(finetune=FinetuneSettings(batch_size=0)), "finetune.batch_size must be"),
    "missing file": (dict(data=FileTokens(data_files=[Path("/nonexistent/a.txt")])), "/nonexistent/a.txt does not"),
    "empty file": ("empty", "empty.txt is empty"),
    "nan teacher": ("nan", "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_fails_before_the_run_directory_is_written(tmp_path, case):
    changes, message = BAD[case]
    if changes == "empty":
        changes = dict(data=FileTokens(data_files=empty_file(tmp_path)))
    elif changes == "nan":
        model = load_model("tiny-gpt2")
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        save_model(model, str(tmp_path / "nan.safetensors"))
        changes = dict(teacher_weights=tmp_path / "nan.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(tmp_path / "run", **changes)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ 6. no code from data


def test_a_run_directorys_class_path_is_not_imported_unless_tnlits_or_trusted(finished, tmp_path):
    from tnlit.commands.inspect import inspect

    run_dir = copy(finished, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["data"] = {"class_path": "os.system", "init_args": {"command": f"touch {tmp_path / 'pwned'}"}}
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="'os.system'.*refused"):
        inspect(run_dir=run_dir, out_dir=tmp_path / "out", layer="transformer.h.0.mlp.c_fc")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(RunDirError, match="not a LightningDataModule"):  # tnlit's own, but not a DataModule
        datamodule_from_config({"class_path": "tnlit.atomic.atomic_text", "init_args": {}})
    spec = {"class_path": "tnlit.data.synthetic.RandomTokensDataModule", "init_args": {"seq_len": 4}}
    assert datamodule_from_config(spec).seq_len == 4


# ------------------------------------------------------------------------------------------ 7. the smaller ones


def test_unreadable_json_and_student_files_are_named(finished, tmp_path):
    from tnlit.commands.inspect import load_run

    run_dir = copy(finished, tmp_path)
    student = run_dir / "student.safetensors"
    student.write_bytes(student.read_bytes()[:100])
    with pytest.raises(RunDirError, match="student.safetensors is damaged"):
        load_run(run_dir)
    (run_dir / "config.json").write_text('{"teacher": ')
    with pytest.raises(RunDirError, match="config.json is unreadable.*overwrite=true"):
        run(run_dir)


def test_a_moved_run_directory_resumes(finished, tmp_path, monkeypatch):
    moved = copy(finished, tmp_path)
    import lightning.pytorch

    monkeypatch.setattr(lightning.pytorch.Trainer, "fit", lambda *a, **k: pytest.fail("a finished run trains"))
    state = run(moved)
    assert state["done"] and same_student(moved, finished)


def test_a_finished_run_rerun_writes_nothing(finished, tmp_path):
    """What lets a finished run report from a read-only file system: its rerun rewrites no file."""
    run_dir = copy(finished, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert run(run_dir)["done"]
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
