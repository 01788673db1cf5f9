"""reproduce/bench_gpt2_xl_gpu.py --quick runs anywhere and writes its table (the real run waits for a GPU)."""

import csv

from conftest import reproduce_script


def test_quick_bench_writes_its_table(tmp_path):
    bench = reproduce_script("bench_gpt2_xl_gpu")
    bench.main(["--quick", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "bench_gpt2_xl_gpu.csv").open()))
    assert [r["measure"].split()[0] for r in rows] == ["slice", "teacher", "stream"]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert float(rows[2]["implied_min"]) > 0 and rows[2]["paper_min"] == "531.35"
