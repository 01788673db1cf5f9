"""The phases of a run, each resumable on its own: the activation-aware start, slice-wise distillation, global
finetuning; and the one Trainer loop they share (:func:`fit`)."""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ProgressBar
from torch import nn

from tnlit.activations import ActivationDataModule, ActivationStore, activation_init_, input_covariances, open_store
from tnlit.checksums import verified_problem
from tnlit.evaluate import TaskLike
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.pipeline.callbacks import EpochEvaluation, OptimisationTimer, PhaseProgressBar, VerifiedCheckpoint
from tnlit.pipeline.lock import hold
from tnlit.pipeline.run_dir import Run, factor_state, load_factors, save_factors, usable
from tnlit.pipeline.settings import FinetuneSettings, InitSettings, SliceSettings, optimiser_args, uses_store
from tnlit.slices import Slice, tensorized_names

__all__ = ["fit", "global_phase", "initialise", "train_slices"]


def fit(
    module: LightningModule, data: LightningDataModule, run: Run, phase: str, epochs: int, label: str | None = None
) -> None:
    """Train one phase, resuming from its last epoch checkpoint when there is one; the run's ``evaluate`` (the
    student's metric) is called after every epoch when it has one. ``label`` names the progress bar (the phase)."""
    seed_everything(run.seed, workers=True, verbose=False)  # the same data order in every phase and mode
    ckpt_dir = run.dir / "ckpt" / phase.replace(":", "_")
    timer = OptimisationTimer(run.times(phase), on_epoch=run.save)
    callbacks = [*run.trainer.get("callbacks", ()), _epoch_checkpoint(ckpt_dir), timer]
    if run.evaluate is not None:
        callbacks.append(EpochEvaluation(run.state, run.save, phase, run.evaluate))
    if run.progress and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(PhaseProgressBar(label or phase))
    trainer = Trainer(
        max_epochs=epochs,
        accelerator=run.accelerator,
        precision=run.precision,
        devices=run.trainer.get("devices", 1),
        strategy=run.trainer.get("strategy", "auto"),
        num_nodes=run.trainer.get("num_nodes", 1),
        logger=run.loggers.for_phase(phase) if run.loggers else False,
        callbacks=callbacks,
        enable_progress_bar=run.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.14
        trainer.fit(module, datamodule=data, ckpt_path=_usable_checkpoint(ckpt_dir / "last.ckpt"), weights_only=True)
    timer.times["wall_s"] += time.perf_counter() - started
    run.save()
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def initialise(model: nn.Module, student: nn.Module, data: LightningDataModule, init: InitSettings, run: Run) -> None:
    """Fit the student's factors to its layers' calibration inputs (``init.method: activation``), once: the fitted
    factors are kept in ``init.safetensors`` and loaded on a resume; per-layer errors go to state.json ``init``, the
    time to ``times.init`` (counted in the optimisation time: it is part of what the recipe costs)."""
    if init.method == "svd" or run.state.get("done"):  # a finished run's student holds the trained factors
        return
    done = run.root / "init.safetensors"
    if done.exists() and usable(done):
        try:
            load_factors(student, done)
            return
        except Exception as err:  # noqa: BLE001 - a damaged file raises several types; it is only a cache
            warnings.warn(f"{done} is unusable ({err}): fitting the initialisation again", stacklevel=2)
    started = time.perf_counter()
    names = tensorized_names(student)
    covariances = input_covariances(model.to(run.device), data.train_dataloader(), names, init.calibration_batches)
    errors = activation_init_(
        student.to(run.device),
        model,
        covariances,
        damping=init.damping,
        sweeps=init.sweeps,
        max_cg_iter=init.cg_steps,
    )
    seconds = time.perf_counter() - started
    run.state["init"] = {name: {k: round(v, 6) for k, v in e.items()} for name, e in errors.items()}
    run.state.setdefault("times", {})["init"] = {"optimisation_s": seconds, "wall_s": seconds}
    save_factors(factor_state(student), done)
    run.save()


def train_slices(
    model: nn.Module,
    student: nn.Module,
    data: LightningDataModule,
    slices: list[Slice],
    settings: SliceSettings,
    run: Run,
    phase: str = "slicewise",
) -> None:
    """Train the slices that are not finished yet (``stream`` / ``cache``: together; ``serial``: one after another)
    and load the finished ones. Finished slices go to the run's ``slices/``; the phases' state, epoch checkpoints
    and the default activation store to ``run.dir`` (the run directory, or a rank's own directory in a job)."""
    pending = [s for s in slices if not run.load_slices(student, [s])]
    groups = [[s] for s in pending] if settings.mode == "serial" else [pending] if pending else []
    store = None
    for group in groups:
        if store is None and uses_store(settings):
            # Opened once, and only when a slice still has to train: a finished run never reads it. It holds all the
            # slices, so that a serial run resumed after its first slices finds the store it built.
            store = _activation_store(model, data, slices, settings, run)
        module = SliceDistillation(
            model if store is None else None,
            student,
            group,
            **optimiser_args(settings),
            inputs=settings.inputs,
            loss=settings.loss,
        )
        source = (
            data
            if store is None
            else ActivationDataModule(
                store.root, [s.name for s in group], shuffle=settings.cache_shuffle, seed=run.seed
            )
        )
        name = f"slice:{group[0].name}" if settings.mode == "serial" else phase
        label = name if settings.mode == "serial" else f"{phase}: {len(group)} slices ({settings.mode})"
        fit(module, source, run, name, settings.epochs, label=label)
        run.save_slices(student, group)


def _activation_store(
    model: nn.Module, data: LightningDataModule, slices: list[Slice], settings: SliceSettings, run: Run
) -> ActivationStore:
    """Open the activation store (validated; whatever is missing or bad computed) for every slice.

    Its wall time goes to ``state["times"]["cache"]`` (no optimisation time), so that a run's time can be counted
    with its caching, as the paper counts it; a reused store adds only the time its validation took.
    """
    # The teacher runs as it would inside a mixed-precision training step.
    autocast = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(run.precision).split("-")[0])
    started = time.perf_counter()
    shared = hold(settings.cache_dir, "activation store") if settings.cache_dir is not None else nullcontext()
    with shared:  # a shared store: one process builds it at a time
        store = open_store(
            settings.cache_dir or run.dir / "cache",
            model,
            data,
            slices,
            seed=run.seed,
            dtype=settings.cache_dtype,
            device=run.device,
            autocast=autocast,
            progress=run.progress,
        )
    times = run.state.setdefault("times", {}).setdefault(
        "cache", {"optimisation_s": 0.0, "wall_s": 0.0, "shards_built": 0}
    )
    times["wall_s"] += time.perf_counter() - started
    times["shards_built"] += store.built
    run.save()
    return store


