"""``compress()``: tensorize -> slices -> train (slice-wise, global, or both) -> assemble -> evaluate.

Everything lands in one run directory:

```
run_dir/
  config.json        the config this directory belongs to (a different one is refused unless overwrite)
  state.json         what is done, the metrics and the times so far (rewritten atomically)
  report.csv/.json   the compression report (choices.csv: the candidates that format auto weighed)
  init.safetensors   the factors fitted to calibration inputs, when init.method is activation
  ckpt/<phase>/      Lightning's last.ckpt of the phase in progress (trainable tensors only)
  slices/<name>.safetensors   each finished slice's factors
  cache/             the activation store of the cache and serial modes: manifest.json + one shard a batch
                     (tnlit.activation_store); elsewhere when slicewise.cache_dir says so
  student.safetensors          the assembled student
  ranks/rank<r>/     in a torchrun / srun job (tnlit.distributed): that rank's state, checkpoints and store
  logs/<phase>/version_<n>/    CSV metrics, one version a (re)start of the phase
  wandb/             the W&B run's files when log.wandb is on (elsewhere when $WANDB_DIR says so)
```

Rerunning the same command resumes: finished slices and phases are loaded, not retrained; a phase that was
interrupted restarts from its last epoch checkpoint; a finished activation store is reused (validated), an
interrupted one completed; a finished run only reports.

Launched by ``torchrun --nproc_per_node N`` (or ``srun`` with N tasks), each process trains its share of the slices
and rank 0 assembles the student: see ``tnlit.distributed``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_model
from torch import nn

from tnlit import distributed
from tnlit.activation_store import ActivationStore, StorageDtype, open_store
from tnlit.atomic import atomic_path, atomic_text
from tnlit.data.activations import ActivationDataModule
from tnlit.methods.common import Schedule, factor_parameters
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.slices import Slice, SliceModule, make_slices
from tnlit.tensorize import Rule, TensorizePlan, tensorize

__all__ = [
    "FinetuneSettings",
    "InitSettings",
    "LogSettings",
    "RunDirError",
    "SliceSettings",
    "compress",
    "load_teacher",
]


class _NoAdvert(logging.Filter):
    """Lightning advertises a cloud logger each time a Trainer starts: a hybrid or serial run starts several."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())

Task = Literal["classification", "causal_lm"]
Method = Literal["slicewise", "global", "hybrid"]


@dataclass
class SliceSettings:
    """Slice-wise distillation settings."""

    granularity: str = "block"
    """``layer`` (each tensorized module), ``block`` (ResNet block, transformer MLP) or ``group:k``."""
    block_pattern: str | None = None
    """Regex naming the blocks; a preset (ResNet, GPT-2, LLaMA) is found when omitted."""
    mode: Literal["stream", "cache", "serial"] = "stream"
    """``stream``: one teacher forward per batch trains every slice (no disk); ``cache``: the teacher's activations
    are stored on disk once (the activation store), then every slice trains from them at once, with no teacher
    forward; ``serial``: one slice after another, from the store or the teacher (``serial_source``)."""
    serial_source: Literal["cache", "teacher"] = "cache"
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
    inputs: Literal["teacher", "student", "mix"] = "teacher"
    """A slice's input: the teacher's activation (the paper), the distilled earlier slices' output (``student``), or
    ``mix``: a blend moving from the first to the second over the phase. ``student`` and ``mix`` need live forwards:
    ``stream`` mode, or ``serial`` with ``serial_source: teacher``."""
    loss: Literal["mse", "relative"] = "mse"
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


def _uses_store(settings: SliceSettings) -> bool:
    """Whether slice-wise training reads its activations from the activation store."""
    return settings.mode == "cache" or (settings.mode == "serial" and settings.serial_source == "cache")


