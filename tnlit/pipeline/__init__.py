"""``compress()`` and what it is made of: ``settings`` (its options, checked once), ``run_dir`` (the run directory:
identity, state, files), ``phases`` (init fit, slice-wise, global), ``callbacks`` (timer, per-epoch evaluation,
loggers), ``parallel`` (a torchrun job's share) and ``recipe`` (``compress()`` itself, which reads top to bottom; a
module named compress.py would be shadowed here by the function of that name)."""

from tnlit.models.weights import load_teacher
from tnlit.pipeline.recipe import compress
from tnlit.pipeline.run_dir import Run, RunDirError
from tnlit.pipeline.settings import FinetuneSettings, InitSettings, LogSettings, SliceSettings

__all__ = [
    "FinetuneSettings",
    "InitSettings",
    "LogSettings",
    "Run",
    "RunDirError",
    "SliceSettings",
    "compress",
    "load_teacher",
]
