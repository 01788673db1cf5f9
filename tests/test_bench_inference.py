"""reproduce/bench_inference.py on a tiny saved GPT-2 directory: it writes its tables (no timing is asserted)."""

import csv

from conftest import reproduce_script, tiny_gpt2


def test_bench_inference_smoke_on_a_saved_hf_directory(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "lm")
    bench = reproduce_script("bench_inference")
    bench.main(
        [
            "--model",
            str(tmp_path / "lm"),
            "--crs",
            "0.3",
            "--prefill_tokens",
            "16",
            "--new_tokens",
            "3",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    rows = list(csv.DictReader((tmp_path / "out" / "bench_inference.csv").open()))
    assert [r["variant"] for r in rows] == ["teacher", "mpo2", "mpo2 (no inference_mode)", "lowrank", "auto-fast"]
    assert all(float(r["params_ratio"]) <= 0.7 + 0.01 for r in rows[1:])
    assert "decode ratio" in (tmp_path / "out" / "bench_inference.md").read_text()
    assert (tmp_path / "out" / "bench_inference.provenance.json").is_file()
