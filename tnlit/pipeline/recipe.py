"""``compress()``: tensorize -> slices -> train (slice-wise, global, or both) -> assemble -> evaluate, in one
run directory (:mod:`tnlit.pipeline.run_dir`).

Rerunning the same command resumes: finished slices and phases are loaded, not retrained; a phase that was
interrupted restarts from its last epoch checkpoint; a finished activation store is reused (validated), an
interrupted one completed; a finished run only reports.

Launched by ``torchrun --nproc_per_node N`` (or ``srun`` with N tasks), each process trains its share of the slices
and rank 0 assembles the student: see :mod:`tnlit.pipeline.parallel` and :mod:`tnlit.distributed`.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, seed_everything
from safetensors.torch import load_file, save_model
from torch import nn

from tnlit import distributed
from tnlit.activations.store import teacher_fingerprint
from tnlit.checksums import written_verified
from tnlit.evaluate import TaskLike, evaluate_task, metric_name
from tnlit.export import save_architecture
from tnlit.models import load_teacher
from tnlit.pipeline.callbacks import Loggers, quiet_lightning
from tnlit.pipeline.checks import check_data, check_teacher
from tnlit.pipeline.lock import hold
from tnlit.pipeline.parallel import rank_worker, train_share
from tnlit.pipeline.phases import global_phase, initialise, train_slices
from tnlit.pipeline.run_dir import Run, open_run_dir, plain, read_state, refuse_another, run_inputs, usable
from tnlit.pipeline.settings import FinetuneSettings, InitSettings, LogSettings, SliceSettings, check_settings
from tnlit.pipeline.signals import stop_on_signals
from tnlit.slices import Slice, make_slices
from tnlit.tensorize import CompressionReport, TensorizePlan, tensorize
from tnlit.types import Method

__all__ = ["compress"]


def compress(
    teacher: str | nn.Module,
    data: LightningDataModule,
    plan: TensorizePlan,
    task: TaskLike,
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
        teacher: The dense model: a built-in name (``smollm2-135m`` among them), a torchvision name, or a Hugging Face
            name / directory; from Python also an ``nn.Module`` (left as it is: the student is a tensorized copy),
            which the run's identity knows by the sha256 of its weights, not by a name.
        data: The DataModule (``class_path`` + ``init_args``) whose train split trains and test split evaluates.
        plan: The tensorization plan.
        task: ``classification`` (top-1 accuracy), ``causal_lm`` (perplexity), or ``features`` (a model with no task
            head: relative error and cosine similarity of its output against the teacher's); from Python also a
            torchmetrics ``Metric`` (updated with the output and the labels of ``(inputs, labels)`` batches) or a
            function of (model, test dataloader) -> float. ``features`` and callables have no loss for the global
            phase: it distils the teacher's final output (squared error over the teacher's mean square).
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

    Returns the run's state (``state.json``: metrics, times, curve) with the student itself under ``student``.
    """
    args = dict(locals())
    if distributed.current() is None and distributed.launched():
        # torchrun or srun started several processes: this call is one rank of a slice-parallel job.
        with distributed.join():
            return compress(**args)
    ranks, config = distributed.current(), plain(_named(args))
    check_settings(method, slicewise, finetune, init, data, eval_each_epoch, distributed_job=ranks is not None)
    refuse_another(Path(run_dir), config, overwrite, compress)  # in seconds, before the teacher loads
    run = Run(Path(run_dir), accelerator=accelerator, precision=precision, progress=progress, seed=seed)
    with ExitStack() as held:
        held.enter_context(stop_on_signals(run.dir, "the same tnlit compress command"))
        if ranks is None or ranks.main:  # one lock a job: its rank 0's
            held.enter_context(hold(run.dir))
        model, student, report, slices = _load(teacher, teacher_weights, data, plan, slicewise, method, seed)
        if ranks is not None and not ranks.main:
            return rank_worker(ranks, model, student, data, slices, run, config, slicewise, finetune)
        inputs = partial(run_inputs, model, teacher_weights, data, fingerprint=_module_hash(config))
        run.state = open_run_dir(run.dir, config, overwrite, compress, inputs)
        _prepare(run, model, student, report, data, init, config, log)
        if eval_each_epoch:
            run.evaluate = lambda student: evaluate_task(student, data, task, run.device, teacher=model)
        if ranks is not None:
            ranks.announce("run_dir")  # the other ranks may now prepare their data and train
        _recover(run, model, student, data, task, method, slices, slicewise, finetune)
        return _finish(run, student, method)


def _load(
    teacher: str | nn.Module,
    teacher_weights: Path | None,
    data: LightningDataModule,
    plan: TensorizePlan,
    slicewise: SliceSettings,
    method: Method,
    seed: int,
) -> tuple[nn.Module, nn.Module, CompressionReport, list[Slice]]:
    """The teacher (seeded: one without weights is the run's own initialisation), checked with the data,
    tensorized, and sliced.

    A plan, a granularity, a teacher or data that does not fit fails here, in seconds, and before the run directory
    is claimed: a directory claimed by a config that cannot run would refuse the corrected one.
    """
    quiet_lightning()
    seed_everything(seed, workers=True, verbose=False)
    model = _teacher(teacher, teacher_weights).eval()
    check_teacher(model, teacher if isinstance(teacher, str) else type(teacher).__name__)
    check_data(data, model)
    student, report = tensorize(model, plan)
    slices = make_slices(student, slicewise.granularity, slicewise.block_pattern) if method != "global" else []
    return model, student, report, slices


