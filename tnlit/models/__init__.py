"""Teachers: built-in architectures, torchvision models and Hugging Face causal LMs, by name."""

from tnlit.models.registry import MODELS, ModelNotFoundError, load_model, register_model
from tnlit.models.weights import load_teacher

__all__ = ["MODELS", "ModelNotFoundError", "load_model", "load_teacher", "register_model"]
