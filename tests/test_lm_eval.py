"""The lm-evaluation-harness adapter on a tensorized tiny GPT-2 in memory, offline: a LAMBADA-style task (last-word
accuracy and perplexity) over a local JSON file, run by the harness itself. Skipped without the ``lm`` extra."""

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")


def test_lambada_style_task_on_a_student_in_memory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tnlit import Rule, TensorizePlan, tensorize
    from tnlit.data.openwebtext import load_tokenizer, word_level_tokenizer
    from tnlit.evaluate import LM_EVAL_METRICS, lm_eval_benchmarks

    texts = [f"the cat number {i} sat on the mat and looked at the dog" for i in range(6)]
    tokenizer = load_tokenizer(str(word_level_tokenizer(texts, tmp_path / "tok")))
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    student, _ = tensorize(
        GPT2LMHeadModel(config), TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)])
    )
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = {
        "task": "tiny_lambada",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "test.jsonl")}},
        "output_type": "loglikelihood",
        "test_split": "test",
        # lambada_openai's own prompt and target: all words but the last, then the last word.
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    scores = lm_eval_benchmarks(student, tokenizer, [task], batch_size=4, device="cpu")
    assert 0 <= scores["tiny_lambada/acc"] <= 1 and scores["tiny_lambada/perplexity"] > 1
    assert set(LM_EVAL_METRICS) == {"lambada_openai", "wikitext"}
