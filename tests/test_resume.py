"""compress() stopped in the middle of a slice, then rerun, ends exactly where a run never stopped ends.

The data are shuffled, so this also holds the data order: a resumed phase must draw, epoch for epoch, the
order that the uninterrupted run drew (the global RNG states travel in the epoch checkpoint). Two stops: an
exception in a training step (in-process, fast), and SIGKILL of a child process (slow: three interpreters).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tnlit import Rule, TensorizePlan
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.pipeline import SliceSettings, compress

EPOCHS, BATCHES = 3, 4  # batches an epoch: 32 sequences of 8
FIRST, SECOND = "transformer.h.0.mlp", "transformer.h.1.mlp"


class ShuffledTokens(RandomTokensDataModule):
    """Made token sequences, reshuffled every epoch from the global torch RNG (DataLoader's RandomSampler).

    ``root`` is unused: a hyper-parameter of type Path, as a real DataModule's data directory is one.
    """

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(shuffle=True)
        self.save_hyperparameters()


def run(run_dir: Path) -> dict:
    """Serial slices fed by teacher forwards, so that every slice's epochs draw from the shuffled DataModule."""
    return compress(
        teacher="tiny-gpt2",
        data=ShuffledTokens(root=Path("data")),
        task="causal_lm",
        run_dir=run_dir,
        plan=TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)]),
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="serial", serial_source="teacher", epochs=EPOCHS, lr=1e-2),
    )


def counting(steps: dict[str, int], crash_at: tuple[str, int] | None = None, pause: float = 0.0) -> Callable:
    """SliceDistillation's training step, counted per slice into ``steps``; raising at ``(slice, step)``."""
    step = SliceDistillation.training_step

    def counted(self, batch, batch_idx):
        name = self.slices[0].name
        steps[name] = steps.get(name, 0) + 1
        if (name, steps[name]) == crash_at:
            raise RuntimeError("simulated crash")
        time.sleep(pause)
        return step(self, batch, batch_idx)

    return counted


def assert_same_run(got: Path, expected: Path) -> None:
    """Bit for bit the same student, and the same metrics."""
    a, b = load_file(got / "student.safetensors"), load_file(expected / "student.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    state, reference = (json.loads((d / "state.json").read_text()) for d in (got, expected))
    for key in ("teacher_metric", "init_metric", "metrics", "final_metric"):
        assert state[key] == reference[key], key


def test_crash_mid_slice_resumes_with_the_uninterrupted_data_order(tmp_path, monkeypatch):
    run(tmp_path / "clean")
    step = SliceDistillation.training_step
    # The 2nd batch of the second slice's 2nd epoch: after its 1st epoch's checkpoint.
    monkeypatch.setattr(SliceDistillation, "training_step", counting({}, crash_at=(SECOND, BATCHES + 2)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed")
    first_slice = tmp_path / f"crashed/slices/{FIRST}.safetensors"
    mtime = first_slice.stat().st_mtime_ns
    steps: dict[str, int] = {}
    monkeypatch.setattr(SliceDistillation, "training_step", step)
    monkeypatch.setattr(SliceDistillation, "training_step", counting(steps))
    run(tmp_path / "crashed")
    # The finished slice is loaded, not trained again; the second resumes after its checkpointed epoch.
    assert steps == {SECOND: (EPOCHS - 1) * BATCHES}
    assert first_slice.stat().st_mtime_ns == mtime
    assert_same_run(tmp_path / "crashed", tmp_path / "clean")


CHILD = """
import json, sys

import torch

sys.path.insert(0, {tests!r})
from test_resume import counting, run
from tnlit.methods.slice_distill import SliceDistillation

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # two runs share the cores; one thread each gives every run the same numbers
steps = {{}}
# The pause slows the run that the test kills, so that the kill lands inside an epoch.
SliceDistillation.training_step = counting(steps, pause=float(sys.argv[2]))
run(sys.argv[1])
print(json.dumps(steps))
"""


def start(script: Path, run_dir: Path, pause: float = 0.0) -> subprocess.Popen:
    # Files, not pipes: nobody reads a pipe while the child runs, and a full one would stall it.
    with open(run_dir.with_suffix(".out"), "w") as out, open(run_dir.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(script), str(run_dir), str(pause)], stdout=out, stderr=err)


def finish(child: subprocess.Popen, run_dir: Path) -> dict[str, int]:
    """The child's training steps per slice, once it has exited cleanly."""
    assert child.wait(timeout=300) == 0, run_dir.with_suffix(".err").read_text()[-3000:]
    return json.loads(run_dir.with_suffix(".out").read_text().strip().splitlines()[-1])


@pytest.mark.slow
def test_kill_9_mid_slice_then_rerun_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    reference = start(script, clean)  # alongside the run to kill: the two imports overlap
    victim = start(script, killed, pause=0.05)

    # Kill as soon as the second slice's first epoch checkpoint exists: its 2nd epoch is under way.
    ckpt = killed / "ckpt" / f"slice_{SECOND}" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists():
        assert victim.poll() is None, f"the run ended before it was killed: {killed.with_suffix('.err').read_text()}"
        assert time.monotonic() < deadline, "no epoch checkpoint of the second slice within 300 s"
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert not (killed / "student.safetensors").exists() and not (killed / f"slices/{SECOND}.safetensors").exists()
    first_slice = killed / f"slices/{FIRST}.safetensors"
    times = json.loads((killed / "state.json").read_text())["times"][f"slice:{FIRST}"]
    before = first_slice.stat().st_mtime_ns, times

    steps = finish(start(script, killed), killed)
    # The finished slice is loaded, not trained again; the second resumes after a checkpointed epoch.
    assert FIRST not in steps and 0 < steps[SECOND] <= (EPOCHS - 1) * BATCHES
    state = json.loads((killed / "state.json").read_text())
    assert (first_slice.stat().st_mtime_ns, state["times"][f"slice:{FIRST}"]) == before

    assert finish(reference, clean) == {FIRST: EPOCHS * BATCHES, SECOND: EPOCHS * BATCHES}
    assert_same_run(killed, clean)
