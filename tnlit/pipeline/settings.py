"""The settings of ``compress()`` as dataclasses (their field docstrings are the CLI's help), and every check that
can be made of them before anything is loaded, trained or written: here, once."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule

from tnlit.types import (
    InitMethod,
    Method,
    Schedule,
    SerialSource,
    SliceInputs,
    SliceLoss,
    SliceMode,
    StorageDtype,
    WandbMode,
    check_choice,
)

__all__ = [
    "FinetuneSettings",
    "InitSettings",
    "LogSettings",
    "SliceSettings",
    "check_settings",
    "optimiser_args",
    "uses_store",
]


@dataclass
class SliceSettings:
    """Slice-wise distillation settings."""

    granularity: str = "block"
    """``layer`` (each tensorized module), ``block`` (ResNet block, transformer MLP) or ``group:k``."""
    block_pattern: str | None = None
    """Regex naming the blocks; a preset (ResNet, GPT-2, LLaMA) is found when omitted."""
    mode: SliceMode = "stream"
    """``stream``: one teacher forward per batch trains every slice (no disk); ``cache``: the teacher's activations
    are stored on disk once (the activation store), then every slice trains from them at once, with no teacher
    forward; ``serial``: one slice after another, from the store or the teacher (``serial_source``)."""
    serial_source: SerialSource = "cache"
    """Where ``serial`` mode's activations come from: ``cache``: the activation store, built once for all slices;
    ``teacher``: a teacher forward on every batch of every slice (no disk; a teacher pass per slice and epoch)."""
    cache_dir: Path | None = None
    """The activation store's directory; None: ``<run_dir>/cache``. Runs with the same teacher weights, data
    (DataModule, hyper-parameters, seed), slices and ``cache_dtype`` can share one, one run at a time; a store
    that does not match is said and rebuilt, a damaged or missing shard recomputed."""
    cache_dtype: StorageDtype = "float32"
    """Storage dtype of the activation store: ``float32``, or ``bfloat16`` / ``float16`` for half the disk and
    reading; read back as float32."""
    cache_shuffle: bool = True
    """Visit the stored batches in a new order every epoch (seeded by seed + epoch). The store holds the batches of
    one pass over the data, whole: shuffling reorders batches, never the examples inside them. Off: stored order."""
    inputs: SliceInputs = "teacher"
    """A slice's input: the teacher's activation (the paper), the distilled earlier slices' output (``student``), or
    ``mix``: a blend moving from the first to the second over the phase. ``student`` and ``mix`` need live forwards:
    ``stream`` mode, or ``serial`` with ``serial_source: teacher``."""
    loss: SliceLoss = "mse"
    """``mse``, or ``relative``: each slice's MSE over its target's mean square (the fraction of its output energy
    missed), comparable across slices and layers of any scale."""
    epochs: int = 1
    """Epochs over the training data (per slice in serial mode)."""
    lr: float = 1e-3
    """Adam learning rate (the paper: 1e-3 for ResNet-34 on CIFAR)."""
    weight_decay: float = 0.0
    """AdamW weight decay; 0 is plain Adam."""
    schedule: Schedule = "constant"
    """``constant`` or ``cosine`` decay after the warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""


