"""What the training methods share: which parameters train, and the optimizer with its schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import LightningDataModule
from torch import nn

from tnlit.layers.base import TensorizedLayer
from tnlit.types import Schedule

__all__ = ["FactorTraining", "Schedule", "configure_adam", "factor_parameters", "warmup_schedule"]


def factor_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The factors of every tensorized layer in ``modules`` (each once): what compression recovery trains."""
    seen: dict[int, nn.Parameter] = {}
    for root in modules:
        for m in root.modules():
            if isinstance(m, TensorizedLayer):
                for p in m.factors():
                    seen.setdefault(id(p), p)
    return list(seen.values())


def warmup_schedule(warmup_steps: int, total_steps: int, schedule: Schedule = "cosine") -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warm-up to 1, then constant or a cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def configure_adam(
    params: list[nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    schedule: Schedule,
    warmup_steps: int,
    total_steps: int,
) -> dict:
    """Adam(W) with a linear warm-up and then a constant or cosine rate, stepped every optimizer step."""
    optimizer = (
        torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(params, lr=lr)
    )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(warmup_steps, total_steps, schedule))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _rng_states() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python), in types that ``torch.load(weights_only=True)`` reads.

    Lightning's ``_collect_rng_states`` holds numpy's state as an ndarray, which a weights-only load refuses: it
    travels as a tensor here.
    """
    states = _collect_rng_states()
    if "numpy" in states:
        kind, keys, *rest = states["numpy"]
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), *rest)
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNGs to ``states`` from :func:`_rng_states`; CUDA states only for the devices present."""
    states = dict(states)
    if "numpy" in states:
        kind, keys, *rest = states["numpy"]
        states["numpy"] = (kind, keys.numpy().astype("uint32"), *rest)
    states["torch.cuda"] = list(states.get("torch.cuda", []))[: torch.cuda.device_count()]
    _set_rng_states(states)


class FactorTraining:
    """LightningModule mixin of the compression methods: train the given factors only, with Adam(W) and the
    schedule in ``hparams`` (lr, weight_decay, schedule, warmup_steps). Checkpoints hold what trains, not the
    frozen teacher and student, so an epoch checkpoint of GPT-2 XL's slices weighs the factors and their
    optimizer state only (and the global RNG states, so that a resumed run draws the same data order)."""

    trainable: list[nn.Parameter]

    def train_only(self, params: list[nn.Parameter], what: str) -> None:
        """Make ``params`` (and nothing the caller froze) trainable; ``what`` names them in the error if empty."""
        if not params:
            raise ValueError(f"{what} hold(s) no tensorized layer to train")
        for p in params:
            p.requires_grad_(True)
        self.trainable = params
        self.strict_loading = False  # checkpoints hold the trainable tensors only

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {id(p) for p in self.trainable}
        names = {name for name, p in self.named_parameters() if id(p) in keep}  # type: ignore[attr-defined]
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        # A DataModule's hyper-parameters may hold any type (a Path, commonly), which the weights-only load of a
        # resume refuses, so that the checkpoint would be set aside as unreadable; resuming needs none of them.
        checkpoint.pop(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY, None)
        checkpoint.pop(LightningDataModule.CHECKPOINT_HYPER_PARAMS_NAME, None)
        # Lightning restores the loops and the optimizer, not the global RNGs: without them the epochs after a
        # resume would draw another shuffle order (and other augmentations) than a run that was never stopped.
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before FitLoop.setup_data creates the train iterator, whose RandomSampler draws
        # the epoch's order from the global torch RNG: restoring here gives the order of the uninterrupted run.
        if "rng_states" in checkpoint:
            _restore_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self) -> dict:
        h = self.hparams  # type: ignore[attr-defined]
        return configure_adam(
            self.trainable,
            lr=h.lr,
            weight_decay=h.weight_decay,
            schedule=h.schedule,
            warmup_steps=h.warmup_steps,
            total_steps=int(self.trainer.estimated_stepping_batches),  # type: ignore[attr-defined]
        )
