"""The causal-LM losses of global finetuning computed in chunks of tokens give the full-logit losses and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_causal_lm import GPT2_MLP, LLAMA_MLP, tiny_llama

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.methods.lm_loss import chunked_lm_loss, lm_split


def pair(family: str):
    from conftest import tiny_gpt2

    teacher = tiny_gpt2() if family == "gpt2" else tiny_llama()
    pattern = GPT2_MLP if family == "gpt2" else LLAMA_MLP
    student, _ = tensorize(copy.deepcopy(teacher), TensorizePlan([Rule(pattern, "mpo", sites=2, cr=0.5)]))
    return teacher, student


def step(teacher, student, ids, chunked: bool, kd_weight: float):
    module = GlobalFinetune(student, task="causal_lm", teacher=teacher, kd_weight=kd_weight, chunked_logits=chunked)
    module.log = lambda *args, **kwargs: None
    module.train()
    loss = module.training_step(ids, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad], module


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_chunked_losses_and_gradients_are_the_full_logits(family, kd_weight, monkeypatch):
    teacher, student = pair(family)
    ids = torch.randint(0, 101, (3, 16))
    # 7 tokens a chunk (101 logits each): 48 tokens in 7 chunks, the last one short.
    monkeypatch.setattr("tnlit.methods.lm_loss.CHUNK_ELEMENTS", 7 * 101)
    full, full_grads, module = step(teacher, copy.deepcopy(student), ids, chunked=False, kd_weight=kd_weight)
    assert module._split is None
    chunked, chunked_grads, module = step(teacher, copy.deepcopy(student), ids, chunked=True, kd_weight=kd_weight)
    assert module._split is not None  # the chunked path really ran
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    assert len(chunked_grads) == len(full_grads) > 0
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunk_size_does_not_change_the_losses():
    teacher, student = pair("llama")
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        hidden, target = student.model(ids).last_hidden_state, teacher.model(ids).last_hidden_state
    head, target_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    results = [
        chunked_lm_loss(hidden, ids, head, target=target, target_head=target_head, chunk_elements=n)
        for n in (1, 5 * 101, 10**9)
    ]
    for loss, task, kd in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(task, results[0][1])
        torch.testing.assert_close(kd, results[0][2])
    loss, task, kd = chunked_lm_loss(hidden, ids, head)
    assert kd is None and torch.isclose(task, results[0][1]) and torch.isclose(loss, task)


def test_the_heads_own_weight_gets_its_gradient_when_it_trains():
    # A head that trains (not tnlit's global phase, which trains factors only) gets the full path's gradient.
    torch.manual_seed(0)
    head, target_head = torch.nn.Linear(8, 11), torch.nn.Linear(8, 11)
    hidden, target = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    ids = torch.randint(0, 11, (2, 5))
    loss, _, _ = chunked_lm_loss(hidden, ids, head, target=target, target_head=target_head, chunk_elements=3 * 11)
    grads = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    logits, target_logits = head(hidden), target_head(target).detach()
    task = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kd = F.kl_div(
        F.log_softmax(logits.flatten(0, 1) / 2, -1),
        F.log_softmax(target_logits.flatten(0, 1) / 2, -1),
        log_target=True,
        reduction="batchmean",
    )
    expected = torch.autograd.grad(0.5 * task + 0.5 * kd * 4, [hidden, head.weight, head.bias])
    torch.testing.assert_close(loss, 0.5 * task + 0.5 * kd * 4)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_model_whose_logits_are_not_its_heads_output_keeps_the_full_logits():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        """A causal LM that rescales its logits after the head (as Cohere's logit_scale does)."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled(tiny_llama().config).eval()
    ids = torch.randint(0, 101, (2, 8))
    assert lm_split(model, ids) is None
    assert lm_split(tiny_llama(), ids) is not None
    assert lm_split(torch.nn.Linear(3, 3), ids) is None  # no head, no body


def test_small_batches_keep_the_full_logits():
    teacher, student = pair("llama")
    *_, module = step(teacher, student, torch.randint(0, 101, (3, 16)), chunked=True, kd_weight=0.5)
    assert module._split is None  # 48 x 101 logits: far below four chunks, the exact full-logit arithmetic


def test_the_benchmark_times_both_paths_on_one_model(tmp_path, monkeypatch):
    from conftest import reproduce_script

    monkeypatch.setattr("tnlit.methods.lm_loss.CHUNK_ELEMENTS", 101)  # so that the tiny batch is chunked

    tiny_llama().save_pretrained(tmp_path / "llama")
    rows = reproduce_script("bench_lm_loss").main(
        ["--model", str(tmp_path / "llama"), "--batch", "2", "--seq_len", "8", "--repeats", "1", "--out", str(tmp_path)]
    )
    assert [r["path"] for r in rows] == ["full", "chunked"]
    assert rows[0]["ratio_to_full"] == 1.0 and rows[1]["step_s"] > 0
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-3  # the same student, the same losses
    assert "chunked" in (tmp_path / "bench_lm_loss.md").read_text()
    assert (tmp_path / "bench_lm_loss.provenance.json").is_file()
