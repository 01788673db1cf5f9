"""Tucker-2 of a convolution kernel on its two channel modes (1x1 -> kxk core -> 1x1), as pure tensor maths.

A kernel ``K`` of shape ``(c_out, c_in, kh, kw)`` becomes ``K = core x_0 U_out x_1 U_in`` with
``U_out (c_out, r_out)``, ``U_in (c_in, r_in)`` and ``core (r_out, r_in, kh, kw)``; the spatial modes are
left whole. The default is HOSVD (the leading left singular vectors of each channel unfolding, then the
core by projection), the initialisation the paper names; ``n_iter > 0`` refines it by HOOI (tensorly's
``partial_tucker``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensorly.decomposition import partial_tucker

from tnlit.formats._backend import decomposition_dtype, tensorly_torch
from tnlit.formats.ranks import tucker2_ranks

__all__ = ["tucker2_from_kernel", "tucker2_to_kernel"]


def tucker2_from_kernel(
    kernel: torch.Tensor,
    *,
    ranks: Sequence[int] | None = None,
    cr: float | None = None,
    n_iter: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decompose a conv kernel into ``(core, u_out, u_in)``; ranks given, for a CR, or full (neither given)."""
    if kernel.ndim < 3:
        raise ValueError(f"a conv kernel has shape (c_out, c_in, *kernel_size), got {tuple(kernel.shape)}")
    c_out, c_in, *ksize = kernel.shape
    r_out, r_in = tucker2_ranks(c_out, c_in, ksize, ranks=ranks, cr=cr)
    work = kernel.detach().to(decomposition_dtype(kernel.dtype))
    with tensorly_torch():
        (core, (u_out, u_in)), _ = partial_tucker(work, [r_out, r_in], modes=[0, 1], n_iter_max=n_iter)
    return tuple(t.to(kernel.dtype).contiguous() for t in (core, u_out, u_in))  # type: ignore[return-value]


def tucker2_to_kernel(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The ``(c_out, c_in, kh, kw)`` kernel a Tucker-2 decomposition represents."""
    return torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in)
