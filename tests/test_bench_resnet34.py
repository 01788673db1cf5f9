"""reproduce/bench_resnet34_gpu.py runs (on CPU: --quick), measuring both phases and each table row's time."""

import csv
from pathlib import Path

import pytest
from conftest import reproduce_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return reproduce_script("bench_resnet34_gpu")


def test_a_stream_step_is_timed_and_each_row_has_its_phases():
    from tnlit.tensorize import Rule, TensorizePlan

    bench = _script()
    plan = TensorizePlan(rules=[Rule(pattern=r"layer\d\.\d+\.conv[12]", format="tucker", cr=0.5)])
    # The global phase is timed by the same code (the slow --quick test runs both).
    result = bench.measure("slicewise", 4, plan, width=8, steps=1, warmup=1, device="cpu", precision=None)
    assert result["steps"] == 1 and result["images_per_s"] > 0 and result["model_cr"] > 0.4
    rows = dict(bench.table_rows(ROOT / "configs/resnet34"))
    assert len(rows) == 11
    assert bench.phases(rows["cifar100/hybrid-50k_cr0.7"]) == [("slicewise", 8, 5), ("global", 64, 15)]


@pytest.mark.slow
def test_quick_run_writes_the_tables(tmp_path):
    assert _script().main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "bench_resnet34_gpu_rows.csv").open()))
    assert len(rows) == 11 and all(float(r["implied_min"]) > 0 for r in rows)
    assert (tmp_path / "bench_resnet34_gpu.provenance.json").exists()
