"""What every tensorized layer shares: the choice of contraction by cost, and the dense-weight adapters.

A factorized layer can run its forward two ways:

- ``"factors"``: contract the input with the factors one at a time (the path picked by opt_einsum);
- ``"dense"``: rebuild the dense weight from the factors, then run one GEMM / conv.

Which is cheaper depends on the batch: rebuilding costs the same for any batch, contracting factor by
factor grows with it, and a high-rank factorization (the paper's two-site MPO at bond 832) can cost
more per input than the dense layer itself. ``contraction="auto"`` compares the two costs for each input
shape and caches the choice; ``"factors"`` or ``"dense"`` forces one.

For inference (:func:`tnlit.inference.inference_mode`) a third way opens: ``"cached"``, the dense weight rebuilt
once and kept, then one GEMM / conv per forward. Where it is the cheapest (a high-rank MPO at any batch) and the
memory budget allows, generation at batch 1 runs at the dense layer's speed instead of rebuilding the weight at
every token. The cache is dropped when the layer goes back to training (``train()``), and rebuilt when a factor
changes (load_state_dict, an optimizer step) or moves (``.to()``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Literal

import torch
from torch import nn

from tnlit.types import Contraction, Layout

__all__ = ["CacheBudget", "Contraction", "TensorizedLayer", "dense_weight_io", "is_hf_conv1d"]

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


class CacheBudget:
    """Bytes that the layers of one model in inference mode may still spend on cached dense weights."""

    def __init__(self, max_bytes: float = float("inf")) -> None:
        self.left = float(max_bytes)
        self.used = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) when they do not fit."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        self.used += nbytes
        return True


class TensorizedLayer(nn.Module):
    """Thin base of the tensorized layers: factor bookkeeping and the cached, cost-based strategy choice.

    Subclasses implement :meth:`factors`, :meth:`to_dense_weight` and :meth:`_costs`.
    """

    factor_overhead: float = 1.0
    """How many times its FLOP count a factor-by-factor forward really costs against one GEMM / conv: its
    steps read and write large intermediates and run smaller, less efficient kernels. Set per layer type
    from reproduce/bench_layers.py; the choice is "factors" when ``factor_flops * factor_overhead`` is
    below the dense strategy's FLOPs."""

    call_overhead_flops: float = 0.0
    """In inference mode: the fixed cost of one kernel call of the factor-by-factor forward, in FLOP equivalents
    (Python and dispatch work that a small input does not amortise; measured by reproduce/bench_inference.py)."""

    def __init__(self, contraction: Contraction = "auto") -> None:
        super().__init__()
        self.contraction = contraction
        self._plans: dict[Hashable, str] = {}
        self._budget: CacheBudget | None = None
        self._inference = False
        self._dense: tuple[tuple, torch.Tensor] | None = None

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

    def rebuild_flops(self) -> float:
        """FLOPs of rebuilding the dense weight from the factors (once per forward on the ``dense`` path)."""
        raise NotImplementedError

    def factor_calls(self) -> int:
        """Kernel calls of the factor-by-factor forward (for :attr:`call_overhead_flops`)."""
        return sum(1 for _ in self.factors())

    def strategy(self, key: Hashable) -> Literal["factors", "dense", "cached"]:
        """The contraction the forward uses for input shape ``key`` (cached when automatic)."""
        if self._contraction != "auto":
            return self._contraction  # type: ignore[return-value]
        choice = self._plans.get(key)
        if choice is None:
            choice = self._choose(key)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = choice
        return choice  # type: ignore[return-value]

    def _choose(self, key: Hashable) -> str:
        factor_cost, dense_cost = self._costs(key)
        factor_cost *= self.factor_overhead
        if not self._inference:
            return "factors" if factor_cost < dense_cost else "dense"
        factor_cost += self.call_overhead_flops * self.factor_calls()
        gemm_cost = dense_cost - self.rebuild_flops()
        if gemm_cost < factor_cost and (self._dense is not None or self._reserve()):
            return "cached"
        return "factors" if factor_cost < dense_cost else "dense"

    def _reserve(self) -> bool:
        """Reserve the memory of the dense weight in the model's cache budget."""
        factors = list(self.factors())
        numel = 1
        for d in self.dense_shape():
            numel *= d
        return self._budget is not None and self._budget.take(numel * factors[0].element_size())

    def dense_shape(self) -> tuple[int, ...]:
        """The dense weight's shape (in the module's own layout)."""
        raise NotImplementedError

    def cached_dense_weight(self) -> torch.Tensor:
        """The dense weight, rebuilt once (without autograd) and reused while the factors stay as they are."""
        stamp = ()
        if not torch.compiler.is_compiling():
            stamp = tuple((id(p), p._version, p.device, p.dtype) for p in self.factors())
        if self._dense is None or (stamp and self._dense[0] != stamp):
            with torch.no_grad():
                self._dense = (stamp, self.to_dense_weight().detach())
        return self._dense[1]

    def set_inference(self, budget: CacheBudget | None) -> None:
        """Enter inference mode; ``budget``: where cached dense weights may go (None: no cache). See
        :func:`tnlit.inference.inference_mode`."""
        self._inference, self._budget, self._dense = True, budget, None
        self._plans.clear()

    def leave_inference(self) -> None:
        """Back to the training strategies: the cached dense weight is dropped."""
        self._inference, self._budget, self._dense = False, None, None
        self._plans.clear()

    def train(self, mode: bool = True) -> TensorizedLayer:
        if mode and self._inference:
            self.leave_inference()  # training changes the factors: a cached weight would go stale
        return super().train(mode)
