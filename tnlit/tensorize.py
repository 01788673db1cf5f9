"""Replace a model's dense layers by tensorized ones, following a plan; report what it cost and saved.

A :class:`TensorizePlan` is a list of :class:`Rule`: a regex over module names (full match, names as in
``model.named_modules()``), a format and how far to compress. The first rule whose pattern matches a
module applies to it; ``exclude`` patterns take modules out whatever the rules say. Every mistake in a
plan (a pattern that matches nothing, a format that does not fit the module, a rank or CR out of reach)
is found before any decomposition runs, and all of them are reported together in one
:class:`TensorizeError`; nothing is returned then.

Two ways to let tnlit decide instead of the plan:

- ``format: auto`` (with ``cr``) compares, per layer, low rank and MPOs of two and three sites over a bounded set
  of site-dim splits and orderings, all within the parameter budget of the rule's CR, and keeps the one of least
  error (:mod:`tnlit.formats.choice`); the report's rows show the chosen format and site dims, and its ``choices``
  the whole comparison.
- ``budget`` on the plan (a whole-model CR) keeps the rules' layers and formats and allocates their ranks across
  the layers to meet it at least total error (:func:`tnlit.compressibility.budget_plan`), instead of the rules' CRs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tnlit.atomic import atomic_path, atomic_text
from tnlit.formats.choice import Candidate, candidates, choose
from tnlit.formats.ranks import (
    RankError,
    balanced_factors,
    check_cr,
    lowrank_params,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_params,
    tucker2_params,
    tucker2_ranks,
)
from tnlit.layers.base import TensorizedLayer, dense_weight_io, is_hf_conv1d
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear

__all__ = [
    "ChoiceRow",
    "CompressionReport",
    "LayerReport",
    "Rule",
    "TensorizeError",
    "TensorizePlan",
    "estimate",
    "tensorize",
]

Format = Literal["mpo", "tucker", "lowrank", "auto"]
_FORMATS = ("mpo", "tucker", "lowrank", "auto")


class TensorizeError(ValueError):
    """A plan that cannot be applied to a model; the message lists every problem found."""


@dataclass
class Rule:
    """Which modules to tensorize, into which format, and how far.

    Give at most one of ``cr``, ``rank`` and ``bond_dim``; with none, the factorization is exact (full rank).
    Format ``auto`` takes ``cr`` alone: the parameter budget every candidate it compares keeps to.
    """

    pattern: str
    """Regex over module names, matched in full (e.g. ``transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)``)."""
    format: Format
    """``mpo`` (nn.Linear / HF Conv1D), ``lowrank`` (nn.Linear / HF Conv1D), ``tucker`` (nn.Conv2d), or ``auto``
    (nn.Linear / HF Conv1D): per layer, whichever of low rank and MPOs of 2 or 3 sites (several site-dim splits
    and orderings) keeps the most of the weight at the parameters of ``cr``; needs ``cr``."""
    cr: float | None = None
    """Compression rate per layer: the fraction of the weight's parameters removed, in (0, 1)."""
    rank: int | list[int] | None = None
    """``lowrank``: the rank; ``tucker``: ``[r_out, r_in]``."""
    bond_dim: int | list[int] | None = None
    """``mpo`` only: one cap for every inner bond, or one value per inner bond."""
    sites: int = 2
    """``mpo`` only: number of cores; in/out dims are split into balanced site dims. (``auto`` tries 2 and 3.)"""

    def __post_init__(self) -> None:
        where = f"rule {self.pattern!r}"
        if self.format not in _FORMATS:
            raise TensorizeError(f"{where}: format must be one of {_FORMATS}, got {self.format!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise TensorizeError(f"{where}: not a valid regular expression ({err})") from None
        given = [k for k in ("cr", "rank", "bond_dim") if getattr(self, k) is not None]
        if len(given) > 1:
            raise TensorizeError(f"{where}: give at most one of cr, rank and bond_dim, got {', '.join(given)}")
        if self.format == "auto" and given != ["cr"]:
            # Candidates of different formats are only comparable at equal parameters, which a CR fixes and a
            # rank or bond dimension (meaningful for one format only) does not.
            got = f"got {', '.join(given)}" if given else "got none"
            raise TensorizeError(
                f"{where}: format 'auto' compares formats at the parameters of one compression rate: give cr "
                f"(e.g. cr: 0.5), {got}"
            )
        if self.bond_dim is not None and self.format != "mpo":
            raise TensorizeError(f"{where}: bond_dim is for the 'mpo' format; '{self.format}' takes rank or cr")
        if self.rank is not None and self.format == "mpo":
            raise TensorizeError(f"{where}: 'mpo' takes bond_dim or cr, not rank")
        if self.format == "tucker" and self.rank is not None and (isinstance(self.rank, int) or len(self.rank) != 2):
            raise TensorizeError(f"{where}: tucker rank is a pair [r_out, r_in], got {self.rank!r}")
        if self.format == "lowrank" and self.rank is not None and not isinstance(self.rank, int):
            raise TensorizeError(f"{where}: lowrank rank is one integer, got {self.rank!r}")
        if self.format == "mpo" and (not isinstance(self.sites, int) or self.sites < 1):
            raise TensorizeError(f"{where}: sites must be a positive integer, got {self.sites!r}")
        if self.cr is not None:
            try:
                check_cr(self.cr)
            except RankError as err:
                raise TensorizeError(f"{where}: {err}") from None


@dataclass
class TensorizePlan:
    """Rules (first match wins) and the modules to leave dense."""

    rules: list[Rule]
    """Tensorization rules, tried in order for every module."""
    exclude: list[str] = field(default_factory=list)
    """Regexes over module names (full match) of modules to keep dense, e.g. sensitive layers."""
    budget: float | None = None
    """Whole-model CR, the fraction of ALL the model's parameters removed, in (0, 1). When set, the rules still
    choose the layers, formats and MPO sites, but the ranks are allocated across those layers to meet this budget
    at least total relative error (tnlit.compressibility.budget_plan), and the rules' cr / rank / bond_dim are
    ignored. Reads the weights' spectra (not on a meta model, so not with --dry_run); not with format auto."""

    def __post_init__(self) -> None:
        self.rules = [r if isinstance(r, Rule) else Rule(**r) for r in self.rules]
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise TensorizeError(f"exclude pattern {pattern!r}: not a valid regular expression ({err})") from None
        if self.budget is not None:
            try:
                check_cr(self.budget)
            except RankError:
                raise TensorizeError(
                    f"plan budget must be a whole-model CR strictly between 0 and 1 (the fraction of all the model's "
                    f"parameters removed), got {self.budget!r}"
                ) from None
            auto = [r.pattern for r in self.rules if r.format == "auto"]
            if auto:
                # The allocation trades ranks within one format per layer; auto picks the format at one CR per layer.
                # Combining them would need the allocation to search formats and site dims too.
                raise TensorizeError(
                    f"plan budget cannot be combined with format 'auto' (rules {', '.join(map(repr, auto))}): the "
                    "budget allocates ranks within each rule's fixed format. Give those rules a format (mpo, lowrank) "
                    "to keep the budget, or drop budget and give the auto rules a cr"
                )


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
        _write_rows(path, _COLUMNS, self.layers)

    def choices_to_csv(self, path: str | Path) -> None:
        """The ``format: auto`` comparison, one row per layer and candidate (header only when nothing was chosen)."""
        _write_rows(path, _CHOICE_COLUMNS, self.choices)

    def __str__(self) -> str:
        head = ["layer", "format", "shape", "site dims", "ranks", "params", "factors", "CR", "rel. error"]
        body = [
            [
                r.name, r.format, "x".join(map(str, r.shape)), r.site_dims, ",".join(map(str, r.ranks)),
                f"{r.weight_params:,}", f"{r.factor_params:,}", f"{r.cr:.4f}",
                "-" if r.rel_error is None else f"{r.rel_error:.4f}",
            ]
            for r in self.layers
        ]  # fmt: skip
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


@dataclass
class _Target:
    name: str
    module: nn.Module
    rule: Rule
    format: str
    """The rule's format; for ``auto``, the chosen one once :func:`_choose` has run."""
    ranks: list[int]
    site_dims: tuple[tuple[int, ...], tuple[int, ...]] | None
    weight_params: int
    factor_params: int
    candidates: list[Candidate] | None = None
    """``auto``: what to choose among, the default first (the target holds its counts until the choice)."""


def estimate(model: nn.Module, plan: TensorizePlan) -> CompressionReport:
    """The report ``tensorize`` would give, from closed forms alone: no decomposition, no error column.

    Works on a model on the ``meta`` device (e.g. GPT-2 XL built from its config without weights), with two
    exceptions that need the weights:

    - ``format: auto`` chooses by the weights' errors, so an estimate does not choose: its rows say ``auto`` and
      count the default candidate (the two-site MPO on balanced site dims at the rule's CR; low rank where no such
      MPO reaches it). ``tensorize`` may pick another candidate, always within the same per-layer budget of
      ``(1 - cr)`` of the weight's parameters, so the layers' CRs are at least the rule's either way.
    - a plan ``budget`` allocates ranks from the weights' spectra: on a model with weights the estimate runs that
      allocation (SVDs, no layer built) and counts its ranks; on a meta model it is an error.
    """
    targets = _resolve(model, _budgeted(model, plan))
    before = _count_params(model)
    saved = sum(t.weight_params - t.factor_params for t in targets)
    return CompressionReport([_row(t, None) for t in targets], before, before - saved, budget=plan.budget)


def tensorize(
    model: nn.Module, plan: TensorizePlan, covariances: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, CompressionReport]:
    """A tensorized copy of ``model`` (left untouched) and its :class:`CompressionReport`.

    The whole-model counts come from the two models' parameters (shared parameters counted once).

    Args:
        model: The dense model, with weights.
        plan: What to tensorize and how; see :class:`TensorizePlan`.
        covariances: Optional input covariances ``(in, in)`` by module name (e.g. ``X^T X / n`` over calibration
            inputs) for ``format: auto`` layers: those choose by output error ``sqrt(tr(D^T C D) / tr(W^T C W))``
            (the error on the inputs the layer sees) instead of weight error; layers absent choose by weight error.
            Slower: each candidate is decomposed in full. Used by auto layers only; names of modules the plan does
            not tensorize are an error.
    """
    if any(p.is_meta for p in model.parameters()):
        raise TensorizeError("the model has no weights (meta device): load real weights, or use estimate() for counts")
    targets = _resolve(model, _budgeted(model, plan))
    choices = _choose(targets, _checked_covariances(covariances, targets))
    student = copy.deepcopy(model)
    rows = []
    for t in targets:
        layer = _build(student.get_submodule(t.name), t)
        rows.append(_row(t, _relative_error(t.module, layer)))
        parent, _, child = t.name.rpartition(".")
        setattr(student.get_submodule(parent), child, layer)
    report = CompressionReport(rows, _count_params(model), _count_params(student), budget=plan.budget, choices=choices)
    return student, report


# ------------------------------------------------------------------------------------------ internals


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _budgeted(model: nn.Module, plan: TensorizePlan) -> TensorizePlan:
    """The plan itself, or for a plan with a budget the allocation's plan: one rule per layer, explicit ranks."""
    if plan.budget is None:
        return plan
    if any(p.is_meta for p in model.parameters()):
        raise TensorizeError(
            f"plan budget {plan.budget}: allocating ranks across layers reads the weights' spectra, and this model "
            "has no weights (meta device): load real weights, or give the rules a cr instead of the plan a budget"
        )
    from tnlit.compressibility import budget_plan  # compressibility builds on this module

    try:
        allocation = budget_plan(model, dataclasses.replace(plan, budget=None), cr=plan.budget)
    except TensorizeError:
        raise
    except ValueError as err:  # RankError included: the budget is out of reach, or a layer cannot compress
        raise TensorizeError(f"plan budget {plan.budget}: {err}") from None
    return allocation.plan


def _fits(module: nn.Module, fmt: str) -> bool:
    if isinstance(module, TensorizedLayer):
        return False
    if fmt == "tucker":
        return isinstance(module, nn.Conv2d)
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _kind(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    shape = "" if not isinstance(w, torch.Tensor) else " " + "x".join(map(str, w.shape))
    return f"{type(module).__name__}{shape}"


def _resolve(model: nn.Module, plan: TensorizePlan) -> list[_Target]:
    """Match rules to modules and settle every rank, collecting all problems before raising."""
    problems: list[str] = []
    names = [(n, m) for n, m in model.named_modules() if n]
    excluded = set()
    for pattern in plan.exclude:
        hits = {n for n, _ in names if re.fullmatch(pattern, n)}
        if not hits:
            problems.append(f"exclude pattern {pattern!r} matches no module{_examples(names)}")
        excluded |= hits
    matched_by: dict[int, int] = {}
    targets = []
    for name, module in names:
        for i, rule in enumerate(plan.rules):
            if not re.fullmatch(rule.pattern, name):
                continue
            matched_by[i] = matched_by.get(i, 0) + 1
            if name in excluded:
                break
            if not _fits(module, rule.format):
                what = "takes nn.Conv2d" if rule.format == "tucker" else "takes nn.Linear or Hugging Face Conv1D"
                if isinstance(module, TensorizedLayer):
                    what = "cannot apply to a module that is already tensorized"
                problems.append(
                    f"module {name!r} ({_kind(module)}) matches rule {rule.pattern!r}, but format '{rule.format}' "
                    f"{what}; narrow the pattern or add the module to exclude"
                )
                break
            try:
                targets.append(_settle(name, module, rule))
            except (RankError, ValueError) as err:
                problems.append(f"module {name!r} ({_kind(module)}), rule {rule.pattern!r}: {err}")
            break
    for i, rule in enumerate(plan.rules):
        if not matched_by.get(i):
            problems.append(f"rule pattern {rule.pattern!r} matches no module{_examples(names)}")
    if problems:
        raise TensorizeError("cannot tensorize with this plan:\n  - " + "\n  - ".join(problems))
    if not targets:
        raise TensorizeError("the plan selects no module: every match is excluded")
    return targets


def _examples(names: list[tuple[str, nn.Module]]) -> str:
    """A few names of modules a rule could take, to show what names look like."""
    fit = [n for n, m in names if _fits(m, "tucker") or _fits(m, "mpo")]
    if not fit:
        return ""
    return f" (tensorizable modules are named like: {', '.join(fit[:3])}{', ...' if len(fit) > 3 else ''})"


def _settle(name: str, module: nn.Module, rule: Rule) -> _Target:
    """Resolve a rule's ranks for one module by the same closed forms the layers use."""
    if rule.format == "tucker":
        if module.groups != 1:
            raise ValueError(f"grouped convolution (groups={module.groups}) has no Tucker-2 form; exclude it")
        c_out, c_in, *k = module.weight.shape
        ranks = list(tucker2_ranks(c_out, c_in, k, ranks=rule.rank, cr=rule.cr))
        params = tucker2_params(c_out, c_in, k, ranks)
        return _Target(name, module, rule, "tucker", ranks, None, module.weight.numel(), params)
    d_in, d_out = dense_weight_io(module)[0].shape
    if rule.format == "lowrank":
        r = lowrank_rank_for_cr(d_in, d_out, rank=rule.rank, cr=rule.cr)
        return _Target(name, module, rule, "lowrank", [r], None, d_in * d_out, lowrank_params(d_in, d_out, r))
    if rule.format == "auto":
        # Closed forms only (estimate runs on meta models): hold the default's counts until tensorize chooses.
        cands = candidates(d_in, d_out, rule.cr)
        first = cands[0]
        dims = (first.in_dims, first.out_dims) if first.format == "mpo" else None
        return _Target(name, module, rule, "auto", list(first.ranks), dims, d_in * d_out, first.params, cands)
    in_dims, out_dims = balanced_factors(d_in, rule.sites), balanced_factors(d_out, rule.sites)
    bonds = mpo_bond_dims(in_dims, out_dims, bond_dim=rule.bond_dim, cr=rule.cr)
    params = mpo_params(in_dims, out_dims, bonds)
    return _Target(name, module, rule, "mpo", bonds, (in_dims, out_dims), d_in * d_out, params)


def _checked_covariances(
    covariances: dict[str, torch.Tensor] | None, targets: list[_Target]
) -> dict[str, torch.Tensor]:
    """The covariances by layer name, checked against the plan's layers before any decomposition runs."""
    if not covariances:
        return {}
    by_name = {t.name: t for t in targets}
    problems = []
    unknown = sorted(set(covariances) - set(by_name))
    if unknown:
        problems.append(f"covariances given for modules the plan does not tensorize: {', '.join(unknown)}")
    for name, cov in covariances.items():
        if name not in by_name:
            continue
        d_in = dense_weight_io(by_name[name].module)[0].shape[0] if by_name[name].format != "tucker" else None
        if d_in is None or not isinstance(cov, torch.Tensor) or tuple(cov.shape) != (d_in, d_in):
            shape = tuple(cov.shape) if isinstance(cov, torch.Tensor) else type(cov).__name__
            want = "no covariance (a convolution)" if d_in is None else f"an ({d_in}, {d_in}) input covariance"
            problems.append(f"module {name!r} takes {want}, got {shape}")
    if problems:
        raise TensorizeError("cannot tensorize with these covariances:\n  - " + "\n  - ".join(problems))
    return covariances


def _choose(targets: list[_Target], covariances: dict[str, torch.Tensor]) -> list[ChoiceRow]:
    """Settle every ``auto`` target on its least-error candidate; the comparison, one row per candidate."""
    rows = []
    for t in targets:
        if t.format != "auto":
            continue
        cov = covariances.get(t.name)
        scored, best = choose(dense_weight_io(t.module)[0], t.candidates, cov)
        pick = scored[best].candidate
        t.format, t.ranks, t.factor_params = pick.format, list(pick.ranks), pick.params
        t.site_dims = (pick.in_dims, pick.out_dims) if pick.format == "mpo" else None
        rows += [
            ChoiceRow(
                layer=t.name, candidate=s.candidate.label, format=s.candidate.format, sites=s.candidate.sites,
                site_dims=s.candidate.site_dims, ranks=list(s.candidate.ranks), params=s.candidate.params,
                cr=1.0 - s.candidate.params / t.weight_params, rel_error=s.rel_error,
                metric="weight" if cov is None else "output", chosen=i == best,
            )
            for i, s in enumerate(scored)
        ]  # fmt: skip
    return rows


def _build(module: nn.Module, t: _Target) -> TensorizedLayer:
    """The tensorized layer for a settled target, with exactly the ranks the report shows."""
    if t.format == "tucker":
        return TuckerConv2d.from_dense(module, ranks=t.ranks)
    if t.format == "lowrank":
        return LowRankLinear.from_dense(module, rank=t.ranks[0])
    in_dims, out_dims = t.site_dims
    return MPOLinear.from_dense(module, in_dims=in_dims, out_dims=out_dims, bond_dim=t.ranks)


@torch.no_grad()
def _relative_error(dense: nn.Module, layer: TensorizedLayer) -> float:
    w = dense.weight.detach().float()
    return (torch.linalg.norm(layer.to_dense_weight().float() - w) / torch.linalg.norm(w).clamp_min(1e-30)).item()


def _row(t: _Target, err: float | None) -> LayerReport:
    sites = "" if t.site_dims is None else " -> ".join("x".join(map(str, dims)) for dims in t.site_dims)
    return LayerReport(
        name=t.name, format=t.format, module_type=type(t.module).__name__, shape=list(t.module.weight.shape),
        site_dims=sites, ranks=list(t.ranks), weight_params=t.weight_params, factor_params=t.factor_params,
        cr=1.0 - t.factor_params / t.weight_params, rel_error=err,
    )  # fmt: skip


def _write_rows(path: str | Path, columns: list[str], rows: list) -> None:
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
