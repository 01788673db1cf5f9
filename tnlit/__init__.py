"""tnlit: compress pretrained networks by tensorization, recovered by slice-wise distillation or finetuning."""

from tnlit.tensorize import CompressionReport, LayerReport, Rule, TensorizeError, TensorizePlan, estimate, tensorize


def __getattr__(name: str):
    # The way out (tnlit.export, tnlit.inference) is imported on first use: ``import tnlit`` stays light.
    if name in ("load_student", "export_student", "merge_dense"):
        from tnlit import export

        return getattr(export, name)
    if name == "inference_mode":
        from tnlit.inference import inference_mode

        return inference_mode
    raise AttributeError(f"module 'tnlit' has no attribute {name!r}")


__all__ = [
    "CompressionReport",
    "LayerReport",
    "Rule",
    "TensorizeError",
    "TensorizePlan",
    "estimate",
    "export_student",
    "inference_mode",
    "load_student",
    "merge_dense",
    "tensorize",
]
__version__ = "0.1.0"
