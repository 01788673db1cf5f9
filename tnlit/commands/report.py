"""``tnlit report``: tensorize a model by a plan and print what each layer costs and keeps."""

from __future__ import annotations

from pathlib import Path

from tnlit.models import load_model
from tnlit.tensorize import CompressionReport, TensorizePlan, estimate, tensorize

__all__ = ["report"]


def report(
    model: str,
    plan: TensorizePlan,
    pretrained: bool = False,
    dry_run: bool = False,
    csv: Path | None = None,
    json: Path | None = None,
) -> CompressionReport:
    """Tensorize a model by a plan and print the compression report: one row per layer, then the whole model.

    Args:
        model: A built-in name (tiny-gpt2, gpt2-xl-arch), a torchvision model name (resnet34), a local
            Hugging Face model directory, or a Hugging Face hub name.
        plan: The tensorization plan: rules (pattern, format, cr | rank | bond_dim, sites) and exclude.
        pretrained: Load pretrained weights for a torchvision name (otherwise random weights).
        dry_run: Count parameters from closed forms only: no weights, no decomposition, no error column.
            The model is built on the meta device, so GPT-2 XL takes seconds and no memory.
        csv: Also write the per-layer rows to this CSV file.
        json: Also write the report (rows and whole-model counts) to this JSON file.
    """
    net = load_model(model, pretrained=pretrained, meta=dry_run)
    if dry_run:
        result = estimate(net, plan)
    else:
        _, result = tensorize(net, plan)
    print(result)
    if csv is not None:
        result.to_csv(csv)
    if json is not None:
        result.to_json(json)
    return result
