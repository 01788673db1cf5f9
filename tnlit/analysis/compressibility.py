"""The compressibility map: what each layer loses at each CR without training (PAPER.md section 2: choosing ranks
is a main barrier of tensorization). The error curves are :mod:`tnlit.tensorize.budget`'s, the ranks for a CR the
closed forms of :mod:`tnlit.formats.ranks`."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tnlit.atomic import atomic_path, atomic_png
from tnlit.formats.ranks import RankError, check_cr
from tnlit.layers.base import is_hf_conv1d
from tnlit.tensorize.budget import LayerCurve, layer_curves
from tnlit.tensorize.plan import Rule, TensorizePlan

__all__ = ["DEFAULT_CRS", "CompressibilityMap", "MapCell", "compressibility_map", "every_layer_plan"]

DEFAULT_CRS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def every_layer_plan(
    model: nn.Module, linear: str = "mpo", conv: str | None = "tucker", sites: int = 2
) -> TensorizePlan:
    """A plan that takes every ``nn.Linear`` / Hugging Face ``Conv1D`` (format ``linear``) and every ungrouped
    ``nn.Conv2d`` (format ``conv``; None leaves them out), exactly (no CR): the input of a compressibility map."""
    lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_hf_conv1d(m)]
    cnv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1] if conv else []
    rules = [
        Rule("|".join(map(re.escape, names)), fmt, sites=sites) for names, fmt in ((lin, linear), (cnv, conv)) if names
    ]
    if not rules:
        raise ValueError("the model has no nn.Linear, Conv1D or nn.Conv2d to tensorize")
    return TensorizePlan(rules=rules)


@dataclass
class MapCell:
    """One layer at one asked CR."""

    layer: str
    format: str
    cr: float
    ranks: list[int] | None
    """None where the CR is out of reach for this layer."""
    factor_params: int | None
    achieved_cr: float | None
    rel_error: float | None


@dataclass
class CompressibilityMap:
    """Every selected layer's error at every asked CR (the CR rule's ranks, no training)."""

    crs: list[float]
    layers: list[str]
    cells: list[MapCell]

    def matrix(self) -> torch.Tensor:
        """``(layers, crs)`` relative errors, NaN where out of reach."""
        grid = torch.full((len(self.layers), len(self.crs)), float("nan"), dtype=torch.float64)
        for c in self.cells:
            if c.rel_error is not None:
                grid[self.layers.index(c.layer), self.crs.index(c.cr)] = c.rel_error
        return grid

    def to_csv(self, path: str | Path) -> None:
        """One row per layer and CR: layer, format, cr, ranks, factor_params, achieved_cr, rel_error."""
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "format", "cr", "ranks", "factor_params", "achieved_cr", "rel_error"])
            for c in self.cells:
                writer.writerow(
                    [
                        c.layer,
                        c.format,
                        c.cr,
                        "" if c.ranks is None else " ".join(map(str, c.ranks)),
                        "" if c.factor_params is None else c.factor_params,
                        "" if c.achieved_cr is None else f"{c.achieved_cr:.4f}",
                        "" if c.rel_error is None else f"{c.rel_error:.6g}",
                    ]
                )

    def heatmap(self, path: str | Path, title: str = "") -> None:
        """Layers (rows) by CR (columns), coloured by relative error; grey where out of reach."""
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        grid = self.matrix().numpy()
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(self.crs), 1.5 + 0.28 * len(self.layers)))
        cmap = plt.get_cmap("magma_r").with_extremes(bad="0.8")
        image = ax.imshow(
            grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=max(1e-12, float(torch.nan_to_num(self.matrix()).max()))
        )
        ax.set_xticks(range(len(self.crs)), [f"{c:g}" for c in self.crs])
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax.set_xlabel("CR (fraction of the layer's parameters removed)")
        if len(self.layers) * len(self.crs) <= 400:
            for (i, j), value in _cells(grid):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value > 0.5 * image.norm.vmax else "black",
                )
        fig.colorbar(image, ax=ax, label="relative error ||W - W_hat|| / ||W||")
        ax.set_title(title or "compressibility map (no training)")
        atomic_png(fig, path)


def _cells(grid) -> list[tuple[tuple[int, int], float]]:
    return [((i, j), float(v)) for i, row in enumerate(grid) for j, v in enumerate(row) if v == v]  # v == v: not NaN


def compressibility_map(
    model: nn.Module,
    plan: TensorizePlan,
    crs: tuple[float, ...] | list[float] = DEFAULT_CRS,
    curves: list[LayerCurve] | None = None,
) -> CompressibilityMap:
    """The error of every layer the plan selects at every CR in ``crs``, without training.

    Args:
        model: The dense model (real weights).
        plan: Which layers, in which format (and sites); its CRs are ignored. :func:`every_layer_plan` takes all.
        crs: The per-layer CRs to evaluate.
        curves: The layers' curves when already computed (:func:`layer_curves`).
    """
    crs = [check_cr(c) for c in crs]
    curves = curves if curves is not None else layer_curves(model, plan)
    cells = []
    for curve in curves:
        for cr in crs:
            try:
                ranks = curve.ranks_for_cr(cr)
            except RankError:
                cells.append(MapCell(curve.name, curve.format, cr, None, None, None, None))
                continue
            opt = curve.option(ranks)
            cells.append(
                MapCell(
                    curve.name,
                    curve.format,
                    cr,
                    list(opt.ranks),
                    opt.params,
                    1 - opt.params / curve.weight_params,
                    opt.error,
                )
            )
    return CompressibilityMap(crs, [c.name for c in curves], cells)