def _check_slice_settings(settings: SliceSettings) -> None:
    """Refuse slice-wise settings that cannot work, before anything is loaded or trained."""
    # The CLI checks these Literals; a call from Python does not.
    choices = {"mode": ("stream", "cache", "serial"), "serial_source": ("cache", "teacher"),
               "cache_dtype": ("float32", "bfloat16", "float16"), "inputs": ("teacher", "student", "mix"),
               "loss": ("mse", "relative")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"slicewise.{name} must be one of {', '.join(allowed)}, got {getattr(settings, name)!r}")
    if settings.inputs != "teacher" and _uses_store(settings):
        raise ValueError(
            f"slicewise.inputs={settings.inputs} feeds each slice the output of the student's earlier slices, a live "
            "forward that stored activations cannot give: use mode=stream, or mode=serial with serial_source=teacher"
        )


def _check_settings(
    method: Method, slicewise: SliceSettings, finetune: FinetuneSettings, data: LightningDataModule,
    eval_each_epoch: bool, *, distributed_job: bool,
) -> None:  # fmt: skip
    """Refuse settings that cannot work together, before anything is loaded, trained or written."""
    if method != "global":
        _check_slice_settings(slicewise)
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
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """``offline``: written under ``run_dir/wandb`` (or ``$WANDB_DIR``), no network; ``wandb sync`` uploads it
    later. ``online``: streamed to the W&B server. ``disabled``: nothing. ``$WANDB_MODE``, when set, wins."""


@dataclass
class InitSettings:
    """How the factors start: from the weights alone (SVD), or fitted to the layers' inputs (activation-aware)."""

    method: Literal["svd", "activation"] = "svd"
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


class RunDirError(RuntimeError):
    """A run directory that belongs to another config, or holds a checkpoint that cannot be used."""


