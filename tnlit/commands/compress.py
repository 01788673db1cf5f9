"""``tnlit compress``: the pipeline (:func:`tnlit.pipeline.compress`, whose signature and docstring are this
command's options and help), and what it prints when it ends."""

from __future__ import annotations

import json
from typing import Any

from tnlit.pipeline import compress

__all__ = ["compress", "print_result"]


def print_result(state: dict[str, Any]) -> None:
    """The metrics and times of a finished run, as JSON on stdout."""
    print(json.dumps({k: state.get(k) for k in ("teacher_metric", "init_metric", "metrics", "times")}, indent=2))
