"""Two-factor low-rank matrices by truncated SVD, the simplest baseline, as pure tensor maths."""

from __future__ import annotations

import torch

from tnlit.formats._backend import decomposition_dtype
from tnlit.formats.ranks import lowrank_rank_for_cr

__all__ = ["lowrank_from_matrix"]


def lowrank_from_matrix(
    matrix: torch.Tensor, *, rank: int | None = None, cr: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a ``(d_in, d_out)`` matrix as ``A @ B``, ``A (d_in, r)``, ``B (r, d_out)``, by truncated SVD.

    The singular values are split evenly (``A = U sqrt(S)``, ``B = sqrt(S) V^T``): balanced factors train
    stably with Adam where ``U`` and ``S V^T`` do not.
    """
    d_in, d_out = matrix.shape
    r = lowrank_rank_for_cr(d_in, d_out, rank=rank, cr=cr)
    u, s, vh = torch.linalg.svd(matrix.detach().to(decomposition_dtype(matrix.dtype)), full_matrices=False)
    root = s[:r].sqrt()
    a = u[:, :r] * root
    b = root[:, None] * vh[:r]
    return a.to(matrix.dtype).contiguous(), b.to(matrix.dtype).contiguous()
