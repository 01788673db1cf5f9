"""tensorize() and its report on real architectures, and every kind of bad plan."""

import csv
import json

import pytest
import torch
import torchvision
from conftest import tiny_gpt2

from tnlit import Rule, TensorizeError, TensorizePlan, estimate, tensorize
from tnlit.layers import MPOLinear, TuckerConv2d
from tnlit.models import load_model

GPT2_MLP = r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"
RESNET_3X3 = r"layer\d\.\d+\.conv[12]"
RESNET_EXCLUDE = [r"layer1\.0\.conv1", r"layer2\.0\.conv1", r"layer3\.0\.conv1", r"layer4\.0\.conv1"]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def resnet34_tucker():
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(weights=None).eval()
    before = snapshot(teacher)
    plan = TensorizePlan(rules=[Rule(pattern=RESNET_3X3, format="tucker", cr=0.5)], exclude=RESNET_EXCLUDE)
    student, report = tensorize(teacher, plan)
    return teacher, before, student, report


def test_resnet34_tucker_cr05(resnet34_tucker):
    teacher, before, student, report = resnet34_tucker
    assert_unchanged(teacher, before)
    assert len(report.layers) == 32 - 4
    assert {r.name for r in report.layers}.isdisjoint({"layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"})
    assert report.params_before == count(teacher)
    assert report.params_after == count(student)
    assert report.params_before - report.params_after == sum(r.weight_params - r.factor_params for r in report.layers)
    assert all(r.cr >= 0.5 for r in report.layers)
    tensorized = [n for n, m in student.named_modules() if isinstance(m, TuckerConv2d)]
    assert tensorized == [r.name for r in report.layers]
    assert isinstance(student.get_submodule("layer1.0.conv1"), torch.nn.Conv2d)
    with torch.no_grad():
        assert student(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_estimate_matches_tensorize_and_runs_on_meta(resnet34_tucker):
    teacher, _, _, report = resnet34_tucker
    plan = TensorizePlan(rules=[Rule(pattern=RESNET_3X3, format="tucker", cr=0.5)], exclude=RESNET_EXCLUDE)
    on_meta = estimate(load_model("resnet34", meta=True), plan)
    assert on_meta.params_after == report.params_after
    assert [r.ranks for r in on_meta.layers] == [r.ranks for r in report.layers]
    assert all(r.rel_error is None for r in on_meta.layers)


def test_tiny_gpt2_mpo_cr048():
    teacher = tiny_gpt2()
    before = snapshot(teacher)
    plan = TensorizePlan(rules=[Rule(pattern=GPT2_MLP, format="mpo", sites=2, cr=0.48)])
    student, report = tensorize(teacher, plan)
    assert_unchanged(teacher, before)
    expected = [f"transformer.h.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")]
    assert [r.name for r in report.layers] == expected
    assert report.params_after == count(student) and report.params_before == count(teacher)
    assert all(isinstance(student.get_submodule(r.name), MPOLinear) for r in report.layers)
    assert all(r.cr >= 0.48 and 0 < r.rel_error < 1 for r in report.layers)
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert student(ids).logits.shape == (2, 16, 101)


def test_tiny_gpt2_at_full_bond_gives_the_teachers_logits():
    teacher = tiny_gpt2().double()
    student, _ = tensorize(teacher, TensorizePlan(rules=[Rule(pattern=GPT2_MLP, format="mpo")]))
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        a, b = student(ids).logits, teacher(ids).logits
    assert (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item() < 1e-10


def test_gpt2_xl_whole_model_cr_030_from_config():
    # No weights: the architecture on the meta device, the factors counted in closed form.
    report = estimate(load_model("gpt2-xl-arch", meta=True), TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.48, sites=2)]))
    assert len(report.layers) == 96
    assert all(r.ranks == [832] for r in report.layers)
    assert {r.site_dims for r in report.layers} == {"40x40 -> 80x80", "80x80 -> 40x40"}
    assert report.params_before == 1_557_611_200
    assert round(report.compression_rate, 2) == 0.30


def test_first_matching_rule_wins_and_lowrank():
    teacher = tiny_gpt2()
    plan = TensorizePlan(
        rules=[Rule(r"transformer\.h\.0\.mlp\.c_fc", "lowrank", rank=4), Rule(GPT2_MLP, "mpo", bond_dim=3)]
    )
    _, report = tensorize(teacher, plan)
    assert [(r.format, r.ranks) for r in report.layers] == [("lowrank", [4]), ("mpo", [3]), ("mpo", [3]), ("mpo", [3])]


