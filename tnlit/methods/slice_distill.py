"""Slice-wise feature distillation (PAPER.md section 1): each slice learns the teacher's activation at its exit.

One teacher forward per batch gives every slice its (input, target) pair, or a batch read back from an
activation store carries the pairs (``{slice: (input, target)}``, no teacher needed); each slice's student
modules map the input to a prediction, and the loss is the sum over slices of their MSE. Slices share no
parameters and their inputs are detached, so the sum trains each slice exactly as if it trained alone: with
all slices this is the ``stream`` (or ``cache``) mode, with one slice the ``serial`` mode, and the two give
the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from tnlit.activations import batch_input, capture, capture_student
from tnlit.methods.common import FactorTraining, Schedule, factor_parameters
from tnlit.slices import Slice, SliceModule

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
        inputs: Literal["teacher", "student"] = "teacher",
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
                of the student's earlier (distilled) slices.
        """
        super().__init__()
        if inputs not in ("teacher", "student"):
            raise ValueError(f"inputs must be 'teacher' or 'student', got {inputs!r}")
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
        if isinstance(batch, dict) and all(isinstance(v, (tuple, list)) for v in batch.values()):
            pairs = batch
            if self.hparams.inputs == "student":
                raise ValueError("student inputs need the model's input, not cached activations; use stream mode")
        elif self.teacher is None:
            raise ValueError("a model batch needs the teacher: give one, or batches of cached activations")
        else:
            pairs = capture(self.teacher, batch_input(batch), self.slices)
        if self.hparams.inputs == "student":
            outputs = capture_student(self.student, batch_input(batch), self.slices)
        else:
            outputs = {name: self.parts[name](x) for name, (x, _) in pairs.items()}
        return {name: F.mse_loss(outputs[name].float(), pairs[name][1].float()) for name in outputs}

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
