"""Slice-wise feature distillation (PAPER.md section 1): each slice learns the teacher's activation at its exit.

One teacher forward per batch gives every slice its (input, target) pair, or a batch read back from an
activation store carries the pairs (``{slice: (input, target)}``, no teacher needed); each slice's student
modules map the input to a prediction, and the loss is the sum over slices of their MSE (or relative MSE). Slices
share no
parameters and their inputs are detached, so the sum trains each slice exactly as if it trained alone: with
all slices this is the ``stream`` (or ``cache``) mode, with one slice the ``serial`` mode, and the two give
the same weights.

A slice's input is the teacher's activation (the paper), the output of the student's earlier slices, or a blend
that moves from the first to the second over the phase (``mix``): a slice trained on teacher inputs alone meets,
once assembled, the errors of the slices before it, which it never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from tnlit.activations.capture import batch_input, capture, capture_student
from tnlit.methods.common import FactorTraining, Schedule, factor_parameters
from tnlit.slices import Slice, SliceModule
from tnlit.types import SliceInputs, SliceLoss, check_choice

__all__ = ["SliceDistillation"]


class SliceDistillation(FactorTraining, LightningModule):
    """Train the given slices of a student on the teacher's activations (MSE); only their factors train."""

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        slices: Sequence[Slice],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        inputs: SliceInputs = "teacher",
        loss: SliceLoss = "mse",
    ) -> None:
        """
        Args:
            teacher: The dense model; frozen, run in eval mode. None when every batch carries cached activations
                (``{slice: (input, target)}``): nothing is kept for, or moved to the device for, the teacher.
            student: The tensorized model; everything but the slices' factors stays frozen, in eval mode.
            slices: The slices to train on every batch (all of them: stream; one: serial).
            lr: Adam learning rate (the paper: 1e-3 for ResNet-34, 5e-5 for GPT-2 XL).
            weight_decay: AdamW weight decay (0 = plain Adam).
            schedule: ``constant`` or ``cosine`` decay over the run, after ``warmup_steps`` of linear warm-up.
            warmup_steps: Optimizer steps of linear warm-up.
            inputs: ``teacher``: a slice's input is the teacher's activation (the paper); ``student``: the output
                of the student's earlier (distilled) slices; ``mix``: ``w * student + (1 - w) * teacher`` with ``w``
                rising linearly from 0 to 1 over the phase's optimizer steps.
            loss: ``mse``: mean squared error; ``relative``: the MSE over the batch's mean squared target, so that
                every slice's loss reads as the fraction of its output energy missed, whatever its scale.
        """
        super().__init__()
        check_choice("inputs", inputs, SliceInputs)
        check_choice("loss", loss, SliceLoss)
        self.save_hyperparameters(ignore=["teacher", "student", "slices"])
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.student = student.requires_grad_(False)
        self.slices = list(slices)
        # Plain dict: the parts share the student's modules, which must not be registered twice.
        self.parts = {s.name: SliceModule(student, s) for s in self.slices}
        self.train_only(factor_parameters(self.parts.values()), f"slices {[s.name for s in self.slices]}")

    def train(self, mode: bool = True) -> SliceDistillation:
        # Everything outside the factors is frozen, BatchNorm statistics and dropout included.
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        self.student.eval()
        return self

    def slice_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """MSE of every slice on one batch: a model batch, or ``{slice: (input, target)}`` from a cache."""
        live = self.hparams.inputs != "teacher"
        if isinstance(batch, dict) and all(isinstance(v, (tuple, list)) for v in batch.values()):
            pairs = batch
            if live:
                raise ValueError("student inputs need the model's input, not cached activations; use stream mode")
        elif self.teacher is None:
            raise ValueError("a model batch needs the teacher: give one, or batches of cached activations")
        else:
            pairs = capture(self.teacher, batch_input(batch), self.slices)
        if live:
            teacher_inputs = {name: x for name, (x, _) in pairs.items()}
            weight = self.student_weight()
            outputs = capture_student(self.student, batch_input(batch), self.slices, teacher_inputs, weight)
        else:
            outputs = {name: self.parts[name](x) for name, (x, _) in pairs.items()}
        return {name: self._loss(outputs[name].float(), pairs[name][1].float()) for name in outputs}

    def student_weight(self) -> float:
        """The weight of the student's own activations in a slice's input: 1 for ``student``, the phase's progress
        (0 -> 1 over its optimizer steps) for ``mix``; validation uses the weight of the step it follows."""
        if self.hparams.inputs != "mix":
            return 1.0
        trainer = self._trainer
        total = trainer.estimated_stepping_batches if trainer is not None else 0
        if not total or not math.isfinite(total):
            return 1.0
        return min(1.0, self.global_step / max(1, total - 1))

    def _loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(prediction, target)
        if self.hparams.loss == "relative":
            # The target's energy is a constant of the batch: no gradient flows through the normaliser.
            return mse / target.detach().pow(2).mean().clamp_min(1e-12)
        return mse

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.slice_losses(batch)
        loss = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(loss):
            bad = [name for name, value in losses.items() if not torch.isfinite(value)]
            raise FloatingPointError(f"non-finite distillation loss in slice(s) {', '.join(bad)}: lower the lr")
        for name, value in losses.items():
            self.log(f"train/mse/{name}", value, on_step=True, on_epoch=True)
        self.log("train/mse", loss / len(losses), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        losses = self.slice_losses(batch)
        for name, value in losses.items():
            self.log(f"val/mse/{name}", value)
        self.log("val/mse", torch.stack(list(losses.values())).mean(), prog_bar=True)
