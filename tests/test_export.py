"""tnlit.export and tnlit.inference: load a student without its teacher, export it to Hugging Face (round trip,
generation, dense merge, the refusal without trust_remote_code), and inference mode's choices."""

import json
import shutil

import pytest
import torch
from conftest import tiny_gpt2
from torch import nn

from tnlit import Rule, TensorizePlan, export_student, inference_mode, load_student, merge_dense, tensorize
from tnlit.cli import run_command
from tnlit.commands.compress import print_result
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.layers import LowRankLinear, MPOLinear, TensorizedLayer
from tnlit.pipeline import SliceSettings, compress

GPT2_MLP = r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"
LLAMA_MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A finished compress run whose teacher was a Hugging Face directory, deleted afterwards (weights and config)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "teacher")
    state = compress(
        teacher=str(root / "teacher"),
        data=RandomTokensDataModule(num_sequences=8, seq_len=12, vocab_size=101),
        task="causal_lm",
        plan=TensorizePlan([Rule(LLAMA_MLP, "lowrank", cr=0.5)]),
        run_dir=root / "run",
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
    )
    shutil.rmtree(root / "teacher")
    return root / "run", state


def test_load_student_from_a_run_whose_teacher_was_deleted(llama_run):
    run_dir, _ = llama_run
    student = load_student(run_dir)
    saved = {k: v for k, v in student.state_dict().items()}
    from safetensors.torch import load_file

    for k, v in load_file(run_dir / "student.safetensors").items():
        assert torch.equal(saved[k], v), k
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == 6
    assert not student.training


def test_compress_ends_with_the_way_out(llama_run, capsys):
    run_dir, state = llama_run
    print_result(state)
    out = capsys.readouterr().out
    assert "whole-model CR 0." in out and "student.safetensors" in out
    assert f"tnlit export --run_dir {run_dir}" in out


def test_export_command_round_trip_with_generate(llama_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, _ = llama_run
    out = tmp_path / "hf"
    run_command(["export", "--run_dir", str(run_dir), "--out", str(out)])
    assert "trust_remote_code=True" in capsys.readouterr().out
    for name in ("config.json", "modeling_tnlit.py", "model.safetensors", "report.json", "tnlit_plan.json"):
        assert (out / name).is_file(), name
    student = load_student(run_dir)
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    x = torch.randint(0, 101, (2, 10))
    assert (logits(back, x) - logits(student, x)).abs().max() <= 1e-5
    with torch.no_grad():
        ours = student.generate(x[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        theirs = back.generate(x[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(ours, theirs)
    assert (logits(load_student(out), x) - logits(student, x)).abs().max() <= 1e-5  # load_student of the export


@pytest.mark.parametrize("make,pattern", [(tiny_gpt2, GPT2_MLP), (tiny_llama, LLAMA_MLP)], ids=["gpt2", "llama"])
def test_hf_round_trip_and_the_refusal_without_remote_code(make, pattern, tmp_path):
    from transformers import AutoModelForCausalLM

    student, _ = tensorize(make(), TensorizePlan([Rule(pattern, "mpo", cr=0.5)]))
    export_student(student, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    assert sum(isinstance(m, MPOLinear) for m in back.modules()) == (4 if make is tiny_gpt2 else 6)
    x = torch.randint(0, 100, (2, 9))
    assert (logits(back, x) - logits(student, x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_dense_merge_equals_every_layers_dense_weight(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    student, _ = tensorize(tiny_gpt2(), TensorizePlan([Rule(GPT2_MLP, "lowrank", cr=0.5)]))
    merged = merge_dense(student)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, TensorizedLayer)}
    for name, layer in layers.items():
        assert torch.equal(merged.get_submodule(name).weight, layer.to_dense_weight().detach())
    assert not any(isinstance(m, TensorizedLayer) for m in merged.modules())
    export_student(student, tmp_path / "dense", dense=True)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)  # no custom code
    assert type(back) is GPT2LMHeadModel
    x = torch.randint(0, 100, (1, 8))
    assert (logits(back, x) - logits(student, x)).abs().max() <= 1e-5


def test_a_tensorized_resnet_through_load_student(tmp_path):
    from tnlit.models import load_model

    teacher = load_model("cifar-resnet34-w8").eval()
    student, _ = tensorize(teacher, TensorizePlan([Rule(r"layer4\.\d\.conv\d", "tucker", cr=0.5)]))
    export_student(student, tmp_path / "resnet", teacher="cifar-resnet34-w8")
    back = load_student(tmp_path / "resnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (back(x) - student.eval()(x)).abs().max() <= 1e-5


def test_inference_mode_caches_only_where_cheapest_and_within_budget():
    torch.manual_seed(0)
    big = MPOLinear.from_dense(nn.Linear(64, 64))  # exact two-site MPO: bond 64, many times the dense FLOPs
    small = LowRankLinear.from_dense(nn.Linear(64, 64), rank=4)
    model = nn.Sequential(big, small)
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = model(x)
        info = inference_mode(model)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert big.strategy(1) == "cached" and small.strategy(1) == "factors"
    assert info.cached_bytes == 64 * 64 * 4
    with torch.no_grad():  # a changed factor rebuilds the cache
        big.cores[0].mul_(2)
        assert torch.allclose(model(x), small(big(x)), atol=1e-5)
    model.train()  # back to training: no cache, training strategies
    assert big.strategy(1) in ("factors", "dense") and big._dense is None
    inference_mode(model, max_cache_bytes=1000)  # the weight does not fit
    assert big.strategy(1) in ("factors", "dense")


@pytest.mark.slow
def test_load_student_under_torch_compile(llama_run):
    student = load_student(llama_run[0])
    inference_mode(student)
    compiled = torch.compile(student)
    x = torch.randint(0, 101, (1, 8))
    assert (logits(compiled, x) - logits(student, x)).abs().max() <= 1e-4
