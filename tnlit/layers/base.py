"""What every tensorized layer shares: the choice of contraction by cost, and the dense-weight adapters.

A factorized layer can run its forward two ways:

- ``"factors"``: contract the input with the factors one at a time (the path picked by opt_einsum);
- ``"dense"``: rebuild the dense weight from the factors, then run one GEMM / conv.

Which is cheaper depends on the batch: rebuilding costs the same for any batch, contracting factor by
factor grows with it, and a high-rank factorization (the paper's two-site MPO at bond 832) can cost
more per input than the dense layer itself. ``contraction="auto"`` compares the two costs for each input
shape and caches the choice; ``"factors"`` or ``"dense"`` forces one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Literal

import torch
from torch import nn

from tnlit.types import Contraction, Layout

__all__ = ["Contraction", "TensorizedLayer", "dense_weight_io", "is_hf_conv1d"]

_CONTRACTIONS = ("auto", "factors", "dense")

# Input shapes whose strategy a layer remembers; a workload with ever-new shapes (LM evaluation with
# ragged lengths) recomputes the choice instead of growing the cache without bound.
_PLAN_CACHE_SIZE = 64


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight stored as ``(in, out)``), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_weight_io(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Layout]:
    """The ``(in, out)`` weight, the bias and the source layout of an ``nn.Linear`` or a Hugging Face ``Conv1D``.

    The one adapter between the two layouts: ``nn.Linear`` stores ``(out, in)``, ``Conv1D`` stores ``(in, out)``.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().t(), module.bias, "linear"
    if is_hf_conv1d(module):
        return module.weight.detach(), module.bias, "conv1d"
    raise TypeError(
        f"expected nn.Linear or Hugging Face Conv1D, got {type(module).__name__}; "
        "convolutions take the 'tucker' format (TuckerConv2d)"
    )


class TensorizedLayer(nn.Module):
    """Thin base of the tensorized layers: factor bookkeeping and the cached, cost-based strategy choice.

    Subclasses implement :meth:`factors`, :meth:`to_dense_weight` and :meth:`_costs`.
    """

    factor_overhead: float = 1.0
    """How many times its FLOP count a factor-by-factor forward really costs against one GEMM / conv: its
    steps read and write large intermediates and run smaller, less efficient kernels. Set per layer type
    from reproduce/bench_layers.py; the choice is "factors" when ``factor_flops * factor_overhead`` is
    below the dense strategy's FLOPs."""

    def __init__(self, contraction: Contraction = "auto") -> None:
        super().__init__()
        self.contraction = contraction
        self._plans: dict[Hashable, str] = {}

    @property
    def contraction(self) -> Contraction:
        """``"auto"`` (cheaper of the two per input shape), ``"factors"`` or ``"dense"``."""
        return self._contraction

    @contraction.setter
    def contraction(self, value: Contraction) -> None:
        if value not in _CONTRACTIONS:
            raise ValueError(f"contraction must be one of {_CONTRACTIONS}, got {value!r}")
        self._contraction = value

    def factors(self) -> Iterator[nn.Parameter]:
        """The factor tensors (everything but the bias)."""
        raise NotImplementedError

    def num_params(self) -> int:
        """Parameters of the factors (the bias, kept dense, is not counted)."""
        return sum(p.numel() for p in self.factors())

    def to_dense_weight(self) -> torch.Tensor:
        """The weight the factors represent, in the source module's own layout."""
        raise NotImplementedError

    def _costs(self, key: Hashable) -> tuple[float, float]:
        """FLOPs of the forward for input shape ``key``: ``(factor by factor, rebuild + dense op)``."""
        raise NotImplementedError

    def strategy(self, key: Hashable) -> Literal["factors", "dense"]:
        """The contraction the forward uses for input shape ``key`` (cached when automatic)."""
        if self._contraction != "auto":
            return self._contraction  # type: ignore[return-value]
        choice = self._plans.get(key)
        if choice is None:
            factor_cost, dense_cost = self._costs(key)
            choice = "factors" if factor_cost * self.factor_overhead < dense_cost else "dense"
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = choice
        return choice  # type: ignore[return-value]
