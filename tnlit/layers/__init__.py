"""Tensorized layers (nn.Modules built on tnlit.formats)."""

from tnlit.layers.base import Contraction, TensorizedLayer
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear

__all__ = ["Contraction", "LowRankLinear", "MPOLinear", "TensorizedLayer", "TuckerConv2d"]
