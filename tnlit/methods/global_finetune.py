"""Global finetuning, the paper's baseline: the whole tensorized student trained end to end on the task loss.

As in the paper the non-tensorized parameters stay frozen (and so do BatchNorm statistics); only the factors
train. Logit distillation from the teacher (KL at a temperature) can be mixed into the task loss. A model with no
built-in task loss (task ``features``: an encoder, a backbone, or any model judged by a metric of the user's) is
trained by feature distillation of its final output against the teacher's: their squared error over the teacher
output's mean square.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from tnlit.activations.capture import batch_input
from tnlit.evaluate import output_tensor
from tnlit.methods.common import FactorTraining, Schedule, factor_parameters
from tnlit.methods.lm_loss import chunked_lm_loss, lm_split, worth_chunking
from tnlit.types import Task, check_choice

__all__ = ["GlobalFinetune", "feature_loss", "logits_of", "task_loss"]


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a classifier (a tensor) or of a Hugging Face model (``.logits``; an encoder's
    ``last_hidden_state``)."""
    return output_tensor(model(x))


def feature_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of a model's output against the teacher's, over the teacher output's mean square."""
    target = target.float()
    return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)


def task_loss(task: Task, logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Cross-entropy on the labels, or the next-token loss of a causal LM on its own input ids."""
    if task == "features":
        raise ValueError("task features has no loss of its own: it is feature distillation against the teacher")
    if task == "classification":
        return F.cross_entropy(logits.float(), batch[1])
    ids = batch_input(batch)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class GlobalFinetune(FactorTraining, LightningModule):
    """Finetune a tensorized student end to end with the task loss (and optionally the teacher's logits)."""

    def __init__(
        self,
        student: nn.Module,
        *,
        task: Task,
        teacher: nn.Module | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        kd_weight: float = 0.0,
        temperature: float = 2.0,
        chunked_logits: bool = True,
    ) -> None:
        """
        Args:
            student: The tensorized model; only its factors train.
            task: ``classification`` (batches ``(x, y)``), ``causal_lm`` (batches of token ids), or ``features``:
                feature distillation of the final output against the teacher's (no labels needed).
            teacher: The dense model, needed when ``kd_weight > 0`` or task is ``features``.
            lr: Adam learning rate (the paper: 5e-4 for ResNet-34, 5e-5 for GPT-2 XL).
            weight_decay: AdamW weight decay (0 = plain Adam).
            schedule: ``constant`` or ``cosine`` decay over the run, after ``warmup_steps`` of linear warm-up.
            warmup_steps: Optimizer steps of linear warm-up.
            kd_weight: Weight of logit distillation, ``(1 - w) * task + w * T^2 * KL(teacher || student)``.
            temperature: Softmax temperature of the logit distillation.
            chunked_logits: A causal LM's losses from its final hidden states, a chunk of tokens at a time, never
                holding the vocabulary-wide logits of the whole batch (the same losses and gradients; used where the
                model's logits are its head's output and the batch's logits are over four chunks, checked on the
                first batch).
        """
        super().__init__()
        check_choice("task", task, Task)
        if (kd_weight or task == "features") and teacher is None:
            raise ValueError(f"{'task features' if task == 'features' else 'kd_weight > 0'} needs the teacher")
        self.save_hyperparameters(ignore=["teacher", "student"])
        self.student = student.requires_grad_(False)
        self.teacher = None if teacher is None else teacher.requires_grad_(False)
        self.train_only(factor_parameters([student]), "the student")
        self._split_checked, self._split = False, None

    def train(self, mode: bool = True) -> GlobalFinetune:
        # The dense parts are frozen: BatchNorm keeps the teacher's statistics, dropout stays off.
        super().train(mode)
        self.student.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch_input(batch)
        if self.hparams.task == "features":
            with torch.no_grad():
                target = logits_of(self.teacher, x)
            loss = feature_loss(logits_of(self.student, x), target)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
            return loss
        loss, task = self._losses(batch, x)
        self.log("train/task_loss", task, on_step=True, on_epoch=True)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite global finetuning loss: lower the lr")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _losses(self, batch: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, task loss)``: the task loss mixed with the logit distillation (``kd_weight``); a causal LM's from
        its hidden states a chunk of tokens at a time (``tnlit.methods.lm_loss``) where its logits allow."""
        t, w = self.hparams.temperature, self.hparams.kd_weight
        split = self._lm_split(x)
        if split is not None:
            (body, head), (teacher_body, teacher_head) = split
            target = None
            if w:
                with torch.no_grad():
                    target = teacher_body(x).last_hidden_state
            hidden = body(x).last_hidden_state
            loss, task, _ = chunked_lm_loss(
                hidden, x, head, target=target, target_head=teacher_head, temperature=t, kd_weight=w
            )
            return loss, task
        logits = logits_of(self.student, x)
        task = task_loss(self.hparams.task, logits, batch)
        if not w:
            return task, task
        with torch.no_grad():
            target = logits_of(self.teacher, x)
        # Per position (image or token), like the task loss.
        student_logp = F.log_softmax(logits.flatten(0, -2).float() / t, -1)
        teacher_logp = F.log_softmax(target.flatten(0, -2).float() / t, -1)
        kd = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * t * t
        return (1 - w) * task + w * kd, task

    def _lm_split(self, x: torch.Tensor) -> tuple[tuple[nn.Module, nn.Module], tuple[Any, Any]] | None:
        """The student's (and, when distilling, the teacher's) ``(body, head)``, checked on the first batch."""
        if not self._split_checked:
            self._split_checked = True
            if self.hparams.task == "causal_lm" and self.hparams.chunked_logits:
                parts = lm_split(self.student, x)
                student = parts if parts is not None and worth_chunking(x.numel(), parts[1].out_features) else None
                teacher = lm_split(self.teacher, x) if self.hparams.kd_weight else (None, None)
                self._split = None if student is None or teacher is None else (student, teacher)
        return self._split

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = logits_of(self.student, batch_input(batch))
        if self.hparams.task == "features":
            self.log("val/loss", feature_loss(logits, logits_of(self.teacher, batch_input(batch))), prog_bar=True)
            return
        loss = task_loss(self.hparams.task, logits, batch)
        self.log("val/loss", loss, prog_bar=True)
        if self.hparams.task == "classification":
            self.log("val/acc", (logits.argmax(-1) == batch[1]).float().mean() * 100, prog_bar=True)
