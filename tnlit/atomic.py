"""Atomic file writes: write beside the target, then rename over it, so a kill never leaves half a file."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["atomic_csv", "atomic_path", "atomic_png", "atomic_text"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_csv(
    path: str | Path,
    rows: Iterable[Mapping[str, Any]],
    fields: Sequence[str],
    extrasaction: Literal["raise", "ignore"] = "raise",
) -> None:
    """Write ``rows`` as CSV under the header ``fields`` to ``path`` atomically; ``extrasaction="ignore"`` drops
    keys outside ``fields`` (the default refuses them, as ``csv.DictWriter`` does)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), extrasaction=extrasaction, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_text(path, out.getvalue())


def atomic_png(fig: Any, path: str | Path) -> None:
    """Lay out a matplotlib figure, write it to ``path`` as PNG (120 dpi) atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
