"""LightningModules: teacher training (``teacher``); the compression methods build on the same conventions."""

from tnlit.methods.teacher import CausalLM, ImageClassifier

__all__ = ["CausalLM", "ImageClassifier"]
