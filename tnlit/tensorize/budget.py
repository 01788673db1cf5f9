"""Budgeted rank allocation: a plan that spends a whole-model parameter budget where it costs least error.

Choosing ranks is one of the main practical barriers of tensorization (PAPER.md section 2). A layer's error as a
function of its ranks comes from one decomposition: the singular values of the matrix unfolded at the bond for a
two-site MPO or a low-rank matrix (the TT-SVD / truncated SVD error is their tail), the channel-mode projections
of a conv kernel for Tucker-2 (the HOSVD error, exactly), and a TT-SVD per candidate rank for MPOs of three sites
or more. The error is the relative Frobenius error ``||W - W_hat|| / ||W||`` that ``tensorize``'s report shows,
and the ranks for a CR come from the same closed forms (:mod:`tnlit.formats.ranks`). The same curves draw the
compressibility map (:mod:`tnlit.analysis.compressibility`).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tnlit.atomic import atomic_text
from tnlit.formats.mpo import mpo_from_matrix, mpo_to_matrix
from tnlit.formats.ranks import (
    RankError,
    check_cr,
    lowrank_params,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_max_bond_dims,
    mpo_params,
    tucker2_params,
    tucker2_ranks,
)
from tnlit.formats.spectra import truncation_errors
from tnlit.layers.base import dense_weight_io
from tnlit.tensorize.plan import Rule, TensorizePlan
from tnlit.tensorize.targets import count_params, resolve

__all__ = ["BudgetPlan", "LayerCurve", "Option", "budget_plan", "layer_curves"]

# The candidate caps of an MPO of three or more sites (each costs a TT-SVD): the caps these CRs give.
_MPO_GRID = tuple(k / 50 for k in range(1, 50))


@dataclass(frozen=True)
class Option:
    """One choice of ranks for a layer: what it keeps and what it loses."""

    ranks: tuple[int, ...]
    params: int
    error: float


class LayerCurve:
    """One layer's error (relative, no training) as a function of its ranks, from one decomposition of its weight."""

    def __init__(self, name: str, module: nn.Module, rule: Rule, site_dims: tuple | None = None) -> None:
        self.name, self.format, self.sites = name, rule.format, rule.sites
        self.module_type = type(module).__name__
        self.shape = list(module.weight.shape)
        self.weight_params = module.weight.numel()
        self._memo: dict[tuple[int, ...], float] = {}
        with torch.no_grad():
            if self.format == "tucker":
                self._init_tucker(module.weight.detach().double())
            else:
                w = dense_weight_io(module)[0].double()
                if self.format == "lowrank":
                    self._tail = truncation_errors(torch.linalg.svdvals(w))
                else:
                    self._init_mpo(w, site_dims)

    def _init_tucker(self, kernel: torch.Tensor) -> None:
        c_out, c_in, *ksize = kernel.shape
        self._tucker_shape = (c_out, c_in, tuple(ksize))
        u_out = torch.linalg.svd(kernel.reshape(c_out, -1), full_matrices=False)[0]
        u_in = torch.linalg.svd(kernel.transpose(0, 1).reshape(c_in, -1), full_matrices=False)[0]
        # The kernel in the HOSVD bases: the energy HOSVD keeps at ranks (a, b) is the sum of its [:a, :b] block.
        rotated = torch.einsum("oi...,oa,ib->ab...", kernel, u_out, u_in)
        energy = (rotated**2).reshape(*rotated.shape[:2], -1).sum(-1)
        self._kept = energy.cumsum(0).cumsum(1)
        self._total = float((kernel**2).sum())

    def _init_mpo(self, w: torch.Tensor, site_dims: tuple | None) -> None:
        self.in_dims, self.out_dims = site_dims
        self._weight = w
        if len(self.in_dims) == 2:
            (i1, i2), (o1, o2) = self.in_dims, self.out_dims
            # The two-site MPO is the truncated SVD of the (i1 o1) x (i2 o2) regrouping.
            unfolded = w.reshape(i1, i2, o1, o2).permute(0, 2, 1, 3).reshape(i1 * o1, i2 * o2)
            self._tail = truncation_errors(torch.linalg.svdvals(unfolded))

    def ranks_for_cr(self, cr: float) -> list[int]:
        """The ranks the format's CR rule gives (``tensorize`` with ``cr=...``); RankError when out of reach."""
        if self.format == "tucker":
            c_out, c_in, ksize = self._tucker_shape
            return list(tucker2_ranks(c_out, c_in, ksize, cr=cr))
        if self.format == "lowrank":
            return [lowrank_rank_for_cr(*self._io(), cr=cr)]
        return mpo_bond_dims(self.in_dims, self.out_dims, cr=cr)

    def _io(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.module_type == "Linear" else (self.shape[0], self.shape[1])

    def params(self, ranks: list[int] | tuple[int, ...]) -> int:
        """Parameters of the factors at these ranks."""
        if self.format == "tucker":
            c_out, c_in, ksize = self._tucker_shape
            return tucker2_params(c_out, c_in, ksize, ranks)
        if self.format == "lowrank":
            return lowrank_params(*self._io(), ranks[0])
        return mpo_params(self.in_dims, self.out_dims, ranks)

    def error(self, ranks: list[int] | tuple[int, ...]) -> float:
        """Relative Frobenius error of the format's decomposition at these ranks (as ``tensorize`` reports it)."""
        key = tuple(int(r) for r in ranks)
        if key not in self._memo:
            self._memo[key] = self._error(key)
        return self._memo[key]

    def _error(self, ranks: tuple[int, ...]) -> float:
        if self.format == "tucker":
            if self._total == 0:
                return 0.0
            a, b = min(ranks[0], self._kept.shape[0]), min(ranks[1], self._kept.shape[1])
            return math.sqrt(max(0.0, 1.0 - float(self._kept[a - 1, b - 1]) / self._total))
        if self.format == "lowrank" or len(self.in_dims) == 2:
            return float(self._tail[min(ranks[0], len(self._tail) - 1)]) if ranks else 0.0
        cores = mpo_from_matrix(self._weight.float(), self.in_dims, self.out_dims, bond_dim=list(ranks))
        w = self._weight.float()
        return float(torch.linalg.norm(mpo_to_matrix(cores) - w) / torch.linalg.norm(w).clamp_min(1e-30))

    def option(self, ranks: list[int] | tuple[int, ...]) -> Option:
        return Option(tuple(int(r) for r in ranks), self.params(ranks), self.error(ranks))

    def options(self) -> list[Option]:
        """The candidate ranks that compress (fewer parameters than the weight), by parameters ascending."""
        if self.format == "tucker":
            c_out, c_in, _ = self._tucker_shape
            big, small = max(c_out, c_in), min(c_out, c_in)
            cands = []
            for r_small in range(1, small + 1):  # the CR rule's family: ranks proportional to the channels
                r_big = max(1, min(big, round(r_small * big / small)))
                cands.append((r_big, r_small) if c_out >= c_in else (r_small, r_big))
        elif self.format == "lowrank":
            cands = [(r,) for r in range(1, min(self._io()) + 1)]
        elif len(self.in_dims) == 2:
            cands = [(b,) for b in range(1, mpo_max_bond_dims(self.in_dims, self.out_dims)[0] + 1)]
        else:
            cands = []
            for cr in _MPO_GRID:
                try:
                    cands.append(tuple(self.ranks_for_cr(cr)))
                except RankError:
                    continue
        unique = sorted({c for c in cands if self.params(c) < self.weight_params}, key=self.params)
        return [self.option(c) for c in unique]


def layer_curves(model: nn.Module, plan: TensorizePlan) -> list[LayerCurve]:
    """A :class:`LayerCurve` for every layer the plan selects (its patterns, formats and sites; its CRs are ignored)."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model has no weights (meta device): a compressibility map needs the real weights")
    auto = [r.pattern for r in plan.rules if r.format == "auto"]
    if auto:
        raise ValueError(
            f"rules {', '.join(map(repr, auto))} have format 'auto', which picks a format per layer at one CR; a "
            "compressibility map or a budget allocation needs each rule's format fixed (mpo, lowrank, tucker)"
        )
    return [LayerCurve(t.name, t.module, t.rule, t.site_dims) for t in resolve(model, _exact(plan))]


@dataclass
class BudgetPlan:
    """A plan that meets a whole-model parameter budget, and the uniform plan (one CR for every layer) beside it."""

    plan: TensorizePlan
    """One rule per layer, with explicit ranks (``rank`` / ``bond_dim``)."""
    budget: int
    """The most parameters the whole compressed model may have."""
    params_before: int
    params_after: int
    total_error: float
    """Sum over the layers of the relative error."""
    max_error: float | None
    """The cap on any one layer's relative error that the allocation kept to (None: no cap)."""
    uniform_cr: float | None
    """The per-layer CR that meets the same budget uniformly; None when some layer cannot reach it."""
    uniform_plan: TensorizePlan | None
    uniform_params_after: int | None
    uniform_error: float | None
    layers: list[dict] = field(default_factory=list)
    """Per layer: name, format, ranks, params, cr, rel_error, and the uniform plan's ranks and rel_error."""

    @property
    def compression_rate(self) -> float:
        return (self.params_before - self.params_after) / self.params_before

    def to_yaml(self, path: str | Path) -> None:
        """The plan as YAML (``plan:`` key), ready for ``tnlit compress --config`` or ``tnlit report --config``."""
        import yaml

        rules = [r.as_config() for r in self.plan.rules]
        atomic_text(path, yaml.safe_dump({"plan": {"rules": rules}}, sort_keys=False))

    def __str__(self) -> str:
        lines = [
            f"budget {self.budget:,} parameters (of {self.params_before:,}): budgeted plan {self.params_after:,} "
            f"(whole-model CR {self.compression_rate:.4f}), total relative error {self.total_error:.4f}, "
            f"worst layer {max(row['rel_error'] for row in self.layers):.4f}"
        ]
        if self.uniform_cr is not None:
            lines.append(
                f"uniform plan (every layer at CR {self.uniform_cr:.4f}): {self.uniform_params_after:,} parameters, "
                f"total relative error {self.uniform_error:.4f}, worst layer "
                f"{max(row['uniform_rel_error'] for row in self.layers):.4f}"
            )
        return "\n".join(lines)


def _pareto(options: list[Option]) -> list[Option]:
    """Options by parameters ascending, each with a lower error than every cheaper one."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.params, o.error)):
        if not out or o.error < out[-1].error:
            out.append(o)
    return out


def _lower_hull(points: list[Option]) -> list[Option]:
    """The lower convex hull of a Pareto curve: the steps of diminishing error per parameter, which greed walks."""
    hull: list[Option] = []
    for p in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (b.params - a.params) * (p.error - a.error) - (b.error - a.error) * (p.params - a.params)
            if cross > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def _greedy(frontiers: list[list[Option]], room: int) -> list[Option]:
    """Start every layer at its cheapest option, then take hull steps by error saved per parameter while they fit."""
    hulls = [_lower_hull(f) for f in frontiers]
    pos = [0] * len(hulls)
    spent = sum(h[0].params for h in hulls)
    heap = []

    def push(i: int) -> None:
        if pos[i] + 1 < len(hulls[i]):
            a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
            heapq.heappush(heap, (-(a.error - b.error) / (b.params - a.params), i))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        cost = hulls[i][pos[i] + 1].params - hulls[i][pos[i]].params
        if spent + cost <= room:
            spent += cost
            pos[i] += 1
            push(i)
    return [h[p] for h, p in zip(hulls, pos)]


def _fill(alloc: list[Option], frontiers: list[list[Option]], room: int) -> list[Option]:
    """Spend what is left: repeatedly upgrade the layer whose best affordable option saves the most error."""
    alloc = list(alloc)
    params = [[o.params for o in f] for f in frontiers]
    while True:
        spent = sum(o.params for o in alloc)
        best, gain = None, 0.0
        for i, f in enumerate(frontiers):
            j = bisect.bisect_right(params[i], room - spent + alloc[i].params) - 1
            if j >= 0 and alloc[i].error - f[j].error > gain:
                best, gain = (i, f[j]), alloc[i].error - f[j].error
        if best is None:
            return alloc
        alloc[best[0]] = best[1]


def _rule(curve: LayerCurve, source: Rule, ranks: tuple[int, ...]) -> Rule:
    pattern = re.escape(curve.name)
    if curve.format == "tucker":
        return Rule(pattern, "tucker", rank=list(ranks))
    if curve.format == "lowrank":
        return Rule(pattern, "lowrank", rank=int(ranks[0]))
    return Rule(pattern, "mpo", bond_dim=list(ranks), sites=source.sites)


def budget_plan(
    model: nn.Module,
    plan: TensorizePlan,
    *,
    cr: float | None = None,
    params: int | None = None,
    max_error: float | None = None,
    curves: list[LayerCurve] | None = None,
) -> BudgetPlan:
    """Allocate ranks across the plan's layers so that the whole model meets a parameter budget at least error.

    The budget is the compressed model's total parameters, ``params``, or a whole-model CR (``cr``: the fraction of
    all the model's parameters removed). Layers outside the plan stay dense and count in full. Every layer of the plan
    is tensorized; its candidate ranks are the format's (every bond dimension of a two-site MPO, every rank of a
    low-rank matrix, the proportional Tucker-2 pairs, the CR rule's caps for longer MPOs).

    The total error is the sum of the layers' relative errors (each layer counts once, whatever its size). Minimising
    it alone would sacrifice layers: where spectra are nearly flat, a layer cut to rank 1 (error near 1) frees enough
    parameters to lower several others' errors by more in sum, and a network may well not survive that. So no layer may
    lose more than ``max_error``; by default the worst layer error of the uniform plan (every layer at the one CR that
    meets the same budget), so that the budgeted plan's worst layer is no worse than the uniform plan's, and its total
    no higher. ``max_error=1.0`` lifts the cap.

    The allocation starts every layer at its cheapest allowed option and walks the lower convex hulls of the layers'
    error-against-parameters curves greedily, most error saved per parameter first, then spends any remainder on the
    best single upgrades; where the uniform plan's total is lower, it starts from the uniform plan instead, so the
    budgeted total is never higher than the uniform one.
    """
    if (cr is None) == (params is None):
        raise ValueError(
            "give the budget as either cr (whole-model CR) or params (total parameters), not both or neither"
        )
    curves = curves if curves is not None else layer_curves(model, plan)
    before = count_params(model)
    budget = int(params) if params is not None else math.floor((1.0 - check_cr(cr)) * before)
    fixed = before - sum(c.weight_params for c in curves)  # the layers outside the plan
    room = budget - fixed  # what the tensorized layers' factors may use
    options = [c.options() for c in curves]
    uniform_cr, uniform = _uniform_options(curves, options, budget, before, room)
    if max_error is None and uniform is not None:
        max_error = max(o.error for o in uniform)
    cap = math.inf if max_error is None else max_error + 1e-12
    frontiers = _frontiers(curves, options, uniform, cap, max_error)
    within = "" if max_error is None else f" with no layer above relative error {max_error:.4f}"
    _check_reach(budget, fixed, room, [f[0].params for f in frontiers], before, within)

    alloc = _fill(_greedy(frontiers, room), frontiers, room)
    if uniform is not None and max(o.error for o in uniform) <= cap:
        if sum(o.error for o in uniform) < sum(o.error for o in alloc):
            alloc = _fill(uniform, frontiers, room)
    return _budget_plan(model, plan, curves, alloc, uniform, uniform_cr, budget, before, max_error)


def _uniform_options(
    curves: list[LayerCurve], options: list[list[Option]], budget: int, before: int, room: int
) -> tuple[float, list[Option] | None]:
    """The one per-layer CR that meets the budget, and each layer's option at it (None where a layer cannot reach
    it); a ValueError saying what is possible when no ranks meet the budget at all."""
    stuck = [c.name for c, o in zip(curves, options) if not o]
    if stuck:
        raise ValueError(
            f"no rank of their format compresses these layers: {', '.join(stuck)}; exclude them from the plan"
        )
    dense = sum(c.weight_params for c in curves)
    _check_reach(budget, before - dense, room, [min(o.params for o in opts) for opts in options], before, "")
    if room >= dense:
        raise ValueError(
            f"a budget of {budget:,} parameters keeps every layer of the plan dense ({before:,} parameters in all): "
            "ask for fewer parameters (a higher CR)"
        )
    uniform_cr = 1.0 - room / dense
    try:
        uniform = [c.option(c.ranks_for_cr(uniform_cr)) for c in curves]
    except RankError:
        return uniform_cr, None
    if sum(o.params for o in uniform) > room:  # round-off at the budget's edge
        return uniform_cr, None
    return uniform_cr, uniform


def _frontiers(
    curves: list[LayerCurve],
    options: list[list[Option]],
    uniform: list[Option] | None,
    cap: float,
    max_error: float | None,
) -> list[list[Option]]:
    """Each layer's Pareto curve of the options within the error cap (the uniform plan's option among them)."""
    frontiers = [
        _pareto([o for o in [*opts, *([u] if u else [])] if o.error <= cap])
        for opts, u in zip(options, uniform or [None] * len(curves))
    ]
    stuck = [c.name for c, f in zip(curves, frontiers) if not f]
    if stuck:
        raise ValueError(
            f"no rank of their format keeps these layers within relative error {max_error}: {', '.join(stuck)}; "
            "raise max_error"
        )
    return frontiers


def _budget_plan(
    model: nn.Module,
    plan: TensorizePlan,
    curves: list[LayerCurve],
    alloc: list[Option],
    uniform: list[Option] | None,
    uniform_cr: float,
    budget: int,
    before: int,
    max_error: float | None,
) -> BudgetPlan:
    """The allocation as a plan of one rule per layer, with the uniform plan's figures beside it."""
    fixed = before - sum(c.weight_params for c in curves)
    source = {t.name: t.rule for t in resolve(model, _exact(plan))}
    result = TensorizePlan(rules=[_rule(c, source[c.name], o.ranks) for c, o in zip(curves, alloc)])
    layers = [
        {
            "name": c.name,
            "format": c.format,
            "ranks": list(o.ranks),
            "params": o.params,
            "cr": 1 - o.params / c.weight_params,
            "rel_error": o.error,
            "uniform_ranks": None if uniform is None else list(u.ranks),
            "uniform_rel_error": None if uniform is None else u.error,
        }
        for c, o, u in zip(curves, alloc, uniform or [None] * len(curves))
    ]
    return BudgetPlan(
        plan=result,
        budget=budget,
        params_before=before,
        params_after=fixed + sum(o.params for o in alloc),
        total_error=sum(o.error for o in alloc),
        max_error=max_error,
        uniform_cr=None if uniform is None else uniform_cr,
        uniform_plan=None if uniform is None else _uniform(plan, uniform_cr),
        uniform_params_after=None if uniform is None else fixed + sum(o.params for o in uniform),
        uniform_error=None if uniform is None else sum(o.error for o in uniform),
        layers=layers,
    )


def _check_reach(budget: int, fixed: int, room: int, least: list[int], before: int, within: str) -> None:
    """Raise ValueError, saying what is possible, when even the cheapest allowed ranks exceed the budget."""
    if room >= sum(least):
        return
    best = fixed + sum(least)
    raise ValueError(
        f"a budget of {budget:,} parameters is out of reach{within}: the layers outside the plan keep {fixed:,} and "
        f"the plan's layers need at least {sum(least):,} (whole-model CR {1 - best / before:.4f} at most); ask for at "
        f"least {best:,} parameters"
    )


def _exact(plan: TensorizePlan) -> TensorizePlan:
    rules = [dataclasses.replace(r, cr=None, rank=None, bond_dim=None) for r in plan.rules]
    return TensorizePlan(rules=rules, exclude=list(plan.exclude))


def _uniform(plan: TensorizePlan, cr: float) -> TensorizePlan:
    rules = [dataclasses.replace(r, cr=cr, rank=None, bond_dim=None) for r in plan.rules]
    return TensorizePlan(rules=rules, exclude=list(plan.exclude))
