"""Checks of a run's inputs that need the teacher or the data loaded, made before the run directory is written: a
setting that cannot work fails here, naming it, and never claims the directory (which would then refuse the corrected
config). The checks of the settings alone are :func:`tnlit.pipeline.settings.check_settings`."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from tnlit.pipeline.run_dir import data_files

__all__ = ["check_data", "check_teacher"]


def check_teacher(model: nn.Module, name: str) -> None:
    """Every weight of the teacher is finite (NaN or inf weights break the SVDs and every loss)."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"teacher {name!r} has non-finite (NaN or inf) weights in {', '.join(bad[:5])}{more}: "
            "give sound teacher weights"
        )


def _positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_data(data: LightningDataModule, model: nn.Module) -> None:
    """The DataModule's batch size is at least 1, its sequences fit the model's positions, and the files it names
    (``data_files``, ...) exist and are not empty."""
    batch_size = getattr(data, "batch_size", None)
    if isinstance(batch_size, int) and batch_size < 1:
        raise ValueError(f"data batch_size must be at least 1, got {batch_size}")
    seq_len, positions = getattr(data, "seq_len", None), _positions(model)
    if isinstance(seq_len, int) and positions is not None and seq_len > positions:
        raise ValueError(
            f"data seq_len={seq_len} is longer than the teacher's {positions} positions: give seq_len <= {positions}"
        )
    if isinstance(seq_len, int) and seq_len < 1:
        raise ValueError(f"data seq_len must be at least 1, got {seq_len}")
    for key, path in data_files(data).items():
        if not path.is_file():
            raise FileNotFoundError(f"data {key}: {path} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"data {key}: {path} is empty")