def _named(args: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as the run's identity sees them: a teacher module by its class and the sha256 of its
    weights, a callable task by its name (a different function of the same name is the same run)."""
    named = dict(args)
    if isinstance(args["teacher"], nn.Module):
        cls = type(args["teacher"])
        named["teacher"] = {
            "module": f"{cls.__module__}.{cls.__qualname__}",
            "sha256": teacher_fingerprint(args["teacher"]),
        }
    if not isinstance(args["task"], str):
        if distributed.current() is not None:
            raise ValueError("a callable task needs a one-process run: give classification, causal_lm or features")
        named["task"] = {"callable": metric_name(args["task"])}
    return named


def _module_hash(config: dict[str, Any]) -> str | None:
    """A module teacher's weights hash, which its config holds already (:func:`_named`): not computed twice."""
    return config["teacher"].get("sha256") if isinstance(config["teacher"], dict) else None


def _teacher(teacher: str | nn.Module, weights: Path | None) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        return load_teacher(teacher, weights)
    if weights is not None:
        raise ValueError("teacher_weights is for a teacher by name: load the weights into the module you give")
    return teacher


def _prepare(
    run: Run,
    model: nn.Module,
    student: nn.Module,
    report: CompressionReport,
    data: LightningDataModule,
    init: InitSettings,
    config: dict[str, Any],
    log: LogSettings,
) -> None:
    """Write the report, set up the data, fit the start when asked, and open the loggers."""
    # A finished run wrote its report already: it rewrites nothing (it can report from a read-only directory).
    if not (run.state.get("done") and (run.dir / "report.csv").exists()):
        _write_report(run, model, report)
    data.prepare_data()
    data.setup("fit")
    initialise(model, student, data, init, run)
    run.loggers = Loggers(log, run.dir, run.state, config, save=run.save)


def _write_report(run: Run, model: nn.Module, report: CompressionReport) -> None:
    """The compression report (CSV, JSON, the format choices), the teacher's architecture, and the counts in state."""
    report.to_csv(run.dir / "report.csv")
    report.to_json(run.dir / "report.json")
    save_architecture(model, run.dir)  # the student then loads without the teacher (tnlit.load_student)
    if report.choices:
        report.choices_to_csv(run.dir / "choices.csv")
    run.state["compression"] = {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "compression_rate": report.compression_rate,
    }


def _recover(
    run: Run,
    model: nn.Module,
    student: nn.Module,
    data: LightningDataModule,
    task: TaskLike,
    method: Method,
    slices: list[Slice],
    slicewise: SliceSettings,
    finetune: FinetuneSettings,
) -> None:
    """Measure the teacher and the untrained student, then run the method's phases, each measured after it."""

    def measure(net: nn.Module) -> dict[str, float]:
        return evaluate_task(net, data, task, run.device, teacher=model)

    run.once("teacher_metric", lambda: measure(model))
    run.once("init_metric", lambda: measure(student))
    if method in ("slicewise", "hybrid"):
        ranks = distributed.current()
        if ranks is None:
            train_slices(model, student, data, slices, slicewise, run)
        else:
            train_share(ranks, model, student, data, slices, slicewise, run)
        run.once(("metrics", "slicewise"), lambda: _last_point(run, "slicewise", slicewise.epochs) or measure(student))
    if method in ("global", "hybrid"):
        ranks = distributed.current()
        if ranks is not None:  # every rank of the job takes part: Lightning's DDP
            run.trainer = {**run.trainer, **ranks.ddp(run.accelerator)}
        global_phase(model, student, data, task, finetune, run)
        run.once(("metrics", "global"), lambda: _last_point(run, "global", finetune.epochs) or measure(student))


def _last_point(run: Run, phase: str, epochs: int) -> dict[str, float] | None:
    """The metrics ``eval_each_epoch`` recorded after the phase's last epoch (the student as the phase left it), so
    that the phase's result is not measured twice; None when there is no such point."""
    points = [p for p in run.state.get("curve", []) if p["phase"] == phase and p["epoch"] == epochs]
    skip = ("phase", "epoch", "optimisation_s")
    return {k: v for k, v in points[-1].items() if k not in skip} if points and run.evaluate else None


def _finish(run: Run, student: nn.Module, method: Method) -> dict[str, Any]:
    """Write the student (``save_model``: one copy of tied weights, an LM's embedding and head) and mark it done.

    A finished run whose (verified) student and state are what this call would write again writes nothing: it can
    be reported from a read-only file system."""
    path = run.dir / "student.safetensors"
    unchanged = bool(run.state.get("done")) and usable(path) and _holds(path, student)
    if not unchanged:
        with written_verified(path) as tmp:
            save_model(student, str(tmp))
    run.state["done"] = True
    run.state["final_metric"] = run.state["metrics"][method if method != "hybrid" else "global"]
    if not (unchanged and read_state(run.dir / "state.json") == run.state):
        run.save()
    run.loggers.close()
    # The student for the caller: in memory, and where its file is (neither kept in state.json, which a moved run
    # directory would contradict).
    return {**run.state, "student": student, "student_path": str(path)}


def _holds(path: Path, student: nn.Module) -> bool:
    """Whether the safetensors file holds exactly the student's tensors."""
    saved, mine = load_file(path), student.state_dict()
    return all(k in mine and torch.equal(v, mine[k].detach().cpu()) for k, v in saved.items())