@dataclass
class FinetuneSettings:
    """Global finetuning settings (the baseline, and the second half of the hybrid)."""

    epochs: int = 1
    """Epochs over the training data."""
    batch_size: int | None = None
    """Train batch size of this phase (per process); None: the DataModule's. Lets a hybrid distil with small
    batches and finetune with large ones from one DataModule (the paper: 8 and 64), which must keep its batch size
    in a ``batch_size`` attribute, as tnlit's DataModules do."""
    lr: float = 5e-4
    """Adam learning rate (the paper: 5e-4 for ResNet-34 on CIFAR)."""
    weight_decay: float = 0.0
    """AdamW weight decay; 0 is plain Adam."""
    schedule: Schedule = "constant"
    """``constant`` or ``cosine`` decay after the warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    kd_weight: float = 0.0
    """Weight of logit distillation from the teacher mixed into the task loss (0 = task loss only)."""
    temperature: float = 2.0
    """Softmax temperature of the logit distillation."""


@dataclass
class LogSettings:
    """Where the training curves go besides the CSV files under ``run_dir/logs`` (always written).

    Not part of the run's config: changing them resumes the run, never refuses or discards it.
    """

    wandb: bool = False
    """Also log to Weights & Biases (Lightning's WandbLogger): one W&B run per run directory, across all its phases,
    resumed with it (its id is kept in state.json); the evaluations go to the W&B run's summary."""
    wandb_project: str = "tnlit"
    """The W&B project."""
    wandb_name: str | None = None
    """The W&B run's name; None: the run directory's name."""
    wandb_mode: WandbMode = "offline"
    """``offline``: written under ``run_dir/wandb`` (or ``$WANDB_DIR``), no network; ``wandb sync`` uploads it
    later. ``online``: streamed to the W&B server. ``disabled``: nothing. ``$WANDB_MODE``, when set, wins."""


@dataclass
class InitSettings:
    """How the factors start: from the weights alone (SVD), or fitted to the layers' inputs (activation-aware)."""

    method: InitMethod = "svd"
    """``svd``: TT-SVD / HOSVD / truncated SVD of each weight (the paper's), the least weight error. ``activation``:
    the least error of each layer's output on calibration inputs, ``||(W' - W) X^T||`` with the full input
    covariance: exact for low rank (whitened SVD, as SVD-LLM); alternating least squares over the cores for MPO and
    Tucker-2, started from the SVD (Tucker-2: output factor and core jointly exact, input factor by conjugate
    gradient)."""
    calibration_batches: int = 8
    """Training batches whose inputs the teacher's layers see, to estimate each layer's input covariance."""
    sweeps: int = 2
    """Alternating least-squares sweeps over the cores (MPO, Tucker)."""
    cg_steps: int = 20
    """Conjugate-gradient steps per core and sweep (Tucker-2: for ``u_in`` only; ``u_out`` and the core are solved
    exactly): each step lowers the error and costs a product of the layer's matrix with its input covariance. A
    128-channel 3x3 conv at CR 0.7 on 2 CPU cores: 2 sweeps of 20 steps, 1 s; of 100 steps, 3 s, for 0.6 % less
    output error."""
    damping: float = 1e-6
    """Ridge added to each covariance, relative to its mean diagonal: keeps the fit unique where inputs never vary."""


def optimiser_args(settings: SliceSettings | FinetuneSettings) -> dict[str, Any]:
    """A phase's optimiser settings as the LightningModules take them (``configure_adam``'s)."""
    return {k: getattr(settings, k) for k in ("lr", "weight_decay", "schedule", "warmup_steps")}


def uses_store(settings: SliceSettings) -> bool:
    """Whether slice-wise training reads its activations from the activation store."""
    return settings.mode == "cache" or (settings.mode == "serial" and settings.serial_source == "cache")


def _check_choices(prefix: str, settings: object) -> None:
    """Every ``Literal`` field of a settings dataclass holds one of its values: the CLI checks this, a call from
    Python does not."""
    hints = typing.get_type_hints(type(settings))
    for f in fields(settings):
        if typing.get_origin(hints[f.name]) is typing.Literal:
            check_choice(f"{prefix}.{f.name}", getattr(settings, f.name), hints[f.name])


def _check_counts(slicewise: SliceSettings, finetune: FinetuneSettings) -> None:
    """Epochs and batch sizes are whole numbers >= 1 (a phase's, whether or not the method runs it)."""
    counts = {
        "slicewise.epochs": slicewise.epochs,
        "finetune.epochs": finetune.epochs,
        "finetune.batch_size": finetune.batch_size,
    }
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def check_settings(
    method: Method,
    slicewise: SliceSettings,
    finetune: FinetuneSettings,
    init: InitSettings,
    data: LightningDataModule,
    eval_each_epoch: bool,
    *,
    distributed_job: bool,
) -> None:
    """Refuse settings that cannot work, alone or together, before anything is loaded, trained or written."""
    check_choice("method", method, Method)
    for prefix, settings in (("slicewise", slicewise), ("finetune", finetune), ("init", init)):
        _check_choices(prefix, settings)
    _check_counts(slicewise, finetune)
    if method != "global" and slicewise.inputs != "teacher" and uses_store(slicewise):
        raise ValueError(
            f"slicewise.inputs={slicewise.inputs} feeds each slice the output of the student's earlier slices, a live "
            "forward that stored activations cannot give: use mode=stream, or mode=serial with serial_source=teacher"
        )
    if method != "slicewise" and finetune.batch_size is not None and not hasattr(data, "batch_size"):
        raise ValueError(
            f"finetune.batch_size needs a DataModule that keeps its batch size in a batch_size attribute; "
            f"{type(data).__name__} has none: leave finetune.batch_size null and set the DataModule's batch size"
        )
    if distributed_job and eval_each_epoch:
        raise ValueError("eval_each_epoch needs a one-process run: the ranks' slices finish at different times")
    if distributed_job and slicewise.inputs != "teacher":
        raise ValueError(
            f"slicewise.inputs={slicewise.inputs} needs a one-process run: earlier slices train on other ranks"
        )
