"""LightningDataModules. ``offline``: data that ships inside Python packages (the embedded quickstart)."""

from tnlit.data.offline import DigitsDataModule, PydocTextDataModule, decode_bytes, encode_bytes, pydoc_text

__all__ = ["DigitsDataModule", "PydocTextDataModule", "decode_bytes", "encode_bytes", "pydoc_text"]
