"""Pure tensor maths of the formats (no nn.Module): MPO / tensor train, Tucker-2, low rank, rank rules, canonical
forms and spectra."""

from tnlit.formats.canonical import (
    lowrank_canonical,
    mpo_left_canonical,
    mpo_mixed_canonical,
    mpo_right_canonical,
    mpo_schmidt,
    tucker2_orthonormal,
    tucker2_schmidt,
)
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
from tnlit.formats.spectra import effective_rank, energy_weights, spectrum_entropy, truncation_errors
from tnlit.formats.tucker import tucker2_from_kernel, tucker2_to_kernel

__all__ = [
    "RankError",
    "balanced_factors",
    "effective_rank",
    "energy_weights",
    "lowrank_canonical",
    "lowrank_from_matrix",
    "lowrank_params",
    "lowrank_rank_for_cr",
    "mpo_bond_dims",
    "mpo_equation",
    "mpo_from_matrix",
    "mpo_left_canonical",
    "mpo_max_bond_dims",
    "mpo_mixed_canonical",
    "mpo_params",
    "mpo_right_canonical",
    "mpo_schmidt",
    "mpo_to_matrix",
    "spectrum_entropy",
    "truncation_errors",
    "tucker2_from_kernel",
    "tucker2_orthonormal",
    "tucker2_params",
    "tucker2_ranks",
    "tucker2_schmidt",
    "tucker2_to_kernel",
]
