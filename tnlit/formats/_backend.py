"""Run tensorly's decompositions on torch tensors without touching tensorly's global backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorly as tl
import torch

__all__ = ["decomposition_dtype", "tensorly_torch"]


@contextlib.contextmanager
def tensorly_torch() -> Iterator[None]:
    """Tensorly's PyTorch backend for the duration of the block (the user's own backend choice is kept)."""
    with tl.backend_context("pytorch"):
        yield


def decomposition_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an SVD runs in: float64 stays float64, everything else (fp16, bf16, fp32) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
