"""Evaluation of teachers and students: top-1 accuracy for classifiers, token-level perplexity for causal LMs.

Both leave the model as they found it: they switch it to eval mode for the pass (BatchNorm statistics, dropout)
and restore every submodule's own mode afterwards, so a model with frozen parts is not unfrozen by evaluating it.

They are written out rather than taken from torchmetrics: ``Perplexity`` there takes the log of a softmax
(float32 underflow turns a confident wrong prediction into ``inf``) where ``cross_entropy`` works in log space,
and the accuracy count is two lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnlit.types import Task

__all__ = ["LM_EVAL_METRICS", "accuracy", "evaluate_task", "lm_eval_benchmarks", "perplexity"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; each submodule's previous mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def accuracy(model: nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of a classifier over batches of ``(images, labels)``.

    Args:
        model: Maps a batch of inputs to logits (batch, classes).
        dataloader: Yields ``(inputs, labels)`` pairs.
        device: Where the batches are sent; the model must already be there. Defaults to the model's device.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    correct = total = 0
    with _eval_mode(model):
        for inputs, labels in dataloader:
            logits = model(inputs.to(device))
            correct += (logits.argmax(dim=-1) == labels.to(device)).sum().item()
            total += labels.numel()
    if total == 0:
        raise ValueError("accuracy over an empty dataloader")
    return 100.0 * correct / total


def perplexity(model: nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Token-level perplexity of a causal LM: exp(total next-token NLL / number of predicted tokens).

    Every sequence of length T contributes its T - 1 predictions (token t+1 from tokens up to t), so the result
    is exact however the tokens are batched, and matches HF's ``labels=input_ids`` loss on equal-length batches.

    Args:
        model: A causal LM called as ``model(input_ids)``, returning an object with ``.logits`` (HF) or the logits.
        dataloader: Yields LongTensors (batch, seq_len) of token ids, or mappings with an ``input_ids`` entry.
        device: Where the batches are sent; the model must already be there. Defaults to the model's device.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    total_nll, count = 0.0, 0
    with _eval_mode(model):
        for batch in dataloader:
            ids = (batch["input_ids"] if isinstance(batch, Mapping) else batch).to(device)
            output = model(ids)
            logits: Tensor = output.logits if hasattr(output, "logits") else output
            # float32 for the log-softmax: half-precision logits lose the small probabilities.
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            count += ids[:, 1:].numel()
    if count == 0:
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    return math.exp(total_nll / count)


# The paper's GPT-2 XL benchmarks (PAPER.md section 1): lm-evaluation-harness task -> the metrics it reports.
LM_EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "lambada_openai": ("acc", "perplexity"),
    "wikitext": ("word_perplexity",),
}


def lm_eval_benchmarks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | dict[str, Any]] = tuple(LM_EVAL_METRICS),
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """lm-evaluation-harness tasks on a causal LM in memory (a teacher, or a tensorized student): ``{"task/metric":
    value}``, e.g. ``lambada_openai/acc`` (a fraction), ``lambada_openai/perplexity``, ``wikitext/word_perplexity``.

    The harness's ``HFLM`` wraps the model as it is (no reload, so a student's factor layers are what is measured).
    Its tasks download their datasets once (``datasets``' cache; offline when cached). Needs the ``lm`` extra.

    Args:
        model: A Hugging Face causal LM (``PreTrainedModel``); left in eval mode on ``device``.
        tokenizer: Its tokenizer.
        tasks: Task names, or task configs as dicts (a task over local data, as the tests use).
        batch_size: Sequences per forward.
        limit: Evaluate only the first ``limit`` documents of each task (a fraction when below 1): quick checks.
        device: Where to run; None: the model's device.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'tnlit[lm]'") from err
    device = str(device or _device_of(model))
    model.to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    from lm_eval.tasks import TaskManager

    # Indexing the harness's thousands of built-in task files takes seconds: skipped when every task is given whole.
    manager = TaskManager(include_defaults=not all(isinstance(t, dict) for t in tasks))
    out = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, log_samples=False, bootstrap_iters=0, task_manager=manager
    )  # fmt: skip
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")  # "acc,none": metric, filter
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                scores[f"{task}/{name}"] = float(value)
    return scores


def evaluate_task(model: nn.Module, data: Any, task: Task, device: torch.device | str) -> dict[str, float]:
    """The task's metric on the DataModule's test split (``top1`` or ``perplexity``); for a DataModule with several
    evaluation texts (``test_dataloaders()``, as tnlit.data.text_sources has), also on each alone, keyed
    ``<metric>/<name>``: a compression calibrated on some sources must be judged on every one, and on unseen ones."""
    model.to(device)
    data.setup("test")
    key, measure = ("top1", accuracy) if task == "classification" else ("perplexity", perplexity)
    metrics = {key: measure(model, data.test_dataloader(), device=device)}
    if callable(by_source := getattr(data, "test_dataloaders", None)):
        metrics.update({f"{key}/{name}": measure(model, loader, device=device) for name, loader in by_source().items()})
    return metrics
