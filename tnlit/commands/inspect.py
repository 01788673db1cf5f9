"""``tnlit inspect``: bond spectra, entropies, the compressibility map, a budgeted plan and bond activations of a
compressed model, written under ``results/`` with a provenance sidecar.

The model comes from a ``tnlit compress`` run directory (the teacher rebuilt from ``config.json``, tensorized by
its plan, then loaded with the trained ``student.safetensors``) or from a model name and a plan (the factors
straight from the decompositions, as ``tnlit report`` makes them).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from tnlit.analysis.bond_activations import bond_activations, find_layer, top_activating
from tnlit.analysis.bonds import (
    bond_dims,
    format_bond_table,
    model_bond_stats,
    plot_spectra,
    write_bonds_csv,
    write_spectra_csv,
)
from tnlit.analysis.compressibility import DEFAULT_CRS, compressibility_map
from tnlit.atomic import atomic_csv
from tnlit.checksums import verified_problem
from tnlit.export import load_student
from tnlit.formats.ranks import check_cr
from tnlit.models import load_model, load_teacher
from tnlit.pipeline.run_dir import RunDirError, datamodule_from_config, read_run_config
from tnlit.provenance import write_provenance
from tnlit.tensorize import TensorizePlan, budget_plan, layer_curves, tensorize
from tnlit.types import Decode

__all__ = ["inspect", "load_run"]


def load_run(run_dir: Path) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """``(teacher, student, config)`` of a finished ``tnlit compress`` run directory.

    The student comes from the run directory alone (:func:`tnlit.export.load_student`: the architecture, the report's
    factor shapes, ``student.safetensors``); the teacher, by name and weights, is for the compressibility maps.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: give the run_dir of a tnlit compress run")
    config_file, student_file = run_dir / "config.json", run_dir / "student.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a tnlit compress run directory (no config.json): give the run_dir of a compress run"
        )
    if not student_file.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no student.safetensors: its run has not finished; rerun the same tnlit compress command "
            "to finish it (it resumes), then inspect it"
        )
    config = read_run_config(run_dir)
    if (problem := verified_problem(student_file)) is not None:
        raise RunDirError(f"{student_file} is {problem}: rerun the run's tnlit compress command to write it again")
    # Seeded as compress seeds it, so that a teacher without weights file is the run's own initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.get("seed", 0))
        teacher = load_teacher(config["teacher"], config.get("teacher_weights")).eval()
    return teacher, load_student(run_dir), config


def _decoder(decode: str, data: LightningDataModule) -> Any:
    if decode == "bytes":
        from tnlit.data.offline import decode_bytes

        return decode_bytes
    if decode == "auto":
        return getattr(data, "decode", None)
    return None


