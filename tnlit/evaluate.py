"""Evaluation of teachers and students: top-1 accuracy for classifiers, token-level perplexity for causal LMs.

Both leave the model as they found it: they switch it to eval mode for the pass (BatchNorm statistics, dropout)
and restore every submodule's own mode afterwards, so a model with frozen parts is not unfrozen by evaluating it.

They are written out rather than taken from torchmetrics: ``Perplexity`` there takes the log of a softmax
(float32 underflow turns a confident wrong prediction into ``inf``) where ``cross_entropy`` works in log space,
and the accuracy count is two lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnlit.types import Task, check_choice

__all__ = [
    "LM_EVAL_METRICS",
    "TaskLike",
    "accuracy",
    "evaluate_task",
    "features",
    "lm_eval_benchmarks",
    "metric_name",
    "output_tensor",
    "perplexity",
]

TaskLike = Task | Callable[[nn.Module, Iterable[Any]], float]
"""A task: a built-in name (``tnlit.types.Task``), a function of (model, dataloader) -> float, or a torchmetrics
``Metric`` (updated with the model's output and the labels of ``(inputs, labels)`` batches)."""


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


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself, a Hugging Face output's ``logits`` or ``last_hidden_state``
    (an encoder with no head), or the first entry of a tuple or mapping."""
    if isinstance(output, Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    if isinstance(output, Mapping):
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output_tensor(output[0])
    raise TypeError(f"cannot find the output tensor in a model output of type {type(output).__name__}")


def _inputs(batch: Any) -> Tensor:
    """The model input of a batch: ``(x, y)`` -> x, ``{"input_ids": ...}`` -> input ids, a tensor -> itself."""
    if isinstance(batch, Mapping):
        return batch["input_ids"]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _top1_sums(model: nn.Module, dataloader: Iterable[Any], device: torch.device, _teacher: Any) -> list[float]:
    correct = total = 0
    for inputs, labels in dataloader:
        logits = output_tensor(model(inputs.to(device)))
        correct += (logits.argmax(dim=-1) == labels.to(device)).sum().item()
        total += labels.numel()
    return [correct, total]


def _nll_sums(model: nn.Module, dataloader: Iterable[Any], device: torch.device, _teacher: Any) -> list[float]:
    total_nll, count = 0.0, 0
    for batch in dataloader:
        ids = _inputs(batch).to(device)
        logits = output_tensor(model(ids))
        # float32 for the log-softmax: half-precision logits lose the small probabilities.
        total_nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return [total_nll, count]


def _feature_sums(model: nn.Module, dataloader: Iterable[Any], device: torch.device, teacher: Any) -> list[float]:
    """Squared error, squared reference, summed cosine and count of the model's outputs against the teacher's."""
    if teacher is None:
        raise ValueError("task features compares the model's output with the teacher's: give the teacher")
    err = ref = cos = count = 0.0
    with _eval_mode(teacher):
        for batch in dataloader:
            x = _inputs(batch).to(device)
            out, target = output_tensor(model(x)).float(), output_tensor(teacher(x)).float()
            err += (out - target).square().sum().item()
            ref += target.square().sum().item()
            flat_out, flat_target = out.reshape(-1, out.shape[-1]), target.reshape(-1, out.shape[-1])
            cos += F.cosine_similarity(flat_out, flat_target, dim=-1).sum().item()
            count += flat_out.shape[0]
    return [err, ref, cos, count]


def _top1(sums: list[float]) -> dict[str, float]:
    if sums[1] == 0:
        raise ValueError("accuracy over an empty dataloader")
    return {"top1": 100.0 * sums[0] / sums[1]}


def _perplexity(sums: list[float]) -> dict[str, float]:
    if sums[1] == 0:
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    return {"perplexity": math.exp(sums[0] / sums[1])}


def _features(sums: list[float]) -> dict[str, float]:
    if sums[3] == 0:
        raise ValueError("features over an empty dataloader")
    return {"relative_error": math.sqrt(sums[0] / max(sums[1], 1e-30)), "cosine": sums[2] / sums[3]}


# A built-in task: additive sums over batches (so a pooled metric follows from its parts' sums), and the metric.
_TASKS = {
    "classification": (_top1_sums, _top1),
    "causal_lm": (_nll_sums, _perplexity),
    "features": (_feature_sums, _features),
}


def _measure(task: str, model: nn.Module, dataloader: Iterable[Any], device: Any, teacher: Any = None) -> list[float]:
    device = torch.device(device) if device is not None else _device_of(model)
    with _eval_mode(model):
        return _TASKS[task][0](model, dataloader, device, teacher)


def accuracy(model: nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of a classifier over batches of ``(images, labels)``.

    Args:
        model: Maps a batch of inputs to logits (batch, classes).
        dataloader: Yields ``(inputs, labels)`` pairs.
        device: Where the batches are sent; the model must already be there. Defaults to the model's device.
    """
    return _top1(_measure("classification", model, dataloader, device))["top1"]


def perplexity(model: nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Token-level perplexity of a causal LM: exp(total next-token NLL / number of predicted tokens).

    Every sequence of length T contributes its T - 1 predictions (token t+1 from tokens up to t), so the result
    is exact however the tokens are batched, and matches HF's ``labels=input_ids`` loss on equal-length batches.

    Args:
        model: A causal LM called as ``model(input_ids)``, returning an object with ``.logits`` (HF) or the logits.
        dataloader: Yields LongTensors (batch, seq_len) of token ids, or mappings with an ``input_ids`` entry.
        device: Where the batches are sent; the model must already be there. Defaults to the model's device.
    """
    return _perplexity(_measure("causal_lm", model, dataloader, device))["perplexity"]


def features(
    model: nn.Module, teacher: nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None
) -> dict[str, float]:
    """How far a model's output is from the teacher's, for models with no task head (an encoder, a backbone):
    ``relative_error`` = ||out - teacher|| / ||teacher|| over the whole split, and ``cosine``, the mean cosine
    similarity of the two outputs' last-axis vectors (a token's or an image's feature)."""
    return _features(_measure("features", model, dataloader, device, teacher))


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
    )
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")  # "acc,none": metric, filter
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                scores[f"{task}/{name}"] = float(value)
    return scores


def metric_name(task: Any) -> str:
    """The key of a task's metric: ``top1``, ``perplexity``, ``relative_error``; a callable's name; a torchmetrics
    ``Metric``'s class name."""
    if isinstance(task, str):
        return {"classification": "top1", "causal_lm": "perplexity", "features": "relative_error"}[task]
    name = getattr(task, "__name__", type(task).__name__)
    return "metric" if name.startswith("<") else name


def _callable_metric(task: Any, model: nn.Module, dataloader: Iterable[Any], device: torch.device) -> float:
    """A torchmetrics ``Metric`` updated with (output, labels) of every ``(inputs, labels)`` batch, or a function of
    (model, dataloader)."""
    with _eval_mode(model):
        if not all(hasattr(task, a) for a in ("update", "compute", "reset")):
            return float(task(model, dataloader))
        task.reset()
        task.to(device)
        for batch in dataloader:
            task.update(output_tensor(model(_inputs(batch).to(device))), batch[1].to(device))
        return float(task.compute())


def evaluate_task(
    model: nn.Module, data: Any, task: TaskLike, device: torch.device | str, teacher: nn.Module | None = None
) -> dict[str, float]:
    """The task's metric on the DataModule's test split: ``top1`` (classification), ``perplexity`` (causal_lm),
    ``relative_error`` and ``cosine`` against ``teacher`` (features), or a callable's (see ``metric_name``).

    For a DataModule with several evaluation texts (``test_dataloaders()``, as tnlit.data.text_sources has), also on
    each alone, keyed ``<metric>/<name>``: a compression calibrated on some sources must be judged on every one, and
    on unseen ones. Such a DataModule's ``test_dataloader`` must be the union of its ``test_dataloaders``: a built-in
    task's pooled metric is computed from the parts' sums (NLL and token count, correct and total, errors), one
    forward per window; a callable metric, which cannot be summed, is measured on the pooled loader and each part.
    """
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    data.setup("test")
    by_source = data.test_dataloaders() if callable(getattr(data, "test_dataloaders", None)) else {}
    if not isinstance(task, str):
        key = metric_name(task)
        metrics = {key: _callable_metric(task, model, data.test_dataloader(), torch.device(device))}
        metrics.update(
            {
                f"{key}/{n}": _callable_metric(task, model, loader, torch.device(device))
                for n, loader in by_source.items()
            }
        )
        return metrics
    check_choice("task", task, Task)
    finish = _TASKS[task][1]
    if not by_source:
        return finish(_measure(task, model, data.test_dataloader(), device, teacher))
    parts = {name: _measure(task, model, loader, device, teacher) for name, loader in by_source.items()}
    metrics = finish([sum(values) for values in zip(*parts.values())])
    for name, sums in parts.items():
        metrics.update({f"{key}/{name}": value for key, value in finish(sums).items()})
    return metrics
