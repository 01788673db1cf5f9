"""Bond spectra and entropies of tensorized layers, in canonical form (the interpretability features).

The bonds of a layer: an :class:`MPOLinear` has one per pair of neighbouring cores (bond ``k`` joins core ``k``
and core ``k+1``); a :class:`TuckerConv2d` has its two channel rank spaces, bond 0 the output one (``r_out``,
``u_out``'s columns) and bond 1 the input one (``r_in``), in the order of ``layer.ranks``; a
:class:`LowRankLinear` has its one rank space. A bond's basis is arbitrary until a canonical form fixes it
(:mod:`tnlit.formats.canonical`), so everything here is computed in canonical form, in float64, and does not
depend on how the factors were trained or initialised.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tnlit.atomic import atomic_path, atomic_png
from tnlit.formats.canonical import (
    lowrank_canonical,
    mpo_left_canonical,
    mpo_mixed_canonical,
    mpo_right_canonical,
    mpo_schmidt,
    tucker2_orthonormal,
    tucker2_schmidt,
)
from tnlit.formats.spectra import effective_rank, energy_weights, spectrum_entropy, truncation_errors
from tnlit.layers.base import TensorizedLayer
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear
from tnlit.types import Form

__all__ = [
    "BondStats",
    "Form",
    "bond_dims",
    "bond_labels",
    "bond_spectra",
    "bond_stats",
    "canonical_factors",
    "canonicalize_",
    "format_bond_table",
    "model_bond_stats",
    "plot_spectra",
    "tensorized_layers",
    "write_bonds_csv",
    "write_spectra_csv",
]

_FORMS = {
    MPOLinear: ("left", "right", "mixed", "schmidt"),
    TuckerConv2d: ("orthonormal", "schmidt"),
    LowRankLinear: ("left", "right", "schmidt"),
}


def _forms(layer: nn.Module) -> tuple[str, ...]:
    for cls, forms in _FORMS.items():
        if isinstance(layer, cls):
            return forms
    raise TypeError(f"expected MPOLinear, TuckerConv2d or LowRankLinear, got {type(layer).__name__}")


@torch.no_grad()
def canonical_factors(layer: TensorizedLayer, form: Form = "schmidt", center: int | None = None) -> list[torch.Tensor]:
    """The layer's factors (in ``layer.factors()`` order) in a canonical form, in float64; the layer is untouched.

    Args:
        layer: An MPOLinear, TuckerConv2d or LowRankLinear.
        form: MPOLinear: ``left``, ``right``, ``mixed`` (at ``center``) or ``schmidt`` (right-canonical, every bond
            in its singular basis); TuckerConv2d: ``orthonormal`` (QR of the factors) or ``schmidt`` (HOSVD form);
            LowRankLinear: ``left``, ``right`` or ``schmidt``.
        center: The center core of the mixed form (MPOLinear only).
    """
    forms = _forms(layer)
    if form not in forms:
        raise ValueError(f"{type(layer).__name__} has the canonical forms {', '.join(forms)}; got {form!r}")
    if center is not None and form != "mixed":
        raise ValueError(f"center is for the mixed form only, got form={form!r}")
    factors = [p.detach().double() for p in layer.factors()]
    if isinstance(layer, MPOLinear):
        if form == "left":
            return mpo_left_canonical(factors)
        if form == "right":
            return mpo_right_canonical(factors)
        if form == "mixed":
            if center is None:
                raise ValueError(f"the mixed form needs a center core: 0 to {len(factors) - 1}")
            return mpo_mixed_canonical(factors, center)
        return mpo_schmidt(factors)[0]
    if isinstance(layer, TuckerConv2d):
        u_out, core, u_in = factors
        core, u_out, u_in = (tucker2_orthonormal if form == "orthonormal" else tucker2_schmidt)(core, u_out, u_in)[:3]
        return [u_out, core, u_in]
    return list(lowrank_canonical(*factors, form=form)[:2])


@torch.no_grad()
def canonicalize_(layer: TensorizedLayer, form: Form = "schmidt", center: int | None = None) -> TensorizedLayer:
    """Bring a layer's factors into a canonical form in place (same shapes, same function); returns the layer.

    The factors are computed in float64 and copied into the parameters, so a float32 layer's output changes by
    round-off only. Forms as in :func:`canonical_factors`.
    """
    for param, value in zip(layer.factors(), canonical_factors(layer, form, center)):
        param.copy_(value.to(param.dtype))
    return layer


@torch.no_grad()
def bond_spectra(layer: TensorizedLayer) -> list[torch.Tensor]:
    """The singular values of each of the layer's bonds (see the module docstring for their order), descending.

    MPOLinear: one tensor per inner bond, left to right, of length its bond dimension, computed in Schmidt form:
    the singular values of the layer's matrix unfolded at that bond (sites ``1..k+1`` against the rest), which no
    insertion of ``G G^-1`` on a bond changes. TuckerConv2d: the singular values of the kernel unfolded on its output
    and on its input channel mode (after orthonormalising the factors). LowRankLinear: the product's singular values.
    Float64; a bond wider than its neighbours allow has trailing zeros.
    """
    factors = [p.detach().double() for p in layer.factors()]
    if isinstance(layer, MPOLinear):
        return mpo_schmidt(factors)[1]
    if isinstance(layer, TuckerConv2d):
        u_out, core, u_in = factors
        return list(tucker2_schmidt(core, u_out, u_in)[3])
    if isinstance(layer, LowRankLinear):
        return [lowrank_canonical(*factors)[2]]
    raise TypeError(f"expected MPOLinear, TuckerConv2d or LowRankLinear, got {type(layer).__name__}")


def bond_dims(layer: TensorizedLayer) -> list[int]:
    """The dimension of each bond, in :func:`bond_spectra`'s order."""
    if isinstance(layer, MPOLinear):
        return layer.bond_dims
    if isinstance(layer, TuckerConv2d):
        return list(layer.ranks)
    if isinstance(layer, LowRankLinear):
        return [layer.rank]
    raise TypeError(f"expected MPOLinear, TuckerConv2d or LowRankLinear, got {type(layer).__name__}")


