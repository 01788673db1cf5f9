"""The causal-LM losses of global finetuning (next-token cross-entropy, logit distillation), a chunk of tokens at once.

A causal LM's logits are ``head(hidden)``: a vocabulary-wide matrix per batch (SmolLM2: 49,152 logits per token,
200 MB of float32 for 8 x 128 tokens; GPT-2 XL at 8 x 1,024 tokens: 1.6 GB), and the losses allocate several more
of that size (log-softmax of teacher and student, their difference, the gradient). Computed from the final hidden
states a few dozen tokens at a time, each chunk's gradient formed in the forward pass (as fused LM-head losses do),
no tensor larger than a chunk's logits exists: the losses and their gradients are the same (up to float round-off)
and the peak memory falls by the vocabulary-wide tensors, for the same arithmetic (``reproduce/bench_lm_loss.py``
times both paths side by side).

The split needs ``logits == head(body(x).last_hidden_state)``, which holds for Hugging Face's plain causal LMs
(GPT-2, LLaMA, Mistral, Qwen, ...) but not for those that rescale or cap the logits after the head (Gemma 2,
Cohere): :func:`lm_split` checks it once per model on a real batch and the full-logit path serves otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tnlit.evaluate import output_tensor

__all__ = ["CHUNK_ELEMENTS", "chunked_lm_loss", "lm_split", "worth_chunking"]

CHUNK_ELEMENTS = 1 << 22
"""Logits per chunk (16 MB of float32): a chunk holds ``CHUNK_ELEMENTS // vocabulary`` tokens (85 for SmolLM2)."""


def worth_chunking(tokens: int, vocabulary: int) -> bool:
    """Whether a batch's logits are over four chunks: below that the full logits save nothing worth a change of
    arithmetic (a small model keeps its exact float results, and a run directory resumed across versions too)."""
    return tokens * vocabulary > 4 * CHUNK_ELEMENTS


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


class _ChunkedLMLoss(torch.autograd.Function):
    """``(1 - w) * task + w * kd`` of a linear LM head over chunks of tokens, its gradients computed in the forward.

    Each chunk's logits are made, turned into the loss and into the loss's gradient with respect to them
    (``softmax(z) - onehot(label)`` for the cross-entropy, ``T (softmax(z / T) - softmax(z_teacher / T))`` for the
    distillation), which the head's transpose takes back to the hidden states (and, where they train, to the
    head's weight and bias), then freed: the backward pass only scales the stored gradients. The same arithmetic as
    autograd through the full logits, with no recomputation and never more than a chunk's logits in memory.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, target_weight, target_bias, labels, temperature, kd_weight, size):
        t, w = temperature, kd_weight if target is not None else 0.0
        predicted, positions = (labels != -100).sum().clamp_min(1), hidden.shape[0]
        task_scale, kd_scale = (1 - w) / predicted, w / positions
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], size):
            part = slice(start, start + size)
            z = F.linear(hidden[part], weight, bias).float()
            grad_z = _task_part(z, labels[part], sums, task_scale)
            if target is not None:
                target_z = F.linear(target[part], target_weight, target_bias).float()
                grad_z += _distillation_part(z, target_z, t, sums, kd_scale)
            grad_z = grad_z.to(hidden.dtype)
            grad_hidden[part] = grad_z @ weight
            if grad_weight is not None:
                grad_weight += grad_z.T @ hidden[part]
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        task, kd = sums[0] / predicted, sums[1] / positions
        loss = (1 - w) * task + w * kd
        ctx.mark_non_differentiable(task, kd)
        return loss, task, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_task, _grad_kd):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_hidden, grad_weight, grad_bias)]
        return *scaled, None, None, None, None, None, None, None


def _task_part(z: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Add a chunk's summed next-token NLL to ``sums[0]``; ``scale`` times its gradient in the logits ``z``."""
    logp = F.log_softmax(z, -1)
    valid = labels != -100
    picked = labels.clamp_min(0)[:, None]
    sums[0] += -(logp.gather(1, picked)[:, 0] * valid).sum()
    grad = logp.exp_()  # softmax(z), in place of logp
    grad.scatter_add_(1, picked, -valid[:, None].to(grad.dtype))
    return grad.mul_(valid[:, None] * scale)


def _distillation_part(z: torch.Tensor, target_z: torch.Tensor, t: float, sums: torch.Tensor, scale) -> torch.Tensor:
    """Add a chunk's summed ``T^2 KL(teacher || student)`` to ``sums[1]``; ``scale`` times its gradient in ``z``."""
    teacher_logp = F.log_softmax(target_z / t, -1)
    student_logp = F.log_softmax(z / t, -1)
    teacher_p = teacher_logp.exp()
    sums[1] += (teacher_p * (teacher_logp - student_logp)).sum() * t * t
    return (student_logp.exp_() - teacher_p).mul_(scale * t)


def chunked_lm_loss(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    head: nn.Linear,
    *,
    target: torch.Tensor | None = None,
    target_head: nn.Linear | None = None,
    temperature: float = 2.0,
    kd_weight: float = 0.5,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The next-token loss and (given the teacher's hidden states) the logit distillation, from hidden states.

    Args:
        hidden: The student's final hidden states ``(batch, tokens, width)``.
        ids: The input ids ``(batch, tokens)``: position ``i`` predicts ``ids[:, i + 1]``.
        head: The student's LM head (a ``Linear``: hidden -> logits).
        target: The teacher's final hidden states, for distillation (None: the task loss alone).
        target_head: The teacher's LM head.
        temperature: Softmax temperature of the distillation.
        kd_weight: ``w`` of ``(1 - w) * task + w * kd`` (ignored without ``target``).
        chunk_elements: Logits per chunk (``chunk_elements // vocabulary`` tokens); None: ``CHUNK_ELEMENTS``.

    Returns ``(loss, task, kd)``: the loss to train on (differentiable), the mean next-token cross-entropy over the
    ``batch * (tokens - 1)`` predicted positions, as ``F.cross_entropy`` on the full logits gives it, and the mean
    over all ``batch * tokens`` positions of ``T^2 KL(teacher || student)`` (None without ``target``); the last two
    are detached, for logging.
    """
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten()
    flat = hidden.flatten(0, -2)
    flat_target = None if target is None else target.detach().flatten(0, -2)
    teacher = (None, None) if target_head is None else (target_head.weight.detach(), target_head.bias)
    size = max(1, (chunk_elements or CHUNK_ELEMENTS) // head.out_features)
    args = (flat, head.weight, head.bias, flat_target, *teacher, labels, temperature, kd_weight, size)
    loss, task, kd = _ChunkedLMLoss.apply(*args)
    return loss, task, None if target is None else kd