def compress(
    teacher: str,
    data: LightningDataModule,
    plan: TensorizePlan,
    task: Task,
    method: Method = "slicewise",
    slicewise: SliceSettings = SliceSettings(),  # noqa: B008 - a frozen-by-convention default, never mutated
    finetune: FinetuneSettings = FinetuneSettings(),  # noqa: B008
    teacher_weights: Path | None = None,
    run_dir: Path = Path("runs/compress"),
    seed: int = 0,
    accelerator: str = "auto",
    precision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: LogSettings = LogSettings(),  # noqa: B008
    eval_each_epoch: bool = False,
    init: InitSettings = InitSettings(),  # noqa: B008
) -> dict[str, Any]:
    """Compress a teacher by a plan and recover it slice-wise, globally, or both (hybrid); resumable.

    Launched by ``torchrun --nproc_per_node N`` (or ``srun`` with N tasks), each process trains its share of the
    slices, the global phase runs under DDP, and rank 0 writes the student (``tnlit.distributed``).

    Args:
        teacher: The dense model: a built-in name, a torchvision name, or a Hugging Face name / directory.
        data: The DataModule (``class_path`` + ``init_args``) whose train split trains and test split evaluates.
        plan: The tensorization plan.
        task: ``classification`` (top-1 accuracy) or ``causal_lm`` (perplexity).
        method: ``slicewise`` (the paper's method), ``global`` (the baseline) or ``hybrid`` (the first, then the
            second).
        slicewise: Slice-wise distillation settings.
        finetune: Global finetuning settings.
        teacher_weights: The teacher's weights: a safetensors file or a Lightning checkpoint from ``tnlit fit``.
        run_dir: Where the run lives; rerunning with the same config resumes it.
        seed: Seed of everything (data order, initialisation of nothing else: the factors come from SVDs).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        precision: Lightning precision (``bf16-mixed`` on GPUs); None is float32.
        overwrite: Start afresh in a run directory that holds another config's run.
        progress: Show Lightning's progress bars (and the activation store's while it is built).
        log: Where the training curves go besides CSV (W&B); not part of the run's config.
        eval_each_epoch: Also evaluate the student on the test split after every epoch of every phase, and record
            each point (phase, epoch, optimisation seconds so far over all phases, metric) in state.json's
            ``curve``: the metric against time, and the time to the best metric as the paper counts it.
        init: How the factors start (SVD, or activation-aware from calibration batches of the train split).
    """
    args = dict(locals())
    if distributed.current() is None and distributed.launched():
        # torchrun or srun started several processes: this call is one rank of a slice-parallel job.
        with distributed.join():
            return compress(**args)
    ranks = distributed.current()
    run_dir = Path(run_dir)
    config = _plain(args)
    _check_settings(method, slicewise, finetune, data, eval_each_epoch, distributed_job=ranks is not None)
    _refuse_another_config(run_dir, config, overwrite)  # in seconds, before the teacher loads
    seed_everything(seed, workers=True, verbose=False)

    model = load_teacher(teacher, teacher_weights).eval()
    # A plan or a granularity that does not fit the model fails here, in seconds, and before the run directory
    # is claimed: a directory claimed by a config that cannot run would refuse the corrected one.
    student, report = tensorize(model, plan)
    slices = make_slices(student, slicewise.granularity, slicewise.block_pattern) if method != "global" else []
    if ranks is not None and not ranks.main:
        return _rank_worker(ranks, model, student, data, slices, run_dir, config, slicewise, finetune)
    state = _open_run_dir(run_dir, config, overwrite)
    report.to_csv(run_dir / "report.csv")
    report.to_json(run_dir / "report.json")
    if report.choices:
        report.choices_to_csv(run_dir / "choices.csv")
    data.prepare_data()
    data.setup("fit")
    _initialise(model, student, data, init, run_dir, state, accelerator)
    if ranks is not None:
        ranks.announce("run_dir")  # the other ranks may now prepare their data and train
    loggers = _Loggers(log, run_dir, state, config)
    evaluate = (lambda student: _evaluate(student, data, task, accelerator)) if eval_each_epoch else None
    trainer_args = {"accelerator": accelerator, "precision": precision, "progress": progress, "seed": seed,
                    "loggers": loggers, "evaluate": evaluate}  # fmt: skip

    if "teacher_metric" not in state:
        state["teacher_metric"] = _evaluate(model, data, task, accelerator)
        state["compression"] = {"params_before": report.params_before, "params_after": report.params_after,
                                "compression_rate": report.compression_rate}  # fmt: skip
        _save_state(run_dir, state)
    if "init_metric" not in state:
        state["init_metric"] = _evaluate(student, data, task, accelerator)
        _save_state(run_dir, state)

    if method in ("slicewise", "hybrid"):
        if ranks is None:
            _train_slices(model, student, data, slices, slicewise, run_dir, run_dir, state, trainer_args)
        else:
            _train_share(ranks, model, student, data, slices, slicewise, run_dir, state, trainer_args)
        state.setdefault("metrics", {})
        if "slicewise" not in state["metrics"]:
            state["metrics"]["slicewise"] = _evaluate(student, data, task, accelerator)
            _save_state(run_dir, state)

    if method in ("global", "hybrid"):
        if ranks is not None:  # every rank of the job takes part: Lightning's DDP
            trainer_args = {**trainer_args, **ranks.ddp(accelerator)}
        _global_phase(model, student, data, task, finetune, run_dir, state, trainer_args)
        state.setdefault("metrics", {})
        if "global" not in state["metrics"]:
            state["metrics"]["global"] = _evaluate(student, data, task, accelerator)
            _save_state(run_dir, state)

    # save_model, not save_file: it keeps one copy of tied weights (an LM's embedding and head).
    with atomic_path(run_dir / "student.safetensors") as tmp:
        save_model(student, str(tmp))
    state["done"] = True
    state["final_metric"] = state["metrics"][method if method != "hybrid" else "global"]
    _save_state(run_dir, state)
    loggers.close()
    return state


def load_teacher(name: str, weights: Path | None = None) -> nn.Module:
    """A teacher by name, with its weights from a safetensors file or a ``tnlit fit`` checkpoint when given."""
    from tnlit.models import load_model

    model = load_model(name)
    if weights is None:
        return model
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher weights {weights} do not exist: train the teacher first (tnlit fit)")
    try:
        if weights.suffix == ".safetensors":
            # load_model, not load_file: a file written by save_model holds one copy of tied weights.
            load_safetensors_model(model, weights, strict=True)
            return model
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "state_dict" in str(err):  # the file is sound but belongs to another architecture
            raise ValueError(f"teacher weights {weights} do not fit model {name!r}: {err}") from err
        raise ValueError(f"teacher weights {weights} are unreadable ({err}): train the teacher again") from err
    except Exception as err:  # noqa: BLE001 - a truncated file raises several types
        raise ValueError(f"teacher weights {weights} are unreadable ({err}): train the teacher again") from err
    state = ckpt.get("state_dict", ckpt)
    # A LightningModule keeps the network under one attribute ("model."): strip it.
    prefixes = {k.split(".", 1)[0] for k in state}
    if len(prefixes) == 1:
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"teacher weights {weights} do not fit model {name!r}: {err}") from err
    return model