def bond_labels(layer: TensorizedLayer) -> list[str]:
    """A short name per bond: ``"0"``, ``"1"``, ... for an MPO; ``"out"``, ``"in"`` for Tucker-2; ``"rank"``."""
    if isinstance(layer, MPOLinear):
        return [str(k) for k in range(len(layer.bond_dims))]
    if isinstance(layer, TuckerConv2d):
        return ["out", "in"]
    if isinstance(layer, LowRankLinear):
        return ["rank"]
    raise TypeError(f"expected MPOLinear, TuckerConv2d or LowRankLinear, got {type(layer).__name__}")


@dataclass
class BondStats:
    """What one bond's spectrum says."""

    layer: str
    bond: int
    label: str
    """``"0"``, ``"1"``, ... (MPO), ``"out"`` / ``"in"`` (Tucker-2), ``"rank"`` (low rank)."""
    dim: int
    """The bond dimension (rank) as stored."""
    entropy: float
    """``-sum p ln p`` of ``p = s^2 / sum s^2``, in nats."""
    max_entropy: float
    """``ln dim``: the entropy of a flat spectrum; ``entropy / max_entropy`` is how evenly the bond is used."""
    eff_rank_99: int
    """The fewest directions that carry 99% of the squared norm."""
    trunc_err_half: float
    """Relative Frobenius error of cutting the bond to half its dimension (``dim // 2``), this bond alone."""
    trunc_err_quarter: float
    """The same at a quarter of the dimension (``dim // 4``)."""
    top_weight: float
    """``p_0``: the fraction of the squared norm that the leading direction carries."""
    spectrum: torch.Tensor = field(repr=False)
    """The singular values, descending (float64)."""
    truncation: torch.Tensor = field(repr=False)
    """Relative truncation error for every bond dimension ``0 .. dim`` (entry ``r``: keep ``r`` directions)."""

    def row(self) -> dict[str, object]:
        """The CSV row (everything but the two tensors)."""
        return {k: getattr(self, k) for k in _COLUMNS}


_COLUMNS = [
    "layer",
    "bond",
    "label",
    "dim",
    "entropy",
    "max_entropy",
    "eff_rank_99",
    "trunc_err_half",
    "trunc_err_quarter",
    "top_weight",
]


