"""LightningDataModules: ``offline`` (data that ships inside Python packages: the embedded quickstart),
``text_sources`` (a mix of offline English texts), ``cifar``, ``imagenet``, ``openwebtext`` (the papers' data) and
``synthetic`` (random tokens for tests and timings). The activation store's DataModule is
:mod:`tnlit.activations.datamodule`."""

from tnlit.data.offline import DigitsDataModule, PydocTextDataModule, decode_bytes, encode_bytes, pydoc_text

__all__ = [
    "DigitsDataModule",
    "PydocTextDataModule",
    "decode_bytes",
    "encode_bytes",
    "pydoc_text",
]