def inspect(
    run_dir: Path | None = None,
    model: str | None = None,
    plan: TensorizePlan | None = None,
    pretrained: bool = False,
    name: str | None = None,
    out_dir: Path = Path("results"),
    layers: str | None = None,
    compressibility: bool = False,
    crs: list[float] = list(DEFAULT_CRS),  # noqa: B006 - never mutated
    budget_cr: float | None = None,
    budget_max_error: float | None = None,
    layer: str | None = None,
    bond: int = 0,
    direction: int = 0,
    top_k: int = 10,
    batches: int = 1,
    data: LightningDataModule | None = None,
    decode: Decode = "auto",
    trust_run_dir: bool = False,
) -> dict[str, Any]:
    """Inspect the bonds of a compressed model: spectra, entropies, compressibility map, budgeted plan, activations.

    Writes under out_dir: <name>_bonds.csv (per bond: dim, entropy, ln dim, effective rank at 99% energy, truncation
    error at half and a quarter of the bond, leading weight), <name>_spectra.csv (every singular value),
    <name>_spectra.png, optionally <name>_compressibility.csv/.png, <name>_budget_plan.yaml and <name>_top_*.csv, and
    <name>_inspect.provenance.json; prints the bond table.

    Args:
        run_dir: A tnlit compress run directory (finished: it holds student.safetensors). Give this or model.
        model: Instead of a run: a model name (as tnlit report takes), tensorized by plan without training.
        plan: The tensorization plan, with model (a run directory uses its own).
        pretrained: Load pretrained weights for a torchvision model name.
        name: The results' file name prefix; default: the run directory's name, or the model name.
        out_dir: Where the results go.
        layers: A regex (full match) over the tensorized layers' names to inspect; default: all of them.
        compressibility: Also write the compressibility map of the dense model's planned layers: the relative error
            of each at each CR in crs, without training (CSV and heatmap).
        crs: The per-layer CRs of the compressibility map.
        budget_cr: Also allocate ranks across the plan's layers for this whole-model CR (fraction of all the model's
            parameters removed) at least total error, write the plan as YAML and compare it with the uniform plan.
        budget_max_error: The most relative error any one layer of the budgeted plan may have; default: the worst
            layer error of the uniform plan at the same budget (1.0 lifts the cap).
        layer: Also report the inputs that excite one bond direction most: the tensorized layer's name.
        bond: The bond of that layer (MPO: 0 joins cores 0 and 1; Tucker-2: 0 is the output rank space, 1 the input
            one), read in its singular (Schmidt) basis.
        direction: The bond direction (0: the one with the largest singular value).
        top_k: How many inputs to report.
        batches: How many test batches to run through the model for the activations.
        data: The DataModule whose test batches feed the activations; default: the run's own (from config.json).
        decode: How to show text tokens: auto (the DataModule's decode method if it has one, else ids), ids, or
            bytes (byte-level models such as tiny-gpt2-bytes).
        trust_run_dir: Let the run directory's config.json name a DataModule class outside tnlit (imported and
            called with its init_args). Off: only tnlit's own (or registered) classes are built from a run directory,
            which may come from anyone; give data to use another.
    """
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k not in ("data", "plan")}
    _check_options(run_dir, model, plan, crs, budget_cr, top_k, batches)
    teacher, student, plan, config, name = _open(run_dir, model, plan, pretrained, name)
    if layer is not None:  # check the choice before any work is done or any file written
        _check_bond(student, layer, bond, direction, has_data=data is not None or "data" in config)
    out_dir = Path(out_dir)
    result: dict[str, Any] = {}
    files = _bonds(student, layers, out_dir, name, result)
    if compressibility or budget_cr is not None:
        files += _maps(
            teacher, plan, out_dir, name, crs if compressibility else None, budget_cr, budget_max_error, result
        )
    if layer is not None:
        data = data if data is not None else datamodule_from_config(config["data"], trust=trust_run_dir)
        files.append(_top(student, data, (layer, bond, direction), top_k, batches, decode, out_dir / name, result))
    prov = out_dir / f"{name}_inspect.provenance.json"
    write_provenance(
        prov, {"options": options, "plan": asdict(plan), "run_config": config, "files": [str(f) for f in files]}
    )
    files.append(prov)
    print("\nwrote " + ", ".join(str(f) for f in files))
    result["files"] = [str(f) for f in files]
    return result


def _check_options(
    run_dir: Path | None,
    model: str | None,
    plan: TensorizePlan | None,
    crs: list[float],
    budget_cr: float | None,
    top_k: int,
    batches: int,
) -> None:
    if (run_dir is None) == (model is None):
        raise ValueError("give either run_dir (a tnlit compress run) or model and plan, not both or neither")
    if model is not None and plan is None:
        raise ValueError(f"model {model!r} needs a plan (--plan.rules ...): which layers to tensorize, and how")
    if run_dir is not None and plan is not None:
        raise ValueError("a run directory brings its own plan (config.json): drop --plan, or use --model with it")
    for cr in [*crs, *([budget_cr] if budget_cr is not None else [])]:
        check_cr(cr)
    if top_k < 1 or batches < 1:
        raise ValueError(f"top_k and batches must be at least 1, got {top_k} and {batches}")


def _open(
    run_dir: Path | None, model: str | None, plan: TensorizePlan | None, pretrained: bool, name: str | None
) -> tuple[nn.Module, nn.Module, TensorizePlan, dict[str, Any], str]:
    """``(teacher, student, plan, run config, name)`` of a run directory, or of a model tensorized by a plan."""
    if run_dir is not None:
        teacher, student, config = load_run(Path(run_dir))
        return teacher, student, TensorizePlan(**config["plan"]), config, name or Path(run_dir).resolve().name
    teacher = load_model(model, pretrained=pretrained).eval()
    student, _ = tensorize(teacher, plan)
    return teacher, student.eval(), plan, {}, name or _safe(Path(model).name)


