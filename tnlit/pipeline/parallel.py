"""A torchrun / srun job's share of ``compress``: each rank trains its own slices (:mod:`tnlit.distributed` splits
them and watches for failures), then every rank takes part in the global phase's DDP; rank 0 writes the run."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lightning.pytorch import LightningDataModule
from torch import nn

from tnlit import distributed
from tnlit.methods.common import factor_parameters
from tnlit.pipeline.callbacks import Loggers
from tnlit.pipeline.phases import global_phase, train_slices
from tnlit.pipeline.run_dir import Run, RunDirError, load_factors
from tnlit.pipeline.settings import FinetuneSettings, LogSettings, SliceSettings
from tnlit.slices import Slice, SliceModule

__all__ = ["rank_worker", "train_share"]


def train_share(
    ranks: distributed.Ranks,
    model: nn.Module,
    student: nn.Module,
    data: LightningDataModule,
    slices: list[Slice],
    settings: SliceSettings,
    run: Run,
) -> None:
    """One rank's share of the slices, then the wait for every rank. Rank 0 then loads every slice and records each
    rank's share and times in the run's state: ``times`` gets every rank's phases, ``distributed`` the shares and the
    job's slice-wise time (its slowest rank's)."""
    if settings.cache_dir is not None:  # a shared store directory: one store per share
        settings = replace(settings, cache_dir=settings.cache_dir / f"rank{ranks.rank}-of-{ranks.world_size}")
    trainer = {**run.trainer, "devices": ranks.devices(run.accelerator), "callbacks": [distributed.PeerWatch(ranks)]}

    def train(share: list[int]) -> dict[str, Any]:
        mine = run.for_rank(run.root / "ranks" / f"rank{ranks.rank}", trainer=trainer)
        phase = f"slicewise:rank{ranks.rank}-of-{ranks.world_size}"
        train_slices(model, student, data, [slices[i] for i in share], settings, mine, phase)
        return {"times": mine.state.get("times", {})}

    sizes = [sum(p.numel() for p in factor_parameters([SliceModule(student, s)])) for s in slices]
    reports = distributed.train_share(ranks, [s.name for s in slices], sizes, train)
    # Every rank: the hybrid's global phase starts from the whole slice-wise student on each.
    if not run.load_slices(student, slices):
        raise RunDirError(f"every rank finished, yet {run.root / 'slices'} lacks slices of this student")
    if ranks.main:
        _record_shares(run, ranks, reports)


def _record_shares(run: Run, ranks: distributed.Ranks, reports: list[dict[str, Any]]) -> None:
    times = run.state.setdefault("times", {})
    for report in reports:
        # Phases are named per slice or per rank; the store's build ("cache") is each rank's own.
        times.update({k if k != "cache" else f"cache:rank{report['rank']}": v for k, v in report["times"].items()})
        report["optimisation_s"] = sum(t.get("optimisation_s", 0.0) for t in report["times"].values())
        report["wall_s"] = sum(t.get("wall_s", 0.0) for t in report["times"].values())
        del report["times"]
    run.state["distributed"] = {
        "world_size": ranks.world_size,
        "ranks": reports,
        "optimisation_s": max(r["optimisation_s"] for r in reports),
        "wall_s": max(r["wall_s"] for r in reports),
    }
    run.save()


def rank_worker(
    ranks: distributed.Ranks,
    model: nn.Module,
    student: nn.Module,
    data: LightningDataModule,
    slices: list[Slice],
    run: Run,
    config: dict[str, Any],
    slicewise: SliceSettings,
    finetune: FinetuneSettings,
) -> dict[str, Any]:
    """A rank above 0: once rank 0 has claimed the run directory and prepared the data, train this rank's share of
    the slices (CSV logs only, no progress bars) and wait for the others, then take part in the global phase's DDP;
    rank 0 evaluates and writes everything else."""
    ranks.wait_for(["run_dir"])
    if config["init"]["method"] != "svd":  # rank 0 fitted the factors before it announced the run directory
        load_factors(student, run.root / "init.safetensors")
    data.prepare_data()  # after rank 0's: a cache rank 0 built is found, not built again
    data.setup("fit")
    run = replace(run, progress=False, loggers=Loggers(LogSettings(), run.root, {}, config), evaluate=None)
    if slices:
        train_share(ranks, model, student, data, slices, slicewise, run)
    if config["method"] in ("global", "hybrid"):
        # Its times go to its own directory; rank 0 writes the run's state and result.
        ddp = replace(
            run,
            trainer={**run.trainer, **ranks.ddp(run.accelerator)},
            writer=False,
            state_dir=run.root / "ranks" / f"rank{ranks.rank}",
        )
        global_phase(model, student, data, config["task"], finetune, ddp)
    return {"rank": ranks.rank, "world_size": ranks.world_size}
