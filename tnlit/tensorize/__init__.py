"""Replace a model's dense layers by tensorized ones, following a plan; report what it cost and saved.

``plan`` (Rule, TensorizePlan) -> ``targets`` (the plan matched to a model, every rank settled) -> ``apply``
(tensorize, estimate) -> ``report`` (CompressionReport); ``budget`` allocates ranks for a whole-model CR.
"""

from tnlit.tensorize.apply import estimate, tensorize
from tnlit.tensorize.budget import BudgetPlan, budget_plan, layer_curves
from tnlit.tensorize.plan import Rule, TensorizeError, TensorizePlan
from tnlit.tensorize.report import ChoiceRow, CompressionReport, LayerReport
from tnlit.tensorize.targets import Target, count_params, resolve

__all__ = [
    "BudgetPlan",
    "ChoiceRow",
    "CompressionReport",
    "LayerReport",
    "Rule",
    "Target",
    "TensorizeError",
    "TensorizePlan",
    "budget_plan",
    "count_params",
    "estimate",
    "layer_curves",
    "resolve",
    "tensorize",
]
