"""Teachers: built-in architectures, torchvision models and Hugging Face causal LMs, by name."""

from tnlit.models.pretrained import PRETRAINED, cache_root, pretrained_dir
from tnlit.models.registry import MODELS, ModelNotFoundError, load_model, model_names, register_model, tokenizer_source
from tnlit.models.weights import load_teacher

__all__ = [
    "MODELS",
    "PRETRAINED",
    "ModelNotFoundError",
    "cache_root",
    "load_model",
    "load_teacher",
    "model_names",
    "pretrained_dir",
    "register_model",
    "tokenizer_source",
]