def _check_bond(student: nn.Module, layer: str, bond: int, direction: int, *, has_data: bool) -> None:
    dim = bond_dims(find_layer(student, layer, bond))[bond]
    if not 0 <= direction < dim:
        raise ValueError(f"direction {direction} is out of range for bond {bond} of {layer!r} (dimension {dim})")
    if not has_data:
        raise ValueError("bond activations need input data: give --data (a DataModule), or inspect a run directory")


def _bonds(student: nn.Module, layers: str | None, out_dir: Path, name: str, result: dict[str, Any]) -> list[Path]:
    """The bond table (printed), its CSVs and the spectra plot."""
    stats = model_bond_stats(student, layers)
    files = [out_dir / f"{name}_bonds.csv", out_dir / f"{name}_spectra.csv", out_dir / f"{name}_spectra.png"]
    write_bonds_csv(stats, files[0])
    write_spectra_csv(stats, files[1])
    plot_spectra(stats, files[2], title=name)
    print(format_bond_table(stats))
    result["bonds"] = [s.row() for s in stats]
    return files


def _maps(
    teacher: nn.Module,
    plan: TensorizePlan,
    out_dir: Path,
    name: str,
    crs: list[float] | None,
    budget_cr: float | None,
    budget_max_error: float | None,
    result: dict[str, Any],
) -> list[Path]:
    """The compressibility map (when ``crs``) and the budgeted plan (when ``budget_cr``), from one set of curves."""
    files = []
    curves = layer_curves(teacher, plan)
    if crs is not None:
        cmap = compressibility_map(teacher, plan, crs, curves=curves)
        files += [out_dir / f"{name}_compressibility.csv", out_dir / f"{name}_compressibility.png"]
        cmap.to_csv(files[-2])
        cmap.heatmap(files[-1], title=f"{name}: compressibility (no training)")
    if budget_cr is not None:
        budget = budget_plan(teacher, plan, cr=budget_cr, max_error=budget_max_error, curves=curves)
        files.append(out_dir / f"{name}_budget_plan.yaml")
        budget.to_yaml(files[-1])
        print(budget)
        result["budget"] = {
            "budget": budget.budget,
            "params_after": budget.params_after,
            "total_error": budget.total_error,
            "max_error": budget.max_error,
            "uniform_cr": budget.uniform_cr,
            "uniform_params_after": budget.uniform_params_after,
            "uniform_error": budget.uniform_error,
            "layers": budget.layers,
        }
    return files


def _top(
    student: nn.Module,
    data: LightningDataModule,
    where: tuple[str, int, int],
    top_k: int,
    batches: int,
    decode: Decode,
    prefix: Path,
    result: dict[str, Any],
) -> Path:
    """The inputs that excite one bond direction most, as CSV (``prefix_top_<layer>_b<bond>_d<direction>.csv``)."""
    layer, bond, direction = where
    rows = _top_inputs(student, data, layer, bond, direction, top_k, batches, _decoder(decode, data))
    path = prefix.with_name(f"{prefix.name}_top_{_safe(layer)}_b{bond}_d{direction}.csv")
    atomic_csv(path, rows, ["rank", "index", "score", "input"])
    print(f"\ntop {len(rows)} inputs of {layer} bond {bond} direction {direction}:")
    for row in rows:
        print(f"  {row['score']:.4g}  {row['input']}")
    result["top"] = rows
    return path


def _safe(text: str) -> str:
    """``text`` as a file name part: runs of anything but letters, digits, ``.``, ``-`` and ``_`` become ``_``."""
    return re.sub(r"[^\w.-]+", "_", text)


@torch.no_grad()
def _top_inputs(
    student: nn.Module,
    data: LightningDataModule,
    layer: str,
    bond: int,
    direction: int,
    top_k: int,
    batches: int,
    decode: Any,
) -> list[dict[str, object]]:
    """Run ``batches`` test batches through the student and rank the inputs by their score on the bond direction."""
    from tnlit.activations.capture import batch_input

    data.prepare_data()
    data.setup("test")
    seen, labels = [], []
    with bond_activations(student, layer, bond) as capture:
        for i, batch in enumerate(data.test_dataloader()):
            if i == batches:
                break
            x = batch_input(batch)
            seen.append(x)
            if isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]) and batch[1].ndim == 1:
                labels.append(batch[1])  # (image, label) batches: show each image's label
            student(x)
    tokens = torch.cat(seen) if seen and not seen[0].is_floating_point() else None
    known = torch.cat(labels) if labels and len(labels) == len(seen) else None
    return top_activating(capture, direction, top_k, tokens=tokens, decode=decode, labels=known)
