"""LightningDataModules. ``offline``: data that ships inside Python packages (the embedded quickstart);
``activations``: teacher activations read back from an activation store (slice-wise distillation)."""

from tnlit.data.activations import ActivationDataModule
from tnlit.data.offline import DigitsDataModule, PydocTextDataModule, decode_bytes, encode_bytes, pydoc_text

__all__ = [
    "ActivationDataModule",
    "DigitsDataModule",
    "PydocTextDataModule",
    "decode_bytes",
    "encode_bytes",
    "pydoc_text",
]
