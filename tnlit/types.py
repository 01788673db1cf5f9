"""The choices tnlit's settings take, as ``Literal`` types: declared once here, imported everywhere.

jsonargparse turns each into the CLI's list of allowed values, so a typo in a config fails before any work;
:func:`check_choice` makes the same check for a call from Python, which no parser sees.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "Contraction",
    "Decode",
    "Form",
    "Format",
    "Gauge",
    "InitMethod",
    "Layout",
    "Method",
    "Schedule",
    "SerialSource",
    "SliceInputs",
    "SliceLoss",
    "SliceMode",
    "StorageDtype",
    "Task",
    "WandbMode",
    "check_choice",
]

Task = Literal["classification", "causal_lm", "features"]
"""What the model does, and so its loss and metric: ``classification`` (top-1), ``causal_lm`` (perplexity),
``features`` (a model with no task head: its output's relative error and cosine similarity against the teacher's;
trained by distilling the teacher's output)."""
Method = Literal["slicewise", "global", "hybrid"]
"""How accuracy is recovered: slice-wise distillation, global finetuning, or the first then the second."""
Format = Literal["mpo", "tucker", "lowrank", "auto"]
"""A tensorization rule's format."""
Contraction = Literal["auto", "factors", "dense"]
"""How a tensorized layer applies itself: factor by factor, by rebuilding the dense weight, or by cost."""
Layout = Literal["linear", "conv1d"]
"""A dense weight's layout: ``nn.Linear``'s ``(out, in)`` or Hugging Face ``Conv1D``'s ``(in, out)``."""
Schedule = Literal["constant", "cosine"]
"""The learning rate after its warm-up."""
SliceMode = Literal["stream", "cache", "serial"]
"""Where slice-wise training's activations come from and how slices share the device (see SliceSettings)."""
SerialSource = Literal["cache", "teacher"]
"""``serial`` mode's activations: the activation store, or a teacher forward per slice."""
SliceInputs = Literal["teacher", "student", "mix"]
"""A slice's input: the teacher's activation, the student's earlier slices' output, or a blend."""
SliceLoss = Literal["mse", "relative"]
"""Slice-wise distillation's loss."""
StorageDtype = Literal["float32", "bfloat16", "float16"]
"""The activation store's storage dtype."""
InitMethod = Literal["svd", "activation"]
"""How the factors start: from the weights alone, or fitted to calibration inputs."""
WandbMode = Literal["offline", "online", "disabled"]
"""Weights & Biases' mode."""
Form = Literal["left", "right", "mixed", "schmidt", "orthonormal"]
"""A canonical form of a tensorized layer's factors."""
Gauge = Literal["schmidt", "as_is"]
"""The basis a bond's activations are read in."""
Decode = Literal["auto", "ids", "bytes"]
"""How token ids are shown."""


def check_choice(what: str, value: Any, choices: Any) -> Any:
    """``value`` when it is one of the ``Literal`` type ``choices``; else a ValueError naming ``what`` and the
    allowed values."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value
