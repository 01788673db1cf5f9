"""Matrix product operators (tensor-train matrices): TT-SVD, reshapes and contraction, as pure tensor maths.

A matrix ``W`` of shape ``(d_in, d_out)`` (the ``x @ W`` layout) with ``d_in = prod(in_dims)`` and
``d_out = prod(out_dims)`` is viewed as a tensor ``W[i_1..i_n, o_1..o_n]`` and written as a chain of cores,
core ``k`` of shape ``(bond_{k-1}, in_k, out_k, bond_k)`` with ``bond_0 = bond_n = 1``. Regrouping the
indices site by site, ``(i_1 o_1, i_2 o_2, ...)``, makes the chain a tensor train, which TT-SVD (tensorly)
computes; for two sites that is the truncated SVD of the regrouped ``(i_1 o_1) x (i_2 o_2)`` matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import opt_einsum as oe
import torch
from tensorly.decomposition import tensor_train_matrix

from tnlit.formats._backend import decomposition_dtype, tensorly_torch
from tnlit.formats.ranks import mpo_bond_dims

__all__ = ["mpo_equation", "mpo_from_matrix", "mpo_to_matrix"]


def mpo_equation(n_sites: int, *, batched: bool) -> str:
    """The einsum of an MPO: ``cores -> (in..., out...)`` or, batched, ``x(n, in...), cores -> (n, out...)``.

    Bond indices are kept on the boundary cores too (size 1), so the operands are the cores as stored.
    """
    sym = oe.get_symbol
    ins = [sym(k) for k in range(n_sites)]
    outs = [sym(n_sites + k) for k in range(n_sites)]
    bonds = [sym(2 * n_sites + k) for k in range(n_sites + 1)]
    cores = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n_sites)]
    if batched:
        batch = sym(3 * n_sites + 1)
        return f"{batch}{''.join(ins)},{','.join(cores)}->{batch}{''.join(outs)}"
    return f"{','.join(cores)}->{''.join(ins)}{''.join(outs)}"


def mpo_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(d_in, d_out)`` matrix an MPO represents."""
    d_in = math.prod(c.shape[1] for c in cores)
    d_out = math.prod(c.shape[2] for c in cores)
    full = _rebuild_expression(tuple(tuple(c.shape) for c in cores))(*cores, backend="torch")
    return full.reshape(d_in, d_out)


@functools.lru_cache(maxsize=256)
def _rebuild_expression(core_shapes: tuple[tuple[int, ...], ...]) -> oe.contract.ContractExpression:
    """The cores-to-matrix contraction, its path found once per shape (a layer rebuilds on every forward)."""
    return oe.contract_expression(mpo_equation(len(core_shapes), batched=False), *core_shapes, optimize="optimal")


def mpo_from_matrix(
    matrix: torch.Tensor,
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    *,
    bond_dim: int | Sequence[int] | None = None,
    cr: float | None = None,
) -> list[torch.Tensor]:
    """TT-SVD of a ``(d_in, d_out)`` matrix into MPO cores, with bond dimensions given, for a CR, or exact.

    The cores come back in the matrix's dtype (the SVD itself runs in float32 or float64) and in
    left-canonical form: every core but the last is an isometry, the last carries the norm.
    """
    in_dims, out_dims = tuple(in_dims), tuple(out_dims)
    if len(in_dims) != len(out_dims) or not in_dims:
        raise ValueError(f"an MPO needs as many input as output site dims (at least one), got {in_dims} and {out_dims}")
    if matrix.shape != (math.prod(in_dims), math.prod(out_dims)):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not match site dims {in_dims} x {out_dims}")
    bonds = mpo_bond_dims(in_dims, out_dims, bond_dim=bond_dim, cr=cr)
    work = matrix.detach().to(decomposition_dtype(matrix.dtype)).reshape(*in_dims, *out_dims)
    with tensorly_torch():
        cores = tensor_train_matrix(work, [1, *bonds, 1]).factors
    return [c.to(matrix.dtype).contiguous() for c in cores]
