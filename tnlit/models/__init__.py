"""Teachers: built-in architectures, torchvision models and Hugging Face causal LMs, by name."""

from tnlit.models.registry import MODELS, ModelNotFoundError, load_model, register_model

__all__ = ["MODELS", "ModelNotFoundError", "load_model", "register_model"]
