"""reproduce/resnet34_cifar.py: the --smoke run end to end on made CIFAR data, and the one-run-per-GPU scheduler."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import reproduce_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return reproduce_script("resnet34_cifar")


def _smoke(tmp_path, monkeypatch, only):
    monkeypatch.chdir(tmp_path)
    script = _script()
    argv = ["--smoke", "--configs", str(ROOT / "configs/resnet34")] + (["--only", only] if only else [])
    assert script.main(argv) == 0
    results = tmp_path / "runs/resnet34_smoke/results"
    rows = list(csv.DictReader((results / "resnet34_cifar.csv").open()))
    assert all(r["status"] == "done" for r in rows)
    assert (results / "resnet34_cifar.png").stat().st_size > 1000
    assert (results / "resnet34_cifar.provenance.json").exists()
    return script, rows, (results / "resnet34_cifar.md").read_text()


def test_smoke_selection_trains_both_teachers_runs_the_rows_and_writes_the_table(tmp_path, monkeypatch, capsys):
    script, rows, md = _smoke(tmp_path, monkeypatch, "cifar10/slicewise-10k_cr0.5|cifar100/hybrid")
    assert [r["config"] for r in rows] == ["cifar10/slicewise-10k_cr0.5", "cifar100/hybrid-50k_cr0.7"]
    assert rows[1]["paper_top1"] == "74.22" and rows[1]["paper_time_min"] == "106.01"
    assert float(rows[0]["compression_rate"]) > 0.4 and rows[0]["best_top1"]
    assert "SMOKE RUN" in md and "| 0.7 | hybrid | 50000 |" in md
    smoke_configs = str(tmp_path / "runs/resnet34_smoke/configs")
    capsys.readouterr()
    assert script.main(["--configs", smoke_configs, "--list", "--only", "cifar100/hybrid|cifar100/global-50k"]) == 0
    listed = capsys.readouterr().out
    assert (
        "cifar100/hybrid-50k_cr0.7        finished: top-1" in listed
        and "cifar100/global-50k_cr0.5        new" in listed
    )
    # Resumable: a second invocation reuses the teachers and the finished runs.
    state = tmp_path / "runs/resnet34_smoke/cifar100/hybrid-50k_cr0.7/state.json"
    times = json.loads(state.read_text())["times"]
    teacher = (tmp_path / "runs/resnet34_smoke/cifar100/teacher.safetensors").stat().st_mtime
    assert script.main(["--smoke", "--configs", str(ROOT / "configs/resnet34"), "--only", "cifar100/hybrid"]) == 0
    assert json.loads(state.read_text())["times"] == times  # nothing trained again
    assert (tmp_path / "runs/resnet34_smoke/cifar100/teacher.safetensors").stat().st_mtime == teacher
    # A teacher written after a run started makes that run stale: said, left out of the table, not reported as ours.
    os.utime(tmp_path / "runs/resnet34_smoke/cifar100/teacher.safetensors", (teacher + 60, teacher + 60))
    assert script.main(["--smoke", "--configs", str(ROOT / "configs/resnet34"), "--only", "cifar100/hybrid"]) == 1
    rows = list(csv.DictReader((tmp_path / "runs/resnet34_smoke/results/resnet34_cifar.csv").open()))
    assert rows[0]["status"].startswith("stale") and rows[0]["best_top1"] == ""


@pytest.mark.slow
def test_full_smoke_runs_every_row_of_the_table(tmp_path, monkeypatch):
    _, rows, _ = _smoke(tmp_path, monkeypatch, None)
    assert len(rows) == 11


def test_the_configs_cover_every_row_of_the_papers_table():
    script = _script()
    keys = [key for key, _ in script.find_configs(ROOT / "configs/resnet34", None)]
    assert keys == [k for k in script.paper_numbers() if not k.endswith("/teacher")]


def test_jobs_run_one_per_gpu_at_a_time(tmp_path):
    script = _script()
    code = "import os, sys, time; time.sleep(0.3); print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); sys.exit({})"
    jobs = [(f"job{i}", [sys.executable, "-c", code.format(int(i == 2))]) for i in range(4)]
    status = script.run_jobs(jobs, ["3", "5"], tmp_path / "logs")
    assert status == {"job0": 0, "job1": 0, "job2": 1, "job3": 0}
    assert (tmp_path / "logs/job0.log").read_text().strip() == "gpu 3"
    assert (tmp_path / "logs/job1.log").read_text().strip() == "gpu 5"


@pytest.mark.slow
def test_smoke_through_subprocesses_one_per_gpu_id(tmp_path, monkeypatch):
    # GPU ids on a CPU machine: the subprocess path (CUDA_VISIBLE_DEVICES, logs) runs the smoke configs on the CPU.
    monkeypatch.chdir(tmp_path)
    script = _script()
    only = "cifar10/slicewise-10k_cr0.5|cifar100/global-50k_cr0.5"
    assert script.main(["--smoke", "--configs", str(ROOT / "configs/resnet34"), "--gpus", "0,1", "--only", only]) == 0
    assert (tmp_path / "runs/resnet34_smoke/logs/cifar100_global-50k_cr0.5.log").exists()
    rows = list(csv.DictReader((tmp_path / "runs/resnet34_smoke/results/resnet34_cifar.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
