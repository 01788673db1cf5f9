"""tnlit quickstart on a miniature of its configs: teachers trained once and reused, every run, every results file."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tnlit.commands.quickstart import quickstart, shipped_configs

TEACHER = """
seed_everything: 0
trainer:
  max_steps: 3
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_model_summary: false
  accelerator: cpu
model:
  class_path: tnlit.methods.teacher.CausalLM
  init_args:
    model: tiny-gpt2-bytes
    warmup_steps: 1
data:
  class_path: tnlit.data.offline.PydocTextDataModule
  init_args:
    seq_len: 32
    batch_size: 4
    train_sequences: 12
"""

RUN = """
teacher: tiny-gpt2-bytes
teacher_weights: {teachers}/tiny-gpt2-bytes.safetensors
task: causal_lm
data:
  class_path: tnlit.data.offline.PydocTextDataModule
  init_args:
    seq_len: 32
    batch_size: 64
    train_sequences: 128
plan:
  rules:
    - pattern: 'transformer\\.h\\.[01]\\.mlp\\.c_(fc|proj)'
      format: mpo
      cr: 0.5
method: {method}
slicewise:
  epochs: 1
  lr: 3.0e-3
finetune:
  epochs: 1
  lr: 1.0e-3
accelerator: cpu
eval_each_epoch: true
run_dir: {runs}/{method}
"""


METHODS = ("global", "hybrid", "slicewise")


def make_configs(tmp_path):
    """A miniature of the shipped layout: configs/<model>/<dataset>/<method>_cr<rate>.yaml and a quickstart.yaml."""
    configs, teachers, runs = tmp_path / "configs", tmp_path / "teachers", tmp_path / "runs"
    (configs / "mini/pydoc").mkdir(parents=True)
    (configs / "mini/pydoc/teacher.yaml").write_text(TEACHER)
    for method in METHODS:
        (configs / f"mini/pydoc/{method}_cr0.5.yaml").write_text(
            RUN.format(teachers=teachers, runs=runs, method=method)
        )
    listed = {
        "teachers": {"tiny-gpt2-bytes": "mini/pydoc/teacher.yaml"},
        "runs": [f"mini/pydoc/{method}_cr0.5.yaml" for method in METHODS],
    }
    (configs / "quickstart.yaml").write_text(yaml.safe_dump(listed))
    return configs, teachers


def test_quickstart_trains_teachers_once_runs_every_config_and_writes_the_results(tmp_path, capsys):
    configs, teachers = make_configs(tmp_path)
    results = tmp_path / "results"
    rows = quickstart(configs=configs, results=results, teachers=teachers, progress=False)

    assert [r["method"] for r in rows] == list(METHODS)  # in the list's order
    facts = json.loads((teachers / "tiny-gpt2-bytes.json").read_text())
    assert facts["train_s"] > 0 and "val/ppl" in facts["val_metrics"]
    with open(results / "quickstart.csv") as f:
        table = list(csv.DictReader(f))
    # The config's path under configs/, not its stem: stems repeat across models.
    assert [t["config"] for t in table] == [f"mini/pydoc/{method}_cr0.5" for method in METHODS]
    for t in table:
        assert 0 < float(t["optimisation_s"]) <= float(t["wall_s"])
        # The start counts as a point of the curve: the best is never worse than the start or the end.
        assert float(t["best_metric"]) <= min(float(t["final_metric"]), float(t["init_metric"]))
    md = (results / "quickstart.md").read_text()
    assert "| 0.5 |" in md and "hybrid" in md
    assert (results / "quickstart.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((results / "quickstart.provenance.json").read_text())
    assert provenance["git_commit"] and len(provenance["config"]["configs"]) == 4  # the teacher's and 3 runs
    assert "method: hybrid" in provenance["config"]["configs"]["mini/pydoc/hybrid_cr0.5.yaml"]

    # A rerun trains nothing: the teacher is reused and every run is finished.
    weights = teachers / "tiny-gpt2-bytes.safetensors"
    mtime = weights.stat().st_mtime_ns
    capsys.readouterr()
    again = quickstart(configs=configs, results=results, teachers=teachers, only="hybrid", progress=False)
    assert weights.stat().st_mtime_ns == mtime and "reusing" in capsys.readouterr().out
    assert [r["final_metric"] for r in again] == [rows[1]["final_metric"]]


def test_a_damaged_teacher_is_said_and_trained_again(tmp_path):
    configs, teachers = make_configs(tmp_path)
    quickstart(configs=configs, results=tmp_path / "results", teachers=teachers, only="global", progress=False)
    weights = teachers / "tiny-gpt2-bytes.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable.*training again"):
        from tnlit.commands.quickstart import train_teacher

        train_teacher(configs / "mini/pydoc/teacher.yaml", teachers, progress=False, name="tiny-gpt2-bytes")
    assert weights.stat().st_size > 100


def test_no_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compress config matching 'nothing'"):
        quickstart(configs=make_configs(tmp_path)[0], only="nothing", teachers=tmp_path / "t", progress=False)


def test_a_folder_without_a_list_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quickstart.yaml"):
        quickstart(configs=tmp_path, teachers=tmp_path / "t", progress=False)


def test_the_shipped_list_names_existing_configs_and_the_weights_they_read():
    configs = shipped_configs()
    listed = yaml.safe_load((configs / "quickstart.yaml").read_text())
    assert len(listed["runs"]) == 12 and len(listed["teachers"]) == 2
    for teacher in listed["teachers"].values():
        assert (configs / teacher).is_file()
    for run in listed["runs"]:
        weights = Path(yaml.safe_load((configs / run).read_text())["teacher_weights"])
        # The quickstart writes a teacher's weights as <its name in the list>.safetensors: the file the run reads.
        assert weights.stem in listed["teachers"] and weights.parent == Path("runs/quickstart/teachers")


def test_the_default_finds_the_shipped_configs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no compress config matching 'nothing' in .*quickstart.yaml"):
        quickstart(only="nothing", teachers=tmp_path / "t", progress=False)
