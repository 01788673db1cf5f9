"""A tensorization plan: which modules, into which format, how far; checked as it is built.

A :class:`TensorizePlan` is a list of :class:`Rule`: a regex over module names (full match, names as in
``model.named_modules()``), a format and how far to compress. The first rule whose pattern matches a module applies
to it; ``exclude`` patterns take modules out whatever the rules say. A rule or plan that is wrong in itself (a bad
regex, two of cr / rank / bond_dim, a CR outside (0, 1)) fails here, as it is built; whether it fits a model is
:mod:`tnlit.tensorize.targets`' to say.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tnlit.formats.ranks import RankError, check_cr
from tnlit.types import Format

__all__ = ["Rule", "TensorizeError", "TensorizePlan"]

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
    flops_weight: float = 0.0
    """``auto`` only: an inference-aware objective. The choice minimises ``error + flops_weight * flops_ratio``, the
    ratio being the candidate's factor-by-factor FLOPs over the dense layer's at ``flops_tokens`` input rows; 0 (the
    default) chooses by error alone. E.g. 0.05: a candidate costing the dense FLOPs must keep 0.05 less error than
    one that costs nothing."""
    flops_tokens: int = 1
    """The input rows (batch x sequence) at which ``flops_weight`` counts FLOPs: 1 for generation at batch 1."""

    def as_config(self) -> dict[str, Any]:
        """The rule as a config writes it: pattern, format and what was given; settings left at None or at their
        defaults (the FLOPs objective off, ``sites`` of a format that has none) are left out."""
        defaults = {f.name: f.default for f in fields(self)}
        return {
            k: v
            for k, v in asdict(self).items()
            if v is not None
            and not (k.startswith("flops_") and v == defaults[k])
            and not (k == "sites" and self.format != "mpo")
        }

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
        if self.flops_weight < 0 or self.flops_tokens < 1:
            raise TensorizeError(f"{where}: flops_weight must be >= 0 and flops_tokens >= 1")
        if self.flops_weight and self.format != "auto":
            raise TensorizeError(
                f"{where}: flops_weight weighs the candidates of format 'auto'; this rule is '{self.format}'"
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
    at least total relative error (tnlit.tensorize.budget.budget_plan), and the rules' cr / rank / bond_dim are
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
