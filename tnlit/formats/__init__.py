"""Pure tensor maths of the formats (no nn.Module): MPO / tensor train, Tucker-2, low rank, and rank rules."""

from tnlit.formats.lowrank import lowrank_from_matrix
from tnlit.formats.mpo import mpo_equation, mpo_from_matrix, mpo_to_matrix
from tnlit.formats.ranks import (
    RankError,
    balanced_factors,
    lowrank_params,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_max_bond_dims,
    mpo_params,
    tucker2_params,
    tucker2_ranks,
)
from tnlit.formats.tucker import tucker2_from_kernel, tucker2_to_kernel

__all__ = [
    "RankError",
    "balanced_factors",
    "lowrank_from_matrix",
    "lowrank_params",
    "lowrank_rank_for_cr",
    "mpo_bond_dims",
    "mpo_equation",
    "mpo_from_matrix",
    "mpo_max_bond_dims",
    "mpo_params",
    "mpo_to_matrix",
    "tucker2_from_kernel",
    "tucker2_params",
    "tucker2_ranks",
    "tucker2_to_kernel",
]