def test_report_writes_csv_and_json(tmp_path):
    _, report = tensorize(tiny_gpt2(), TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.5)]))
    report.to_csv(tmp_path / "r.csv")
    report.to_json(tmp_path / "r.json")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["name"] for r in rows] == [r.name for r in report.layers]
    assert float(rows[0]["rel_error"]) == pytest.approx(report.layers[0].rel_error)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["params_after"] == report.params_after
    assert data["compression_rate"] == pytest.approx(report.compression_rate)
    text = str(report)
    assert "whole-model CR" in text and "transformer.h.1.mlp.c_proj" in text


@pytest.mark.parametrize(
    ("plan", "needles"),
    [
        (TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_fcc", "mpo", cr=0.5)]), ["matches no module", "named like"]),
        (TensorizePlan([Rule(r"transformer\.ln_f", "mpo", cr=0.5)]), ["LayerNorm", "takes nn.Linear or Hugging Face"]),
        (TensorizePlan([Rule(GPT2_MLP, "tucker", cr=0.5)]), ["Conv1D 32x128", "format 'tucker' takes nn.Conv2d"]),
        (TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.999)]), ["transformer.h.0.mlp.c_fc", "out of reach", "at most"]),
        (TensorizePlan([Rule(GPT2_MLP, "mpo", bond_dim=10_000)]), ["bond dimension 10000 is impossible", "use 1 to"]),
        (TensorizePlan([Rule(GPT2_MLP, "lowrank", rank=33)]), ["rank 33 is impossible", "use 1 to 32"]),
        (TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.5)], exclude=["nothing"]), ["exclude pattern 'nothing'"]),
        (TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.5)], exclude=[GPT2_MLP]), ["selects no module"]),
    ],
    ids=["typo", "layernorm", "conv1d_as_tucker", "cr", "bond", "rank", "exclude_typo", "all_excluded"],
)
def test_bad_plans_name_the_module_and_return_nothing(plan, needles):
    teacher = tiny_gpt2()
    before = snapshot(teacher)
    with pytest.raises(TensorizeError) as err:
        tensorize(teacher, plan)
    for needle in needles:
        assert needle in str(err.value)
    assert_unchanged(teacher, before)


def test_all_problems_reported_together():
    plan = TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.999), Rule("nope", "mpo")], exclude=["none"])
    with pytest.raises(TensorizeError) as err:
        tensorize(tiny_gpt2(), plan)
    assert str(err.value).count("\n  - ") == 4 + 1 + 1


def test_grouped_conv_and_tensorized_modules_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(TensorizeError, match="groups=2"):
        tensorize(net, TensorizePlan([Rule(r"\d", "tucker", cr=0.3)]))
    student, _ = tensorize(net, TensorizePlan([Rule("1", "tucker", cr=0.3)]))
    with pytest.raises(TensorizeError, match="already tensorized"):
        tensorize(student, TensorizePlan([Rule("1", "tucker", cr=0.3)]))


def test_meta_model_cannot_be_tensorized():
    with pytest.raises(TensorizeError, match="estimate"):
        tensorize(load_model("tiny-gpt2", meta=True), TensorizePlan([Rule(GPT2_MLP, "mpo", cr=0.5)]))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(pattern="a", format="cp"), "format must be one of"),
        (dict(pattern="(", format="mpo"), "not a valid regular expression"),
        (dict(pattern="a", format="mpo", cr=0.5, bond_dim=3), "at most one of cr, rank and bond_dim"),
        (dict(pattern="a", format="tucker", bond_dim=3), "bond_dim is for the 'mpo' format"),
        (dict(pattern="a", format="mpo", rank=3), "takes bond_dim or cr"),
        (dict(pattern="a", format="tucker", rank=3), "pair"),
        (dict(pattern="a", format="lowrank", cr=1.5), "strictly between 0 and 1"),
        (dict(pattern="a", format="mpo", sites=0), "sites must be a positive integer"),
    ],
)
def test_rule_validation(kwargs, needle):
    with pytest.raises(TensorizeError, match=needle):
        Rule(**kwargs)
