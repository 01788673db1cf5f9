"""A teacher by name with its trained weights: a safetensors file or a ``tnlit fit`` (Lightning) checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_model
from torch import nn

from tnlit.models.registry import load_model

__all__ = ["load_teacher"]


def load_teacher(name: str, weights: Path | None = None) -> nn.Module:
    """A teacher by name, with its weights from a safetensors file or a ``tnlit fit`` checkpoint when given."""
    model = load_model(name)
    if weights is None:
        return model
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher weights {weights} do not exist: train the teacher first (tnlit fit)")
    try:
        if weights.suffix == ".safetensors":
            # load_model, not load_file: a file written by save_model holds one copy of tied weights.
            load_safetensors_model(model, weights, strict=True)
            return model
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "state_dict" in str(err):  # the file is sound but belongs to another architecture
            raise ValueError(f"teacher weights {weights} do not fit model {name!r}: {err}") from err
        raise ValueError(f"teacher weights {weights} are unreadable ({err}): train the teacher again") from err
    except Exception as err:  # noqa: BLE001 - a truncated file raises several types
        raise ValueError(f"teacher weights {weights} are unreadable ({err}): train the teacher again") from err
    state = ckpt.get("state_dict", ckpt)
    # A LightningModule keeps the network under one attribute ("model."): strip it.
    prefixes = {k.split(".", 1)[0] for k in state}
    if len(prefixes) == 1:
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"teacher weights {weights} do not fit model {name!r}: {err}") from err
    return model
