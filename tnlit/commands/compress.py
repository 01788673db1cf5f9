"""``tnlit compress``: the pipeline (:func:`tnlit.pipeline.compress`, whose signature and docstring are this
command's options and help), and what it prints when it ends."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from tnlit.pipeline import compress

__all__ = ["compress", "print_result"]


def print_result(state: dict[str, Any]) -> None:
    """The metrics and times of a finished run as JSON on stdout, then the way out: the whole-model CR, the final
    metric, where the student is and the ``tnlit export`` command to run next."""
    print(json.dumps({k: state.get(k) for k in ("teacher_metric", "init_metric", "metrics", "times")}, indent=2))
    compression = state.get("compression") or {}
    lines = []
    if compression:
        lines.append(
            f"whole-model CR {compression['compression_rate']:.4f} ({compression['params_before']:,} -> "
            f"{compression['params_after']:,} parameters)"
        )
    if state.get("teacher_metric") is not None:
        lines.append(f"teacher {_metric(state['teacher_metric'])}; student {_metric(state.get('final_metric'))}")
    if state.get("student_path"):
        run_dir = Path(state["student_path"]).parent
        lines.append(f"student: {state['student_path']}  (python: tnlit.load_student({str(run_dir)!r}))")
        out = run_dir.with_name(run_dir.name + "-export")
        lines.append(f"next: tnlit export --run_dir {shlex.quote(str(run_dir))} --out {shlex.quote(str(out))}")
    print("\n".join(lines))


def _metric(values: Any) -> str:
    if not isinstance(values, dict):
        return str(values)
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
