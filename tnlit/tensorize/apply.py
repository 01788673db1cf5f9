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
  the layers to meet it at least total error (:func:`tnlit.tensorize.budget.budget_plan`), instead of the rules' CRs.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from tnlit.formats.choice import apply_flops, choose
from tnlit.layers.base import TensorizedLayer, dense_weight_io
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear
from tnlit.tensorize.budget import budget_plan
from tnlit.tensorize.plan import TensorizeError, TensorizePlan
from tnlit.tensorize.report import ChoiceRow, CompressionReport, LayerReport
from tnlit.tensorize.targets import Target, count_params, resolve

__all__ = ["estimate", "tensorize"]


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
    targets = resolve(model, _budgeted(model, plan))
    before = count_params(model)
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
    targets = resolve(model, _budgeted(model, plan))
    choices = _choose(targets, _checked_covariances(covariances, targets))
    student = copy.deepcopy(model)
    rows = []
    for t in targets:
        layer = _build(student.get_submodule(t.name), t)
        rows.append(_row(t, _relative_error(t.module, layer)))
        parent, _, child = t.name.rpartition(".")
        setattr(student.get_submodule(parent), child, layer)
    report = CompressionReport(rows, count_params(model), count_params(student), budget=plan.budget, choices=choices)
    return student, report


def _budgeted(model: nn.Module, plan: TensorizePlan) -> TensorizePlan:
    """The plan itself, or for a plan with a budget the allocation's plan: one rule per layer, explicit ranks."""
    if plan.budget is None:
        return plan
    if any(p.is_meta for p in model.parameters()):
        raise TensorizeError(
            f"plan budget {plan.budget}: allocating ranks across layers reads the weights' spectra, and this model "
            "has no weights (meta device): load real weights, or give the rules a cr instead of the plan a budget"
        )
    try:
        allocation = budget_plan(model, dataclasses.replace(plan, budget=None), cr=plan.budget)
    except TensorizeError:
        raise
    except ValueError as err:  # RankError included: the budget is out of reach, or a layer cannot compress
        raise TensorizeError(f"plan budget {plan.budget}: {err}") from None
    return allocation.plan


def _checked_covariances(covariances: dict[str, torch.Tensor] | None, targets: list[Target]) -> dict[str, torch.Tensor]:
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


def _choose(targets: list[Target], covariances: dict[str, torch.Tensor]) -> list[ChoiceRow]:
    """Settle every ``auto`` target on its least-error candidate; the comparison, one row per candidate."""
    rows = []
    for t in targets:
        if t.format != "auto":
            continue
        cov = covariances.get(t.name)
        scored, best = choose(dense_weight_io(t.module)[0], t.candidates, cov, t.rule.flops_weight, t.rule.flops_tokens)
        pick = scored[best].candidate
        t.format, t.ranks, t.factor_params = pick.format, list(pick.ranks), pick.params
        t.site_dims = (pick.in_dims, pick.out_dims) if pick.format == "mpo" else None
        rows += [
            ChoiceRow(
                layer=t.name,
                candidate=s.candidate.label,
                format=s.candidate.format,
                sites=s.candidate.sites,
                site_dims=s.candidate.site_dims,
                ranks=list(s.candidate.ranks),
                params=s.candidate.params,
                cr=1.0 - s.candidate.params / t.weight_params,
                rel_error=s.rel_error,
                metric="weight" if cov is None else "output",
                chosen=i == best,
                flops_ratio=s.flops_ratio,
            )
            for i, s in enumerate(scored)
        ]
    return rows


def _build(module: nn.Module, t: Target) -> TensorizedLayer:
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


def _row(t: Target, err: float | None) -> LayerReport:
    sites = "" if t.site_dims is None else " -> ".join("x".join(map(str, dims)) for dims in t.site_dims)
    return LayerReport(
        name=t.name,
        format=t.format,
        module_type=type(t.module).__name__,
        shape=list(t.module.weight.shape),
        site_dims=sites,
        ranks=list(t.ranks),
        weight_params=t.weight_params,
        factor_params=t.factor_params,
        cr=1.0 - t.factor_params / t.weight_params,
        rel_error=err,
        flops_ratio=_flops_ratio(t),
    )


def _flops_ratio(t: Target) -> float | None:
    """The layer's factor-by-factor FLOPs over the dense layer's, at one input row (the auto rule's tokens)."""
    if t.format not in ("mpo", "lowrank"):
        return None
    d_in, d_out = dense_weight_io(t.module)[0].shape
    n = t.rule.flops_tokens
    dims = t.site_dims or ((), ())
    return apply_flops(t.format, d_in, d_out, t.ranks, dims[0], dims[1], n) / (2.0 * n * d_in * d_out)
