"""Per-layer sensitivity: tensorize one layer at a time (no training) and measure the top-1 it costs.

The paper keeps 4 "sensitive" 3x3 convolutions of ResNet-34 dense, picked by such a sweep (which 4: UNKNOWN). The
compressibility map (:mod:`tnlit.analysis.compressibility`) ranks layers by their *weight* error; a layer's weight error
says little about what the network loses (an early conv with a small error can cost more top-1 than a late one with
a large error), so this sweep measures the task metric itself: each selected layer alone is replaced by its
factors at the target CR, the rest stays dense, and the top-1 on a held-out subset is compared with the dense
model's. The k layers that cost most are the plan's ``exclude``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlit.atomic import atomic_csv, atomic_png, atomic_text
from tnlit.evaluate import accuracy
from tnlit.tensorize import Rule, TensorizePlan, resolve, tensorize

__all__ = ["LayerSensitivity", "sensitivity_plan", "sensitivity_sweep", "write_sensitivity"]


@dataclass
class LayerSensitivity:
    """One layer tensorized alone: what it kept, its weight error, and the top-1 the model lost for it."""

    name: str
    shape: list[int]
    ranks: list[int]
    cr: float
    rel_error: float
    top1: float
    drop: float
    """Dense top-1 minus this model's top-1, in percentage points (larger: more sensitive)."""


def sensitivity_sweep(
    model: nn.Module, loader: Iterable[Any], rule: Rule, device: str | torch.device = "cpu", verbose: bool = False
) -> tuple[float, list[LayerSensitivity]]:
    """The dense model's top-1 on ``loader`` and, for every module the rule selects, the top-1 with that module alone
    tensorized by the rule (in network order). The model is left untouched."""
    model = model.to(device).eval()
    dense = accuracy(model, loader, device=device)
    names = [t.name for t in resolve(model, TensorizePlan(rules=[rule]))]
    rows = []
    for i, name in enumerate(names, 1):
        one = dataclasses.replace(rule, pattern=re.escape(name))
        with torch.no_grad():
            student, report = tensorize(model, TensorizePlan(rules=[one]))
        top1 = accuracy(student.to(device), loader, device=device)
        layer = report.layers[0]
        rows.append(
            LayerSensitivity(
                name,
                list(layer.shape),
                list(layer.ranks),
                round(layer.cr, 4),
                round(float(layer.rel_error or 0.0), 4),
                round(top1, 3),
                round(dense - top1, 3),
            )
        )
        del student
        if verbose:
            print(f"[{i}/{len(names)}] {name}: top-1 {top1:.2f} (drop {dense - top1:+.2f})", flush=True)
    return dense, rows


def sensitivity_plan(rows: list[LayerSensitivity], rule: Rule, k: int = 4) -> TensorizePlan:
    """The rule's plan with the ``k`` layers of the largest top-1 drop kept dense (ties: the earlier layer)."""
    if not 0 <= k <= len(rows):
        raise ValueError(f"k must be in 0..{len(rows)} (the layers swept), got {k}")
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].drop, i))
    keep = sorted(order[:k])  # in network order, so the plan reads like the model
    return TensorizePlan(rules=[rule], exclude=[re.escape(rows[i].name) for i in keep])


def write_sensitivity(
    rows: list[LayerSensitivity], dense: float, plan: TensorizePlan, out: Path, title: str = ""
) -> dict[str, Path]:
    """Write ``<out>.csv`` (one row per layer), ``<out>.png`` (the drop per layer, the excluded ones marked) and
    ``<out>_plan.yaml`` (the plan, ready to paste into a compress config). Returns the paths."""
    import yaml

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out.with_suffix(".csv"), "png": out.with_suffix(".png"), "plan": Path(f"{out}_plan.yaml")}
    excluded = {re.sub(r"\\(.)", r"\1", p) for p in plan.exclude}
    table = []
    for r in rows:
        row = dataclasses.asdict(r) | {"dense_top1": round(dense, 3), "excluded": r.name in excluded}
        row["shape"], row["ranks"] = "x".join(map(str, r.shape)), "x".join(map(str, r.ranks))
        table.append(row)
    fields = ["name", "shape", "ranks", "cr", "rel_error", "dense_top1", "top1", "drop", "excluded"]
    atomic_csv(paths["csv"], table, fields)
    # Only what was set: a compress config rejects none of it, reads it plainly.
    plan_data = {"plan": {"rules": [r.as_config() for r in plan.rules], "exclude": list(plan.exclude)}}
    header = (
        f"# {title}\n"
        f"# The {len(plan.exclude)} layers of the largest top-1 drop kept dense (tnlit.analysis.sensitivity).\n"
    )
    atomic_text(paths["plan"], header + yaml.safe_dump(plan_data, sort_keys=False))
    _plot(rows, dense, excluded, paths["png"], title)
    return paths


def _plot(rows: list[LayerSensitivity], dense: float, excluded: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows)), 4.5))
    colours = ["tab:red" if r.name in excluded else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r.drop for r in rows], color=colours)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel(f"top-1 drop (points; dense {dense:.2f} %)")
    ax.set_title(f"{title}\nred: kept dense" if title else "red: kept dense", fontsize=9)
    twin = ax.twinx()
    twin.plot(range(len(rows)), [r.rel_error for r in rows], "k.", ms=4)
    twin.set_ylabel("relative weight error (dots)")
    ax.grid(alpha=0.3, axis="y")
    atomic_png(fig, path)
