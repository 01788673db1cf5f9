"""What a bond's singular values say: entropy, truncation error, effective rank (pure maths on a spectrum).

A spectrum ``s`` (descending, as :func:`tnlit.formats.canonical.mpo_schmidt` gives) defines the weights
``p_j = s_j^2 / sum_k s_k^2``: the fraction of the matrix's squared Frobenius norm that bond direction ``j``
carries.
"""

from __future__ import annotations

import torch

__all__ = ["effective_rank", "energy_weights", "spectrum_entropy", "truncation_errors"]


def energy_weights(spectrum: torch.Tensor) -> torch.Tensor:
    """``p_j = s_j^2 / sum s^2`` in float64 (all zeros for an all-zero spectrum)."""
    energy = spectrum.detach().double() ** 2
    total = energy.sum()
    return energy / total if total > 0 else energy


def spectrum_entropy(spectrum: torch.Tensor) -> float:
    """The entropy ``-sum p_j ln p_j`` (nats) of the normalised squared spectrum.

    0 for a bond that carries one direction, ``ln d`` for ``d`` equal singular values: ``exp(entropy)`` is the
    number of directions a bond effectively uses (the entanglement entropy of quantum many-body physics).
    """
    p = energy_weights(spectrum)
    p = p[p > 0]  # 0 ln 0 = 0
    return float(-(p * p.log()).sum())


def truncation_errors(spectrum: torch.Tensor) -> torch.Tensor:
    """Relative error of keeping the first ``r`` directions, for ``r = 0 .. len(spectrum)``: ``sqrt(sum_{j>=r} p_j)``.

    Exactly the relative Frobenius error of truncating this one bond (or rank space) to ``r`` (Eckart-Young);
    entry ``len(spectrum)`` is 0. Summed from the tail so that small errors keep their precision.
    """
    p = energy_weights(spectrum)
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()


def effective_rank(spectrum: torch.Tensor, energy: float = 0.99) -> int:
    """The fewest directions that carry at least ``energy`` of the squared norm (0 for an all-zero spectrum)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    p = energy_weights(spectrum)
    if p.sum() == 0:
        return 0
    kept = torch.cumsum(p, 0)
    # The tolerance keeps energy=1.0 from asking for directions that only round-off separates from the total.
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1
