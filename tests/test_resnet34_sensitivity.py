"""The per-layer sensitivity sweep: one layer tensorized at a time, the top-1 drop, the plan without the k worst."""

import re

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from tnlit.analysis.sensitivity import LayerSensitivity, sensitivity_plan, sensitivity_sweep, write_sensitivity
from tnlit.tensorize import Rule, TensorizePlan, tensorize


def test_the_plan_keeps_the_k_layers_of_the_largest_drop_dense_in_network_order():
    rule = Rule(pattern=r"layer\d\.\d+\.conv[12]", format="tucker", cr=0.5)
    drops = [0.1, 3.0, 0.0, 2.0, 5.0, 2.0]
    rows = [
        LayerSensitivity(f"layer1.{i}.conv1", [8, 8, 3, 3], [4, 4], 0.6, 0.5, 90 - d, d) for i, d in enumerate(drops)
    ]
    plan = sensitivity_plan(rows, rule, k=3)
    assert plan.exclude == [r"layer1\.1\.conv1", r"layer1\.3\.conv1", r"layer1\.4\.conv1"]  # 2.0 tie: the earlier
    assert sensitivity_plan(rows, rule, k=0).exclude == []


def test_sweep_measures_each_layer_alone_and_writes_csv_plot_and_a_plan_compress_reads(tmp_path):
    from tnlit.models import load_model

    model = load_model("cifar-resnet34-w8").eval()
    images, labels = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=24)
    rule = Rule(pattern=r"layer[34]\.0\.conv[12]", format="tucker", cr=0.5)
    dense, rows = sensitivity_sweep(model, loader, rule)
    assert [r.name for r in rows] == ["layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"]
    # Each row is the model with that layer alone tensorized.
    student, _ = tensorize(model, TensorizePlan(rules=[Rule(re.escape(rows[2].name), "tucker", cr=0.5)]))
    with torch.no_grad():
        expected = 100 * (student(images).argmax(-1) == labels).float().mean().item()
    assert abs(rows[2].top1 - expected) < 1e-3 and abs(rows[2].drop - (dense - expected)) < 1e-3
    plan = sensitivity_plan(rows, rule, k=2)
    paths = write_sensitivity(rows, dense, plan, tmp_path / "sens", title="test")
    assert paths["csv"].read_text().startswith("name,shape,ranks,cr,rel_error,dense_top1,top1,drop,excluded")
    assert paths["png"].stat().st_size > 1000
    loaded = yaml.safe_load(paths["plan"].read_text())["plan"]
    assert loaded["exclude"] == plan.exclude and loaded["rules"] == [
        {"pattern": rule.pattern, "format": "tucker", "cr": 0.5}
    ]
    # The written plan is a valid TensorizePlan that keeps those layers dense.
    _, report = tensorize(model, TensorizePlan(**loaded))
    assert len(report.layers) == 2


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_made_data(tmp_path, monkeypatch):
    from conftest import reproduce_script

    monkeypatch.chdir(tmp_path)
    script = reproduce_script("resnet34_sensitivity")
    assert script.main(["--smoke", "--dataset", "cifar100", "--k", "3"]) == 0
    out = tmp_path / "runs/resnet34_smoke/results"
    assert len(yaml.safe_load((out / "resnet34_cifar100_sensitivity_plan.yaml").read_text())["plan"]["exclude"]) == 3
    assert (out / "resnet34_cifar100_sensitivity.provenance.json").exists()
