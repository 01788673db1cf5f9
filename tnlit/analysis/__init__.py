"""Reading a tensorized model: bond spectra and entropies in canonical form (``bonds``), per-sample bond
activations (``bond_activations``), the per-layer compressibility map (``compressibility``) and the per-layer
sensitivity sweep (``sensitivity``). PAPER.md section 2: what a toolkit should offer beyond compression."""

from tnlit.analysis.bond_activations import bond_activations, find_layer, top_activating
from tnlit.analysis.bonds import bond_spectra, bond_stats, canonical_factors, canonicalize_, model_bond_stats
from tnlit.analysis.compressibility import DEFAULT_CRS, CompressibilityMap, compressibility_map, every_layer_plan
from tnlit.analysis.sensitivity import sensitivity_plan, sensitivity_sweep

__all__ = [
    "DEFAULT_CRS",
    "CompressibilityMap",
    "bond_activations",
    "bond_spectra",
    "bond_stats",
    "canonical_factors",
    "canonicalize_",
    "compressibility_map",
    "every_layer_plan",
    "find_layer",
    "model_bond_stats",
    "sensitivity_plan",
    "sensitivity_sweep",
    "top_activating",
]