# ------------------------------------------------------------------------------------------ run dir


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON-able data: dataclasses as dicts, the DataModule as class path + hyper-parameters."""
    out = {}
    for key, value in values.items():
        if key in ("progress", "log", "eval_each_epoch"):  # what is shown and recorded, not what is computed
            continue
        if isinstance(value, LightningDataModule):
            cls = type(value)
            value = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.hparams)}
        elif hasattr(value, "__dataclass_fields__"):
            value = asdict(value)
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def _with_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings it lacks at their defaults: a setting added to tnlit after a run started,
    left at its default, computes what the run computed, so the run stays resumable (and finished)."""
    defaults = _plain({name: p.default for name, p in inspect.signature(compress).parameters.items()
                       if p.default is not inspect.Parameter.empty})  # fmt: skip
    defaults["plan"] = _plain({"plan": TensorizePlan(rules=[])})["plan"]
    rule = _plain({"rule": Rule(pattern=".", format="mpo")})["rule"]

    def fill(value: Any, default: Any) -> Any:
        if not isinstance(value, dict) or not isinstance(default, dict):
            return value
        return {**default, **{k: fill(v, default.get(k)) for k, v in value.items()}}

    filled = fill(old, defaults)
    if isinstance(filled.get("plan"), dict):
        filled["plan"]["rules"] = [fill(r, rule) for r in filled["plan"].get("rules", [])]
    return filled


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two configs the same run: the config with its missing settings at their defaults, less the
    settings that compute nothing (the activation-aware fit's options when the factors start from the SVD)."""
    config = _with_defaults(config)
    if isinstance(config.get("init"), dict) and config["init"].get("method") == "svd":
        config = {**config, "init": {"method": "svd"}}
    return config


def _refuse_another_config(run_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Raise RunDirError when the directory holds a run of another config and overwrite is off; reads only."""
    saved = run_dir / "config.json"
    if overwrite or not saved.exists():
        return
    old, config = _identity(json.loads(saved.read_text())), _identity(config)
    if old != config:
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise RunDirError(
            f"{run_dir} holds a run of another config (differs in: {', '.join(changed)}); give another run_dir, "
            "or overwrite=true to discard that run"
        )


def _open_run_dir(run_dir: Path, config: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The run's state: fresh, or resumed when the directory holds a run of the same config."""
    _refuse_another_config(run_dir, config, overwrite)
    saved = run_dir / "config.json"
    if saved.exists() and _identity(json.loads(saved.read_text())) != _identity(config):
        shutil.rmtree(run_dir)  # overwrite
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        atomic_text(saved, json.dumps(config, indent=2) + "\n")
    state_file = run_dir / "state.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_text(run_dir / "state.json", json.dumps(state, indent=2) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def _factor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from tnlit.methods.common import factor_parameters

    ids = {id(p) for p in factor_parameters([module])}
    return {n: p for n, p in module.named_parameters() if id(p) in ids}


def _slice_file(run_dir: Path, s: Slice) -> Path:
    return run_dir / "slices" / f"{s.name}.safetensors"


def _save_slices(run_dir: Path, student: nn.Module, group: list[Slice]) -> None:
    for s in group:
        _atomic_save(_factor_state(SliceModule(student, s)), _slice_file(run_dir, s))


def _load_slices(run_dir: Path, student: nn.Module, group: list[Slice]) -> bool:
    """Load the group's finished slices; False (and nothing loaded) unless all of them are finished and sound."""
    files = [_slice_file(run_dir, s) for s in group]
    if not all(f.exists() for f in files):
        return False
    try:
        states = [load_file(f) for f in files]
        for s, state in zip(group, states):
            SliceModule(student, s).load_state_dict(state, strict=False)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        warnings.warn(
            f"finished slice files {[str(f) for f in files]} are unreadable ({err}); training again", stacklevel=2
        )
        return False
    return True


def _load_factors(student: nn.Module, path: Path) -> None:
    missing = set(_factor_state(student)) - set(state := load_file(path))
    if missing:
        raise RunDirError(f"{path} lacks {len(missing)} factor tensors of this student: delete it to retrain")
    student.load_state_dict(state, strict=False)


def _activation_store(
    model: nn.Module, data: LightningDataModule, slices: list[Slice], settings: SliceSettings, run_dir: Path,
    state: dict[str, Any], *, accelerator: str, precision: str | None, progress: bool, seed: int,
) -> ActivationStore:  # fmt: skip
    """Open the activation store (validated; whatever is missing or bad computed) for every slice.

    Its wall time goes to ``state["times"]["cache"]`` (no optimisation time), so that a run's time can be counted
    with its caching, as the paper counts it; a reused store adds only the time its validation took.
    """
    device = _device(accelerator)
    # The teacher runs as it would inside a mixed-precision training step.
    autocast = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])
    started = time.perf_counter()
    store = open_store(
        settings.cache_dir or run_dir / "cache", model, data, slices, seed=seed, dtype=settings.cache_dtype,
        device=device, autocast=autocast, progress=progress,
    )  # fmt: skip
    times = state.setdefault("times", {}).setdefault("cache", {"optimisation_s": 0.0, "wall_s": 0.0, "shards_built": 0})
    times["wall_s"] += time.perf_counter() - started
    times["shards_built"] += store.built
    _save_state(run_dir, state)
    return store


