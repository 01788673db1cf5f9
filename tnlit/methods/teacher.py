"""LightningModules that train the dense teachers from scratch: an image classifier and a causal LM.

Used from the command line (``tnlit fit --model tnlit.methods.teacher.ImageClassifier --model.model
cifar-resnet34-w16 --data tnlit.data.offline.DigitsDataModule``) or from Python with a model already built.
Models come by name from ``tnlit.models.load_model``, so the registry stays the one place models are defined.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tnlit.methods.common import warmup_schedule

__all__ = ["CausalLM", "ImageClassifier"]


def _resolve(model: str | nn.Module) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from tnlit.models import load_model

    return load_model(model)


class ImageClassifier(LightningModule):
    """Train an image classifier with SGD, momentum, weight decay and a per-step cosine schedule (cross-entropy)."""

    def __init__(
        self,
        model: str | nn.Module = "cifar-resnet34-w16",
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_epochs_for_schedule: int = 30,
    ) -> None:
        """
        Args:
            model: A model name for tnlit.models.load_model (cifar-resnet34, cifar-resnet34-w16, a torchvision
                name such as resnet34), or, from Python, a built nn.Module.
            num_classes: Classes of the task. A model whose ``fc`` head has another number of outputs gets a fresh
                head of this size (e.g. torchvision's 1000-class resnet34 on a 10-class task).
            lr: Peak learning rate of SGD; the schedule takes it down to 0 by a cosine over the whole run.
            momentum: SGD (heavy-ball) momentum.
            weight_decay: L2 penalty of SGD, on every parameter.
            max_epochs_for_schedule: Length of the cosine schedule, in epochs, when the trainer sets neither
                max_epochs nor max_steps (otherwise the schedule spans the trainer's whole run).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = _resolve(model)
        head = getattr(self.model, "fc", None)
        if isinstance(head, nn.Linear) and head.out_features != num_classes:
            self.model.fc = nn.Linear(head.in_features, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self.model(images)
        # batch_size weights the epoch mean, so a short last batch counts for what it holds.
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=len(labels))
        metric.update(logits, labels)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):  # no max_epochs, no max_steps: the schedule's own length
            total = hp.max_epochs_for_schedule * self.trainer.num_training_batches
            total //= self.trainer.accumulate_grad_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(0, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CausalLM(LightningModule):
    """Train a causal LM on batches of token ids with AdamW, linear warm-up then a cosine decay (next-token loss)."""

    def __init__(
        self,
        model: str | nn.Module = "tiny-gpt2-bytes",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
    ) -> None:
        """
        Args:
            model: A model name for tnlit.models.load_model (tiny-gpt2-bytes, a local Hugging Face directory or a
                hub name), or, from Python, a built Hugging Face causal LM.
            lr: Peak learning rate of AdamW, reached after the warm-up; a cosine takes it to 0 by the last step.
            weight_decay: AdamW's decoupled weight decay, on matrices only (not on biases, LayerNorms).
            warmup_steps: Optimizer steps of linear warm-up from lr / warmup_steps to lr.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = _resolve(model)
        # Mean next-token NLL over the epoch, weighted by token count: exp of it is the token-level perplexity.
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids).logits

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.model(batch, labels=batch).loss  # the model shifts the labels: token t+1 from tokens <= t
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.val_nll.update(self.model(batch, labels=batch).loss, weight=batch[:, 1:].numel())

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.test_nll.update(self.model(batch, labels=batch).loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_nll)

    def _log_epoch(self, stage: str, nll: MeanMetric) -> None:
        loss = nll.compute()  # synced across processes
        nll.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", loss.exp(), prog_bar=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        matrices = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("CausalLM's schedule needs a finite run: set trainer max_epochs or max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(hp.warmup_steps, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
