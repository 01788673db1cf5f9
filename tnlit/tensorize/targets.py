"""Match a plan's rules to a model's modules and settle every rank, by the closed forms the layers use.

Every mistake in a plan against a model (a pattern that matches nothing, a format that does not fit the module, a
rank or CR out of reach) is found here, before any decomposition runs, and all of them are reported together in one
:class:`~tnlit.tensorize.plan.TensorizeError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tnlit.formats.choice import Candidate, candidates
from tnlit.formats.ranks import (
    RankError,
    balanced_factors,
    lowrank_params,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_params,
    tucker2_params,
    tucker2_ranks,
)
from tnlit.layers.base import TensorizedLayer, dense_weight_io, is_hf_conv1d
from tnlit.tensorize.plan import Rule, TensorizeError, TensorizePlan

__all__ = ["Target", "count_params", "resolve"]


@dataclass
class Target:
    name: str
    module: nn.Module
    rule: Rule
    format: str
    """The rule's format; for ``auto``, the chosen one once :func:`tnlit.tensorize.apply.tensorize` has run."""
    ranks: list[int]
    site_dims: tuple[tuple[int, ...], tuple[int, ...]] | None
    weight_params: int
    factor_params: int
    candidates: list[Candidate] | None = None
    """``auto``: what to choose among, the default first (the target holds its counts until the choice)."""


def count_params(model: nn.Module) -> int:
    """Parameters of a model, shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


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


def resolve(model: nn.Module, plan: TensorizePlan) -> list[Target]:
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


def _settle(name: str, module: nn.Module, rule: Rule) -> Target:
    """Resolve a rule's ranks for one module by the same closed forms the layers use."""
    if rule.format == "tucker":
        if module.groups != 1:
            raise ValueError(f"grouped convolution (groups={module.groups}) has no Tucker-2 form; exclude it")
        c_out, c_in, *k = module.weight.shape
        ranks = list(tucker2_ranks(c_out, c_in, k, ranks=rule.rank, cr=rule.cr))
        params = tucker2_params(c_out, c_in, k, ranks)
        return Target(name, module, rule, "tucker", ranks, None, module.weight.numel(), params)
    d_in, d_out = dense_weight_io(module)[0].shape
    if rule.format == "lowrank":
        r = lowrank_rank_for_cr(d_in, d_out, rank=rule.rank, cr=rule.cr)
        return Target(name, module, rule, "lowrank", [r], None, d_in * d_out, lowrank_params(d_in, d_out, r))
    if rule.format == "auto":
        # Closed forms only (estimate runs on meta models): hold the default's counts until tensorize chooses.
        cands = candidates(d_in, d_out, rule.cr)
        first = cands[0]
        dims = (first.in_dims, first.out_dims) if first.format == "mpo" else None
        return Target(name, module, rule, "auto", list(first.ranks), dims, d_in * d_out, first.params, cands)
    in_dims, out_dims = balanced_factors(d_in, rule.sites), balanced_factors(d_out, rule.sites)
    bonds = mpo_bond_dims(in_dims, out_dims, bond_dim=rule.bond_dim, cr=rule.cr)
    params = mpo_params(in_dims, out_dims, bonds)
    return Target(name, module, rule, "mpo", bonds, (in_dims, out_dims), d_in * d_out, params)
