"""Rebuild a tensorized architecture from its compression report alone: no decomposition, no teacher weights.

A report row (``report.json``'s ``layers``) names a module, its format, the dense weight's shape in the module's own
layout, the MPO site dims and the ranks; with the dense architecture's module at that name (for its bias, stride,
padding) that is all a layer needs to be built at the right shapes. The factors are then loaded from a weights file
(``student.safetensors``, an export's ``model.safetensors``): :func:`tnlit.export.load_student`, and the modeling
code an export writes for Hugging Face (``trust_remote_code``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from torch import nn

from tnlit.layers.base import TensorizedLayer, is_hf_conv1d
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear

__all__ = ["LAYER_KEYS", "layer_rows", "parse_site_dims", "tensorize_architecture"]

LAYER_KEYS = ("name", "format", "module_type", "shape", "site_dims", "ranks")
"""What a report row must hold for its layer to be rebuilt (an export's config keeps these)."""


def parse_site_dims(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``"8x8 -> 8x12"`` (the report's ``site_dims``) as ``((8, 8), (8, 12))``."""
    left, sep, right = text.partition("->")
    if not sep:
        raise ValueError(f"MPO site dims must read 'in_dims -> out_dims' (e.g. '8x8 -> 8x12'), got {text!r}")
    return tuple(int(d) for d in left.strip().split("x")), tuple(int(d) for d in right.strip().split("x"))


def layer_rows(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Report rows (LayerReport or dicts) reduced to :data:`LAYER_KEYS`, as JSON-able dicts."""
    out = []
    for row in rows:
        d = asdict(row) if is_dataclass(row) else dict(row)
        missing = [k for k in LAYER_KEYS if k not in d]
        if missing:
            raise ValueError(f"report row {d.get('name', d)!r} lacks {', '.join(missing)}: not a tnlit report row")
        out.append({k: d[k] for k in LAYER_KEYS})
    return out


def _layer(row: Mapping[str, Any], module: nn.Module) -> TensorizedLayer:
    """An (untrained) tensorized layer with the row's shapes, in place of the dense ``module``."""
    fmt, ranks = row["format"], [int(r) for r in row["ranks"]]
    w = getattr(module, "weight", None)
    kw = {"device": w.device if w is not None else None, "dtype": w.dtype if w is not None else None}
    if fmt == "tucker":
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"report row {row['name']!r} is a tucker layer; the model has a {type(module).__name__}")
        return TuckerConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            ranks,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
            **kw,
        )
    if isinstance(module, nn.Linear):
        layout, (d_out, d_in) = "linear", row["shape"]
    elif is_hf_conv1d(module):
        layout, (d_in, d_out) = "conv1d", row["shape"]
    else:
        raise ValueError(f"report row {row['name']!r} is a {fmt} layer, but the model has a {type(module).__name__}")
    bias = module.bias is not None
    if fmt == "lowrank":
        return LowRankLinear(d_in, d_out, ranks[0], bias=bias, layout=layout, **kw)
    if fmt == "mpo":
        in_dims, out_dims = parse_site_dims(row["site_dims"])
        return MPOLinear(in_dims, out_dims, ranks, bias=bias, layout=layout, **kw)
    raise ValueError(
        f"report row {row['name']!r}: unknown format {fmt!r} (a report of tensorize names mpo, lowrank, tucker)"
    )


def tensorize_architecture(model: nn.Module, rows: Iterable[Any]) -> nn.Module:
    """Replace, in place, each module a report row names by an untrained tensorized layer of the row's shapes.

    The factors hold random values until a state dict is loaded into the model. Returns ``model``.
    """
    for row in layer_rows(rows):
        name = row["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} that the report tensorized (another model)") from None
        if isinstance(module, TensorizedLayer):
            continue  # already rebuilt (a model class that tensorizes itself)
        weight = getattr(module, "weight", None)
        own = list(weight.shape) if weight is not None else None
        if own is not None and own != list(row["shape"]):
            raise ValueError(
                f"module {name!r} has a weight of shape {own}, the report's row says {list(row['shape'])}: another "
                "architecture"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _layer(row, module))
    return model
