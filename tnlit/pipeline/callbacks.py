"""What runs beside training: the optimisation timer, the per-epoch evaluation, and the loggers (CSV, W&B)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch import nn

from tnlit.atomic import atomic_text
from tnlit.checksums import file_sha256, sidecar
from tnlit.pipeline.settings import LogSettings

__all__ = [
    "EpochEvaluation",
    "Loggers",
    "OptimisationTimer",
    "PhaseProgressBar",
    "VerifiedCheckpoint",
    "quiet_lightning",
]


class _NoAdvert(logging.Filter):
    """Lightning advertises a cloud logger each time a Trainer starts: a hybrid or serial run starts several."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_NO_ADVERT = _NoAdvert()


def quiet_lightning() -> None:
    """Drop Lightning's cloud-logger advert from its log (idempotent: one filter however often it is called)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_ADVERT)


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's progress bar, named by the phase and slice it trains (``slice transformer.h.0.mlp epoch 1/2``)
    instead of a bare ``Epoch 0`` that every phase of a run would show alike."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label.replace(":", " ", 1) if label.startswith("slice:") else label

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class OptimisationTimer(Callback):
    """Seconds of each training batch (forward, backward, optimizer step), synchronised on CUDA: time as the paper
    counts it. ``seconds`` keeps each batch's, ``times["optimisation_s"]`` adds them up (a run's state keeps that
    dict), and ``on_epoch`` runs after every epoch (a run saves its state there)."""

    def __init__(self, times: dict[str, float] | None = None, on_epoch: Callable[[], None] | None = None) -> None:
        self.times = times if times is not None else {"optimisation_s": 0.0}
        self.seconds: list[float] = []
        self.on_epoch = on_epoch

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.seconds.append(time.perf_counter() - self._start)
        self.times["optimisation_s"] += self.seconds[-1]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_epoch is not None:
            self.on_epoch()

    @staticmethod
    def _sync(trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)


class VerifiedCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with each checkpoint's checksum recorded beside it (``<file>.sha256``, as
    :mod:`tnlit.checksums` reads it): the old checksum goes before the new file is written, the new one after."""

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            sidecar(filepath).unlink(missing_ok=True)
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            atomic_text(sidecar(filepath), file_sha256(filepath) + "\n")


class EpochEvaluation(Callback):
    """The student's test metric after every epoch of a phase, with the optimisation time spent so far in all
    phases, appended to the state's ``curve`` and saved (``save``)."""

    def __init__(
        self,
        state: dict[str, Any],
        save: Callable[[], None],
        phase: str,
        evaluate: Callable[[nn.Module], dict[str, float]],
    ) -> None:
        self.state, self.save, self.phase, self.evaluate = state, save, phase, evaluate

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        points = self.state.setdefault("curve", [])
        epoch = trainer.current_epoch + 1
        spent = sum(t.get("optimisation_s", 0.0) for t in self.state.get("times", {}).values())
        point = {"phase": self.phase, "epoch": epoch, "optimisation_s": spent, **self.evaluate(pl_module.student)}
        # Lightning runs checkpoint callbacks last, so a kill can fall between this point and the epoch's checkpoint;
        # the resumed phase trains that epoch again and its point replaces this one.
        points[:] = [p for p in points if (p["phase"], p["epoch"]) != (self.phase, epoch)] + [point]
        self.save()


class Loggers:
    """The loggers of one compress() call: CSV for every phase; W&B, when asked, one run across the phases."""

    def __init__(
        self,
        settings: LogSettings,
        run_dir: Path,
        state: dict[str, Any],
        config: dict[str, Any],
        save: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.run_dir, self.state, self.config, self.save = settings, run_dir, state, config, save

    def for_phase(self, phase: str) -> list[Logger]:
        # A new version per attempt (version_0, version_1, ...): Lightning deletes the metrics.csv of a version it
        # opens again, which would lose the epochs that a resumed phase does not train again.
        loggers: list[Logger] = [CSVLogger(self.run_dir / "logs", name=phase.replace(":", "_"))]
        if self.settings.wandb:
            # Every phase's Trainer counts its steps from 0: the phase prefixes the keys, so curves stay apart.
            loggers.append(WandbLogger(experiment=self._wandb_run(), prefix=phase))
        return loggers

    def close(self) -> None:
        """Put the evaluations into the W&B run's summary and finish the run (when W&B is on)."""
        if not self.settings.wandb:
            return
        run = self._wandb_run()
        keys = ("teacher_metric", "init_metric", "metrics", "final_metric", "compression", "times")
        run.summary.update({k: self.state[k] for k in keys if k in self.state})
        run.finish()
        _WANDB_RUNS.pop(run.id, None)

    def _wandb_run(self) -> Any:
        """The W&B run of this run directory: started (or resumed, by the id in state.json) on first use."""
        import wandb

        run_id = self.state.get("wandb_id")
        if run_id in _WANDB_RUNS:  # still open in this process: an earlier call stopped by an exception
            return _WANDB_RUNS[run_id]
        if run_id is None:
            run_id = self.state["wandb_id"] = uuid.uuid4().hex[:8]
            self.save()
        run = wandb.init(
            project=self.settings.wandb_project,
            name=self.settings.wandb_name or self.run_dir.name,
            id=run_id,
            resume="allow",
            config=self.config,
            dir=os.environ.get("WANDB_DIR", self.run_dir),
            mode=os.environ.get("WANDB_MODE") or self.settings.wandb_mode,
            reinit="create_new",  # apart from any run the caller has open; WandbLogger gets this one
        )
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        _WANDB_RUNS[run_id] = run
        return run


# W&B runs that compress() opened and has not finished yet, by id.
_WANDB_RUNS: dict[str, Any] = {}