def global_phase(
    model: nn.Module,
    student: nn.Module,
    data: LightningDataModule,
    task: TaskLike,
    finetune: FinetuneSettings,
    run: Run,
) -> None:
    """Global finetuning of the student's factors, or its earlier result (``global.safetensors``) loaded. A task with
    no loss of its own (``features``, a callable metric) trains by feature distillation of the final output against
    the teacher's."""
    done = run.root / "global.safetensors"
    if done.exists() and usable(done):
        load_factors(student, done)
        return
    loss = task if isinstance(task, str) and task != "features" else "features"
    module = GlobalFinetune(
        student,
        task=loss,
        teacher=model if finetune.kd_weight or loss == "features" else None,
        **optimiser_args(finetune),
        kd_weight=finetune.kd_weight,
        temperature=finetune.temperature,
    )
    with _batch_size(data, finetune.batch_size):
        fit(module, data, run, "global", finetune.epochs)
    if run.writer:  # one writer: the run's own process, or rank 0 of a job
        save_factors(factor_state(student), done)


@contextmanager
def _batch_size(data: LightningDataModule, size: int | None) -> Iterator[None]:
    """The DataModule's ``batch_size`` set to ``size`` for the block (None: left as it is)."""
    if size is None:
        yield
        return
    before, data.batch_size = data.batch_size, size
    try:
        yield
    finally:
        data.batch_size = before


def _epoch_checkpoint(ckpt_dir: Path) -> VerifiedCheckpoint:
    """``last.ckpt``, replaced at the end of every epoch (Lightning writes it atomically), with its checksum."""
    return VerifiedCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        save_top_k=1,
        monitor=None,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


def _usable_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from, or None; a damaged one is said and set aside, never used."""
    if not path.exists():
        return None
    try:
        problem = verified_problem(path)
        if problem is None:
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file raises many types
        problem = f"unreadable ({err})"
    if problem is None:
        return path
    warnings.warn(
        f"checkpoint {path} is {problem}; set aside as {path.name}.corrupt: this phase starts again from its beginning",
        stacklevel=2,
    )
    path.rename(path.with_name(path.name + ".corrupt"))
    return None
