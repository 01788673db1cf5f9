"""Slice-parallel compress (tnlit.distributed): torchrun with 2 CPU processes (gloo) trains the same slices as one
process, writes the student once, resumes per slice, and a failure on one rank ends every rank with its error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tnlit.distributed import partition
from tnlit.pipeline import SliceSettings

TORCHRUN = Path(sys.executable).with_name("torchrun")

CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_recipe import PLAN, TokenData
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.pipeline import FinetuneSettings, SliceSettings, compress

fail_rank = os.environ.get("FAIL_RANK")
if fail_rank is not None and os.environ["RANK"] == fail_rank:
    def broken(self, batch, batch_idx):
        raise RuntimeError("injected failure")
    SliceDistillation.training_step = broken

state = compress(
    teacher="tiny-gpt2", data=TokenData(), plan=PLAN, task="causal_lm", run_dir=Path(sys.argv[1]), accelerator="cpu",
    progress=False, slicewise=SliceSettings(mode=sys.argv[2], epochs=2, lr=1e-2),
    method=sys.argv[3] if len(sys.argv) > 3 else "slicewise", finetune=FinetuneSettings(epochs=2, lr=1e-3),
)
print("RESULT", os.environ["RANK"], "done" if state.get("done") else "worker", flush=True)
"""


def torchrun(
    tmp_path: Path, run_dir: Path, mode: str, method: str = "slicewise", timeout: float = 240, **env: str
) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(run_dir), mode, method]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ)


def test_partition_is_consecutive_and_balanced_by_size():
    assert partition([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert partition([3, 3], 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    shares = partition([10] * 48, 5)
    assert [len(s) for s in shares] == [9, 9, 10, 10, 10] or max(len(s) for s in shares) == 10
    assert [i for s in shares for i in s] == list(range(48))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_two_ranks_train_the_slices_of_a_one_process_run(tmp_path):
    from test_recipe import run

    run(tmp_path / "one", slicewise=SliceSettings(mode="stream", epochs=2, lr=1e-2))
    job = torchrun(tmp_path, tmp_path / "job", "stream")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "RESULT 0 done" in job.stdout and "RESULT 1 worker" in job.stdout
    for name in ("transformer.h.0.mlp", "transformer.h.1.mlp"):
        a, b = (load_file(d / "slices" / f"{name}.safetensors") for d in (tmp_path / "one", tmp_path / "job"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    state = json.loads((tmp_path / "job/state.json").read_text())
    one = json.loads((tmp_path / "one/state.json").read_text())
    assert state["done"] and state["final_metric"]["perplexity"] == pytest.approx(one["final_metric"]["perplexity"])
    shares = state["distributed"]
    assert [r["slices"] for r in shares["ranks"]] == [["transformer.h.0.mlp"], ["transformer.h.1.mlp"]]
    assert shares["optimisation_s"] == max(r["optimisation_s"] for r in shares["ranks"]) > 0
    assert {"slicewise:rank0-of-2", "slicewise:rank1-of-2"} <= set(state["times"])


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_resumes_per_slice(tmp_path):
    from test_recipe import run

    run(tmp_path / "one", slicewise=SliceSettings(mode="serial", epochs=2, lr=1e-2))
    job = torchrun(tmp_path, tmp_path / "job", "serial")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    state = json.loads((tmp_path / "job/state.json").read_text())
    assert {"cache:rank0", "cache:rank1"} <= set(state["times"]), "each rank built its own activation store"
    # One slice lost, one kept: only the lost one trains again, to the same weights.
    lost = tmp_path / "job/slices/transformer.h.1.mlp.safetensors"
    kept = tmp_path / "job/slices/transformer.h.0.mlp.safetensors"
    before = kept.stat().st_mtime_ns
    lost.unlink()
    (tmp_path / "job/student.safetensors").unlink()
    state_file = tmp_path / "job/state.json"
    state.pop("done")
    state_file.write_text(json.dumps(state))
    again = torchrun(tmp_path, tmp_path / "job", "serial")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert kept.stat().st_mtime_ns == before and lost.exists()
    a, b = load_file(tmp_path / "one/slices/transformer.h.1.mlp.safetensors"), load_file(lost)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_failure_on_one_rank_ends_every_rank_with_its_error(tmp_path, rank):
    job = torchrun(tmp_path, tmp_path / "job", "stream", timeout=180, FAIL_RANK=str(rank))
    out = job.stdout + job.stderr
    assert job.returncode != 0
    assert "RESULT" not in out
    # The other rank says the failed rank's error itself (PeerFailure), besides the failed rank's own traceback.
    said = f"tnlit rank {1 - rank}: stopping, rank {rank} of 2 failed: RuntimeError: injected failure"
    assert said in out, out[-4000:]
    assert not (tmp_path / "job/student.safetensors").exists()
    assert not (tmp_path / f"job/slices/transformer.h.{rank}.mlp.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_hybrid_shares_the_slices_then_finetunes_under_ddp(tmp_path):
    job = torchrun(tmp_path, tmp_path / "job", "stream", "hybrid")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    state = json.loads((tmp_path / "job/state.json").read_text())
    assert state["done"] and state["final_metric"] == state["metrics"]["global"]
    assert state["metrics"]["slicewise"] != state["metrics"]["global"]
    # Both ranks trained the global phase (DDP: half the batches each); rank 0 alone wrote the run's files.
    worker = json.loads((tmp_path / "job/ranks/rank1/state.json").read_text())
    assert worker["times"]["global"]["optimisation_s"] > 0 and state["times"]["global"]["optimisation_s"] > 0
    assert (tmp_path / "job/global.safetensors").exists()
    assert "in distributed setting" in job.stderr, "Lightning's DDP ran the global phase (its sync_dist warning)"