# ------------------------------------------------------------------------------------------ training


class _OptimisationTimer(Callback):
    """Seconds spent in training batches (forward, backward, optimizer step), as the paper counts time."""

    def __init__(self, state: dict[str, Any], phase: str, run_dir: Path) -> None:
        self.state, self.phase, self.run_dir = state, phase, run_dir
        self.times = state.setdefault("times", {}).setdefault(phase, {"optimisation_s": 0.0, "wall_s": 0.0})

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.times["optimisation_s"] += time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _save_state(self.run_dir, self.state)

    @staticmethod
    def _sync(trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)


class _EpochEvaluation(Callback):
    """The student's test metric after every epoch of a phase, with the optimisation time spent so far in all
    phases, appended to state.json's ``curve``."""

    def __init__(
        self, state: dict[str, Any], run_dir: Path, phase: str, evaluate: Callable[[nn.Module], dict[str, float]]
    ) -> None:
        self.state, self.run_dir, self.phase, self.evaluate = state, run_dir, phase, evaluate

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        points = self.state.setdefault("curve", [])
        epoch = trainer.current_epoch + 1
        spent = sum(t.get("optimisation_s", 0.0) for t in self.state.get("times", {}).values())
        point = {"phase": self.phase, "epoch": epoch, "optimisation_s": spent, **self.evaluate(pl_module.student)}
        # Lightning runs checkpoint callbacks last, so a kill can fall between this point and the epoch's checkpoint;
        # the resumed phase trains that epoch again and its point replaces this one.
        points[:] = [p for p in points if (p["phase"], p["epoch"]) != (self.phase, epoch)] + [point]
        _save_state(self.run_dir, self.state)


