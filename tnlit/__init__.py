"""tnlit: compress pretrained networks by tensorization, recovered by slice-wise distillation or finetuning."""

from tnlit.tensorize import CompressionReport, LayerReport, Rule, TensorizeError, TensorizePlan, estimate, tensorize

__all__ = ["CompressionReport", "LayerReport", "Rule", "TensorizeError", "TensorizePlan", "estimate", "tensorize"]
__version__ = "0.1.0"