def bond_stats(layer: TensorizedLayer, name: str = "") -> list[BondStats]:
    """:class:`BondStats` of every bond of a layer (``name`` labels the rows)."""
    rows = []
    for k, (label, s) in enumerate(zip(bond_labels(layer), bond_spectra(layer))):
        errors = truncation_errors(s)
        dim = len(s)
        rows.append(
            BondStats(
                layer=name,
                bond=k,
                label=label,
                dim=dim,
                entropy=spectrum_entropy(s),
                max_entropy=math.log(dim),
                eff_rank_99=effective_rank(s, 0.99),
                trunc_err_half=float(errors[dim // 2]),
                trunc_err_quarter=float(errors[dim // 4]),
                top_weight=float(energy_weights(s)[0]),
                spectrum=s,
                truncation=errors,
            )
        )
    return rows


def tensorized_layers(model: nn.Module, pattern: str | None = None) -> list[tuple[str, TensorizedLayer]]:
    """The model's tensorized layers as ``(name, layer)``, in module order; ``pattern`` (a regex, full match) filters.

    Raises ValueError when the model has none, or when the pattern matches none (naming a few that exist).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MPOLinear, TuckerConv2d, LowRankLinear))]
    if not layers:
        raise ValueError(
            "the model has no tensorized layer (MPOLinear, TuckerConv2d, LowRankLinear): tensorize it first"
        )
    if pattern is None:
        return layers
    picked = [(n, m) for n, m in layers if re.fullmatch(pattern, n)]
    if not picked:
        names = ", ".join(n for n, _ in layers[:4]) + (", ..." if len(layers) > 4 else "")
        raise ValueError(f"no tensorized layer matches {pattern!r} (full match); the tensorized layers are: {names}")
    return picked


def model_bond_stats(model: nn.Module, pattern: str | None = None) -> list[BondStats]:
    """:class:`BondStats` of every bond of every tensorized layer of a model (or those matching ``pattern``)."""
    return [row for name, layer in tensorized_layers(model, pattern) for row in bond_stats(layer, name)]


# ------------------------------------------------------------------------------------------ outputs


def write_bonds_csv(stats: list[BondStats], path: str | Path) -> None:
    """One row per bond: layer, bond, label, dim, entropy, max_entropy, eff_rank_99, trunc_err_half, ..."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        for s in stats:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in s.row().items()})


def write_spectra_csv(stats: list[BondStats], path: str | Path) -> None:
    """Every singular value, long form: layer, bond, label, index, singular_value, truncation_error (keeping index)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "bond", "label", "index", "singular_value", "truncation_error"])
        for s in stats:
            for j, (value, err) in enumerate(zip(s.spectrum.tolist(), s.truncation.tolist())):
                writer.writerow([s.layer, s.bond, s.label, j, f"{value:.6g}", f"{err:.6g}"])


def format_bond_table(stats: list[BondStats]) -> str:
    """A plain-text table of the bonds, for the terminal."""
    head = ["layer", "bond", "dim", "entropy", "ln dim", "rank 99%", "err @ dim/2", "p0"]
    body = [
        [
            s.layer,
            s.label,
            str(s.dim),
            f"{s.entropy:.3f}",
            f"{s.max_entropy:.3f}",
            str(s.eff_rank_99),
            f"{s.trunc_err_half:.4f}",
            f"{s.top_weight:.3f}",
        ]
        for s in stats
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_spectra(stats: list[BondStats], path: str | Path, title: str = "") -> None:
    """Two panels: every bond's normalised spectrum ``s_j / s_0`` (log scale) against ``j / dim``, coloured by depth;
    and every bond's entropy against its maximum ``ln dim``, in module order."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(stats):
        values = s.spectrum[s.spectrum > 0]
        if values.numel() == 0:
            continue
        x = (torch.arange(len(values), dtype=torch.float64) + 1) / s.dim
        label = f"{s.layer} [{s.label}]" if len(stats) <= 10 else None
        left.plot(x.numpy(), (values / values[0]).numpy(), color=cmap(i / max(1, len(stats) - 1)), lw=1, label=label)
    left.set_yscale("log")
    left.set_xlabel("direction j / bond dimension")
    left.set_ylabel("s_j / s_0")
    left.set_title("bond spectra (colour: depth, dark = first)")
    if len(stats) <= 10:
        left.legend(fontsize=7)
    index = range(len(stats))
    right.bar(index, [s.max_entropy for s in stats], color="0.85", label="ln dim (flat spectrum)")
    right.bar(index, [s.entropy for s in stats], color="tab:blue", label="entropy")
    right.set_xticks(list(index), [f"{s.layer} [{s.label}]" for s in stats], rotation=90, fontsize=6)
    right.set_ylabel("nats")
    right.set_title("bond entropy")
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    atomic_png(fig, path)
