"""What a tensorization cost and saved: a row per layer, the whole model's counts, and the ``format: auto``
comparison; as text, CSV and JSON."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tnlit.atomic import atomic_path, atomic_text

__all__ = ["ChoiceRow", "CompressionReport", "LayerReport", "write_rows"]


@dataclass
class LayerReport:
    """One tensorized layer: what it was, what it became, what that cost."""

    name: str
    format: str
    module_type: str
    shape: list[int]
    """The dense weight's shape in the module's own layout."""
    site_dims: str
    """``mpo``: ``in_dims x out_dims``; empty for the other formats."""
    ranks: list[int]
    """``mpo``: inner bond dims; ``tucker``: ``[r_out, r_in]``; ``lowrank``: ``[rank]``."""
    weight_params: int
    factor_params: int
    cr: float
    """The layer's compression rate, ``1 - factor_params / weight_params`` (biases stay dense, uncounted)."""
    rel_error: float | None
    """``||W - W_hat||_F / ||W||_F``; ``None`` for an estimate made without decomposing."""
    flops_ratio: float | None = None
    """The factor-by-factor forward's FLOPs over the dense layer's at one input row (generation at batch 1; the
    rule's ``flops_tokens`` for an auto rule): above 1, the layer is cheaper run from its cached dense weight."""


_COLUMNS = [f.name for f in LayerReport.__dataclass_fields__.values()]


@dataclass
class ChoiceRow:
    """One candidate that ``format: auto`` weighed for one layer."""

    layer: str
    candidate: str
    """A short name, e.g. ``lowrank r19`` or ``mpo 8x8 -> 8x12 bond 20``."""
    format: str
    sites: int
    """MPO cores; 0 for low rank."""
    site_dims: str
    ranks: list[int]
    params: int
    cr: float
    rel_error: float
    """Relative weight error, or output error where the layer's input covariance was given (see ``metric``)."""
    metric: str
    """``weight`` (``||W - W_hat|| / ||W||``) or ``output`` (``sqrt(tr(D^T C D) / tr(W^T C W))``)."""
    chosen: bool
    flops_ratio: float = float("nan")
    """Factor-by-factor FLOPs over the dense layer's at the rule's ``flops_tokens`` input rows."""


_CHOICE_COLUMNS = [f.name for f in ChoiceRow.__dataclass_fields__.values()]


@dataclass
class CompressionReport:
    """Per-layer rows and the whole model's parameter counts, counted from the modules."""

    layers: list[LayerReport]
    params_before: int
    params_after: int
    budget: float | None = None
    """The plan's whole-model budget (CR) when it had one; ``compression_rate`` is at least this."""
    choices: list[ChoiceRow] = field(default_factory=list)
    """Every candidate ``format: auto`` weighed, layer by layer (empty without auto rules, and in an estimate)."""

    @property
    def compression_rate(self) -> float:
        """Whole-model CR: removed / original parameters."""
        return (self.params_before - self.params_after) / self.params_before

    def to_dict(self) -> dict:
        out = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression_rate": self.compression_rate,
            "layers": [asdict(r) for r in self.layers],
        }
        if self.budget is not None:
            out["budget"] = self.budget
        if self.choices:
            out["choices"] = [asdict(c) for c in self.choices]
        return out

    def to_json(self, path: str | Path) -> None:
        atomic_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_csv(self, path: str | Path) -> None:
        write_rows(path, _COLUMNS, self.layers)

    def choices_to_csv(self, path: str | Path) -> None:
        """The ``format: auto`` comparison, one row per layer and candidate (header only when nothing was chosen)."""
        write_rows(path, _CHOICE_COLUMNS, self.choices)

    def __str__(self) -> str:
        head = [
            "layer",
            "format",
            "shape",
            "site dims",
            "ranks",
            "params",
            "factors",
            "CR",
            "rel. error",
            "FLOPs/dense",
        ]
        body = [
            [
                r.name,
                r.format,
                "x".join(map(str, r.shape)),
                r.site_dims,
                ",".join(map(str, r.ranks)),
                f"{r.weight_params:,}",
                f"{r.factor_params:,}",
                f"{r.cr:.4f}",
                "-" if r.rel_error is None else f"{r.rel_error:.4f}",
                "-" if r.flops_ratio is None else f"{r.flops_ratio:.3g}",
            ]
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        budget = "" if self.budget is None else f" (budget {self.budget:.4f})"
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters, {len(self.layers)} layers tensorized, "
            f"whole-model CR {self.compression_rate:.4f}{budget}"
        )
        if self.choices:
            chosen = Counter(f"mpo {c.sites} sites" if c.sites else c.format for c in self.choices if c.chosen)
            lines.append(
                f"format auto: {sum(chosen.values())} layers weighed {len(self.choices)} candidates in all and chose "
                + ", ".join(f"{kind} x{n}" for kind, n in sorted(chosen.items()))
            )
        return "\n".join(lines)


def write_rows(path: str | Path, columns: list[str], rows: list) -> None:
    """Dataclass rows as CSV, written atomically; lists become space-separated cells, non-finite floats empty."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in asdict(row).items()})


def _cell(v: object) -> object:
    if isinstance(v, list):
        return " ".join(map(str, v))
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    return v