class _Loggers:
    """The loggers of one compress() call: CSV for every phase; W&B, when asked, one run across the phases."""

    def __init__(self, settings: LogSettings, run_dir: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
        self.settings, self.run_dir, self.state, self.config = settings, run_dir, state, config

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
            _save_state(self.run_dir, self.state)
        run = wandb.init(
            project=self.settings.wandb_project, name=self.settings.wandb_name or self.run_dir.name, id=run_id,
            resume="allow", config=self.config, dir=os.environ.get("WANDB_DIR", self.run_dir),
            mode=os.environ.get("WANDB_MODE") or self.settings.wandb_mode,
            reinit="create_new",  # apart from any run the caller has open; WandbLogger gets this one
        )  # fmt: skip
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        _WANDB_RUNS[run_id] = run
        return run


# W&B runs that compress() opened and has not finished yet, by id.
_WANDB_RUNS: dict[str, Any] = {}


def _fit(
    module: LightningModule, data: LightningDataModule, run_dir: Path, state: dict[str, Any], phase: str, epochs: int,
    *, accelerator: str, precision: str | None, progress: bool, seed: int, loggers: _Loggers,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None, devices: list[int] | int = 1,
    callbacks: Sequence[Callback] = (), strategy: str = "auto", num_nodes: int = 1, state_dir: Path | None = None,
) -> None:  # fmt: skip
    """Train one phase, resuming from its last epoch checkpoint when there is one; ``evaluate`` (the student's
    metric) is called after every epoch when given. ``devices``: one device (a rank of a job names its own GPU), or
    with ``strategy="ddp"`` every process of a job; ``state_dir``: where ``state`` is saved (default: run_dir)."""
    seed_everything(seed, workers=True, verbose=False)  # the same data order in every phase and mode
    ckpt_dir = run_dir / "ckpt" / phase.replace(":", "_")
    last = ckpt_dir / "last.ckpt"
    state_dir = state_dir or run_dir
    callbacks = [*callbacks, _epoch_checkpoint(ckpt_dir), timer := _OptimisationTimer(state, phase, state_dir)]
    if evaluate is not None:
        callbacks.append(_EpochEvaluation(state, run_dir, phase, evaluate))
    trainer = Trainer(
        max_epochs=epochs, accelerator=accelerator, precision=precision, devices=devices, strategy=strategy,
        num_nodes=num_nodes,
        logger=loggers.for_phase(phase),
        callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=10,
    )  # fmt: skip
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.14
        trainer.fit(module, datamodule=data, ckpt_path=_usable_checkpoint(last), weights_only=True)
    timer.times["wall_s"] += time.perf_counter() - started
    _save_state(state_dir, state)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _initialise(
    model: nn.Module, student: nn.Module, data: LightningDataModule, init: InitSettings, run_dir: Path,
    state: dict[str, Any], accelerator: str,
) -> None:  # fmt: skip
    """Fit the student's factors to its layers' calibration inputs (``init.method: activation``), once: the fitted
    factors are kept in ``init.safetensors`` and loaded on a resume; per-layer errors go to state.json ``init``, the
    time to ``times.init`` (counted in the optimisation time: it is part of what the recipe costs)."""
    if init.method == "svd" or state.get("done"):  # a finished run's student holds the trained factors
        return
    done = run_dir / "init.safetensors"
    if done.exists():
        try:
            _load_factors(student, done)
            return
        except Exception as err:  # noqa: BLE001 - a damaged file raises several types; it is only a cache
            warnings.warn(f"{done} is unusable ({err}): fitting the initialisation again", stacklevel=2)
    from tnlit.calibration import activation_init_, input_covariances
    from tnlit.slices import tensorized_names

    started = time.perf_counter()
    device = _device(accelerator)
    names = tensorized_names(student)
    covariances = input_covariances(model.to(device), data.train_dataloader(), names, init.calibration_batches)
    errors = activation_init_(
        student.to(device), model, covariances, damping=init.damping, sweeps=init.sweeps, max_cg_iter=init.cg_steps
    )
    seconds = time.perf_counter() - started
    state["init"] = {name: {k: round(v, 6) for k, v in e.items()} for name, e in errors.items()}
    state.setdefault("times", {})["init"] = {"optimisation_s": seconds, "wall_s": seconds}
    _atomic_save(_factor_state(student), done)
    _save_state(run_dir, state)


def _train_slices(
    model: nn.Module, student: nn.Module, data: LightningDataModule, slices: list[Slice], settings: SliceSettings,
    run_dir: Path, work_dir: Path, state: dict[str, Any], trainer_args: dict[str, Any], phase: str = "slicewise",
) -> None:  # fmt: skip
    """Train the slices that are not finished yet (``stream`` / ``cache``: together; ``serial``: one after another)
    and load the finished ones. Finished slices go to ``run_dir/slices``; the phases' state, epoch checkpoints and
    the default activation store go to ``work_dir`` (the run directory, or a rank's own directory in a job)."""
    pending = [s for s in slices if not _load_slices(run_dir, student, [s])]
    groups = [[s] for s in pending] if settings.mode == "serial" else [pending] if pending else []
    store = None
    for group in groups:
        if store is None and _uses_store(settings):
            # Opened once, and only when a slice still has to train: a finished run never reads it. It holds all the
            # slices, so that a serial run resumed after its first slices finds the store it built.
            store = _activation_store(
                model, data, slices, settings, work_dir, state, **{k: trainer_args[k] for k in _STORE_ARGS}
            )  # fmt: skip
        module = SliceDistillation(
            model if store is None else None, student, group, lr=settings.lr, weight_decay=settings.weight_decay,
            schedule=settings.schedule, warmup_steps=settings.warmup_steps, inputs=settings.inputs,
            loss=settings.loss,
        )  # fmt: skip
        source = data if store is None else ActivationDataModule(
            store.root, [s.name for s in group], shuffle=settings.cache_shuffle, seed=trainer_args["seed"]
        )  # fmt: skip
        name = f"slice:{group[0].name}" if settings.mode == "serial" else phase
        _fit(module, source, work_dir, state, name, settings.epochs, **trainer_args)
        _save_slices(run_dir, student, group)


_STORE_ARGS = ("accelerator", "precision", "progress", "seed")


def _train_share(
    ranks: distributed.Ranks, model: nn.Module, student: nn.Module, data: LightningDataModule, slices: list[Slice],
    settings: SliceSettings, run_dir: Path, state: dict[str, Any], trainer_args: dict[str, Any],
) -> None:  # fmt: skip
    """One rank's share of the slices (tnlit.distributed), then the wait for every rank. Rank 0 then loads every
    slice and records each rank's share and times in ``state``: ``times`` gets every rank's phases, ``distributed``
    the shares and the job's slice-wise time (its slowest rank's)."""
    work_dir = run_dir / "ranks" / f"rank{ranks.rank}"
    if settings.cache_dir is not None:  # a shared store directory: one store per share
        settings = replace(settings, cache_dir=settings.cache_dir / f"rank{ranks.rank}-of-{ranks.world_size}")
    trainer_args = {**trainer_args, "devices": ranks.devices(trainer_args["accelerator"]),
                    "callbacks": [distributed.PeerWatch(ranks)]}  # fmt: skip

    def train(share: list[int]) -> dict[str, Any]:
        rank_state = json.loads((work_dir / "state.json").read_text()) if (work_dir / "state.json").exists() else {}
        phase = f"slicewise:rank{ranks.rank}-of-{ranks.world_size}"
        _train_slices(model, student, data, [slices[i] for i in share], settings, run_dir, work_dir, rank_state,
                      trainer_args, phase)  # fmt: skip
        return {"times": rank_state.get("times", {})}

    sizes = [sum(p.numel() for p in factor_parameters([SliceModule(student, s)])) for s in slices]
    reports = distributed.train_share(ranks, [s.name for s in slices], sizes, train)
    # Every rank: the hybrid's global phase starts from the whole slice-wise student on each.
    if not _load_slices(run_dir, student, slices):
        raise RunDirError(f"every rank finished, yet {run_dir / 'slices'} lacks slices of this student")
    if not ranks.main:
        return
    times = state.setdefault("times", {})
    for report in reports:
        # Phases are named per slice or per rank; the store's build ("cache") is each rank's own.
        times.update({k if k != "cache" else f"cache:rank{report['rank']}": v for k, v in report["times"].items()})
        report["optimisation_s"] = sum(t.get("optimisation_s", 0.0) for t in report["times"].values())
        report["wall_s"] = sum(t.get("wall_s", 0.0) for t in report["times"].values())
        del report["times"]
    state["distributed"] = {
        "world_size": ranks.world_size, "ranks": reports,
        "optimisation_s": max(r["optimisation_s"] for r in reports), "wall_s": max(r["wall_s"] for r in reports),
    }  # fmt: skip
    _save_state(run_dir, state)


def _rank_worker(
    ranks: distributed.Ranks, model: nn.Module, student: nn.Module, data: LightningDataModule, slices: list[Slice],
    run_dir: Path, config: dict[str, Any], slicewise: SliceSettings, finetune: FinetuneSettings,
) -> dict[str, Any]:  # fmt: skip
    """A rank above 0: once rank 0 has claimed the run directory and prepared the data, train this rank's share of
    the slices (CSV logs only, no progress bars) and wait for the others, then take part in the global phase's DDP;
    rank 0 evaluates and writes everything else."""
    ranks.wait_for(["run_dir"])
    if config["init"]["method"] != "svd":  # rank 0 fitted the factors before it announced the run directory
        _load_factors(student, run_dir / "init.safetensors")
    data.prepare_data()  # after rank 0's: a cache rank 0 built is found, not built again
    data.setup("fit")
    trainer_args = {"accelerator": config["accelerator"], "precision": config["precision"], "progress": False,
                    "seed": config["seed"], "loggers": _Loggers(LogSettings(), run_dir, {}, config),
                    "evaluate": None}  # fmt: skip
    if slices:
        _train_share(ranks, model, student, data, slices, slicewise, run_dir, {}, trainer_args)
    if config["method"] in ("global", "hybrid"):
        work_dir = run_dir / "ranks" / f"rank{ranks.rank}"  # its times; rank 0 writes the run's state
        trainer_args = {**trainer_args, **ranks.ddp(config["accelerator"]), "state_dir": work_dir}
        _global_phase(model, student, data, config["task"], finetune, run_dir, {}, trainer_args)
    return {"rank": ranks.rank, "world_size": ranks.world_size}


def _global_phase(
    model: nn.Module, student: nn.Module, data: LightningDataModule, task: Task, finetune: FinetuneSettings,
    run_dir: Path, state: dict[str, Any], trainer_args: dict[str, Any],
) -> None:  # fmt: skip
    """Global finetuning of the student's factors, or its earlier result (``global.safetensors``) loaded."""
    done = run_dir / "global.safetensors"
    if done.exists():
        _load_factors(student, done)
        return
    module = GlobalFinetune(
        student, task=task, teacher=model if finetune.kd_weight else None, lr=finetune.lr,
        weight_decay=finetune.weight_decay, schedule=finetune.schedule, warmup_steps=finetune.warmup_steps,
        kd_weight=finetune.kd_weight, temperature=finetune.temperature,
    )  # fmt: skip
    with _batch_size(data, finetune.batch_size):
        _fit(module, data, run_dir, state, "global", finetune.epochs, **trainer_args)
    if trainer_args.get("state_dir") is None:  # one writer: the run's own process, or rank 0 of a job
        _atomic_save(_factor_state(student), done)


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


def _epoch_checkpoint(ckpt_dir: Path) -> ModelCheckpoint:
    """``last.ckpt``, replaced at the end of every epoch (Lightning writes it atomically)."""
    return ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None, save_on_train_epoch_end=True,
        enable_version_counter=False,
    )  # fmt: skip


def _usable_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from, or None; a damaged one is said and set aside, never used."""
    if not path.exists():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file raises many types
        warnings.warn(
            f"checkpoint {path} is unreadable ({err}); this phase starts again from its beginning", stacklevel=2
        )
        path.rename(path.with_name(path.name + ".corrupt"))
        return None
    return path


def _device(accelerator: str) -> str:
    """Where the work outside Lightning's Trainer runs (the store's teacher passes, the init's fit, evaluation)."""
    return "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"


def _evaluate(model: nn.Module, data: LightningDataModule, task: Task, accelerator: str) -> dict[str, float]:
    from tnlit.evaluate import accuracy, perplexity

    device = _device(accelerator)
    model.to(device)
    data.setup("test")
    key, measure = ("top1", accuracy) if task == "classification" else ("perplexity", perplexity)
    metrics = {key: measure(model, data.test_dataloader(), device=device)}
    # A DataModule with several evaluation texts (tnlit.data.text_sources) is also measured on each alone: a
    # compression calibrated on some sources must be judged on every one, and on sources it never saw.
    if callable(by_source := getattr(data, "test_dataloaders", None)):
        metrics.update({f"{key}/{name}": measure(model, loader, device=device) for name, loader in by_source().items()})
    return metrics
