"""The causal-LM losses of global finetuning (next-token cross-entropy, logit distillation), a chunk of tokens at once.

A causal LM's logits are ``head(hidden)``: a vocabulary-wide matrix per batch (SmolLM2: 49,152 logits per token,
200 MB of float32 for 8 x 128 tokens; GPT-2 XL at 8 x 1,024 tokens: 1.6 GB), and the losses allocate several more
of that size (log-softmax of teacher and student, their difference, the gradient). Computed from the final hidden
states a few dozen tokens at a time, with each chunk's logits recomputed in the backward pass instead of kept
(activation checkpointing), no tensor larger than a chunk's logits exists: the losses and their gradients are the
same (up to float round-off), the peak memory falls by the vocabulary-wide tensors, and on CPU the step is faster
(freshly allocated 200 MB tensors cost page faults). ``reproduce/bench_lm_loss.py`` measures both.

The split needs ``logits == head(body(x).last_hidden_state)``, which holds for Hugging Face's plain causal LMs
(GPT-2, LLaMA, Mistral, Qwen, ...) but not for those that rescale or cap the logits after the head (Gemma 2,
Cohere): :func:`lm_split` checks it once per model on a real batch and the full-logit path serves otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tnlit.evaluate import output_tensor

__all__ = ["CHUNK_ELEMENTS", "chunked_lm_losses", "lm_split"]

CHUNK_ELEMENTS = 1 << 22
"""Logits per chunk (16 MB of float32): a chunk holds ``CHUNK_ELEMENTS // vocabulary`` tokens (85 for SmolLM2)."""


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` of a Hugging Face causal LM (``base_model`` and ``get_output_embeddings()``), else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    body = getattr(model, "base_model", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or not isinstance(body, nn.Module) or body is model:
        return None
    return body, head


def lm_split(model: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` with ``model(ids).logits == head(body(ids).last_hidden_state)``, or None where that fails.

    Checked on the first sequence of ``ids`` (a forward pass each way, without gradients; call it once per model): a
    model that changes its logits after the head (soft-capping, a logit scale) gets None, and so the full logits.
    """
    parts = _parts(model)
    if parts is None:
        return None
    body, head = parts
    with torch.no_grad():
        full = output_tensor(model(ids[:1]))
        split = head(body(ids[:1]).last_hidden_state)
    return parts if full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4) else None


def _chunk_losses(
    hidden: torch.Tensor,
    target: torch.Tensor | None,
    labels: torch.Tensor,
    head: nn.Module,
    target_head: nn.Module | None,
    temperature: float,
) -> torch.Tensor:
    """``[sum of next-token NLL, sum of T^2 KL(teacher || student)]`` over one chunk of tokens."""
    logits = head(hidden).float()
    nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if target is None:
        return torch.stack([nll, torch.zeros_like(nll)])
    with torch.no_grad():
        teacher_logp = F.log_softmax(target_head(target).float() / temperature, -1)
    student_logp = F.log_softmax(logits / temperature, -1)
    kd = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * temperature**2
    return torch.stack([nll, kd])


def chunked_lm_losses(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    head: nn.Module,
    *,
    target: torch.Tensor | None = None,
    target_head: nn.Module | None = None,
    temperature: float = 2.0,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next-token loss and (given the teacher's hidden states) the logit distillation, from hidden states.

    Args:
        hidden: The student's final hidden states ``(batch, tokens, width)``.
        ids: The input ids ``(batch, tokens)``: position ``i`` predicts ``ids[:, i + 1]``.
        head: The student's LM head (hidden -> logits).
        target: The teacher's final hidden states, for distillation (None: the task loss alone).
        target_head: The teacher's LM head.
        temperature: Softmax temperature of the distillation.
        chunk_elements: Logits per chunk (``chunk_elements // vocabulary`` tokens); None: ``CHUNK_ELEMENTS``.

    Returns ``(task, kd)``: the mean next-token cross-entropy over the ``batch * (tokens - 1)`` predicted positions,
    as ``F.cross_entropy`` on the full logits gives it, and the mean over all ``batch * tokens`` positions of
    ``T^2 KL(teacher || student)`` (None without ``target``).
    """
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten()
    flat, flat_target = hidden.flatten(0, -2), None if target is None else target.flatten(0, -2)
    size = max(1, (chunk_elements or CHUNK_ELEMENTS) // head.out_features)
    sums = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, flat.shape[0], size):
        part = slice(start, start + size)
        chunk_target = None if flat_target is None else flat_target[part]
        args = (flat[part], chunk_target, labels[part], head, target_head, temperature)
        sums = sums + checkpoint(_chunk_losses, *args, use_reentrant=False)
    task = sums[0] / (labels != -100).sum().clamp_min(1)
    return task, None if target is None else sums[1] / flat.shape[0]
