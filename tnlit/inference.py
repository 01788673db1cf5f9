"""Run a tensorized model for inference at the speed its shapes allow: :func:`inference_mode`.

Training a factorized layer picks, per input shape, between contracting the input with the factors one at a time
and rebuilding the dense weight for one GEMM (:mod:`tnlit.layers.base`). For inference the factors do not change,
so a third way is open: rebuild the dense weight once and keep it. :func:`inference_mode` makes every tensorized
layer choose among the three per input shape, by FLOPs plus a fixed cost per kernel call:

- a low-rank layer, or an MPO with small bonds, runs factor by factor (fewer FLOPs than the dense layer, no extra
  memory);
- a high-rank MPO (the paper's two-site MPO at bond 832 costs 7-30x the dense layer's FLOPs at batch 1) keeps its
  dense weight, within ``max_cache_bytes``: generation runs at the teacher's speed (with the teacher's memory for
  that layer), never rebuilding the weight at every token.

``model.train()`` leaves inference mode (and drops the cached weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tnlit.layers.base import CacheBudget, TensorizedLayer

__all__ = ["InferenceSummary", "inference_mode"]


@dataclass
class InferenceSummary:
    """What :func:`inference_mode` set up: the layers, and the bytes their cached dense weights may take."""

    layers: int
    max_cache_bytes: float
    budget: CacheBudget

    @property
    def cached_bytes(self) -> int:
        """Bytes reserved so far by layers that chose to cache (choices are made at each new input shape)."""
        return self.budget.used


def inference_mode(model: nn.Module, *, cache: bool = True, max_cache_bytes: float | None = None) -> InferenceSummary:
    """Put ``model`` in eval mode and let each tensorized layer pick the cheapest way to apply itself per input shape.

    Args:
        model: A model holding tensorized layers (a student of :func:`tnlit.tensorize`, :func:`tnlit.load_student`).
        cache: Allow layers to keep their rebuilt dense weight where that is the cheapest way to run them.
        max_cache_bytes: At most this many bytes of cached dense weights for the whole model (None: no limit). A
            layer whose weight does not fit runs factor by factor, or rebuilds its weight per forward when cheaper.

    Returns:
        An :class:`InferenceSummary` (``cached_bytes`` grows as layers meet new input shapes).
    """
    limit = float("inf") if max_cache_bytes is None else float(max_cache_bytes)
    budget = CacheBudget(limit if cache else 0.0)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, TensorizedLayer)]
    for layer in layers:
        layer.set_inference(budget)
    return InferenceSummary(len(layers), limit if cache else 0.0, budget)
