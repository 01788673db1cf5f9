"""Checksums of the files a run directory trusts: sha256 of a file's bytes, recorded beside it when it is written
(``<file>.sha256``) and checked when it is read, so that a damaged file is found and never used.

The checksum is written before the file takes its place, so a kill between the two leaves a file whose bytes do not
match (recomputed), never a damaged file that passes. A file without a recorded checksum (written by tnlit before
checksums) is adopted: its checksum is recorded now, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tnlit.atomic import atomic_path, atomic_text

__all__ = ["file_sha256", "json_checksum", "sidecar", "verified_problem", "write_verified", "written_verified"]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def json_checksum(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys): the checksum ``state.json`` carries inside itself."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def sidecar(path: str | Path) -> Path:
    """Where a file's recorded checksum lives: ``<file>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


@contextmanager
def written_verified(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new bytes to; on success its checksum is recorded, then the file
    takes its place (both atomically)."""
    with atomic_path(path) as tmp:
        yield tmp
        atomic_text(sidecar(path), file_sha256(tmp) + "\n")


def write_verified(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the file; it replaces ``path`` atomically, with its checksum recorded."""
    with written_verified(path) as tmp:
        write(tmp)


def verified_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be trusted ("missing", or its bytes differ from its recorded checksum), or None.

    A file without a recorded checksum is adopted: recorded now (where the file system allows it), with a warning.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    recorded = sidecar(path)
    actual = file_sha256(path)
    if not recorded.is_file():
        warnings.warn(f"{path} has no recorded checksum (written before tnlit kept them): adopting it", stacklevel=3)
        try:
            atomic_text(recorded, actual + "\n")
        except OSError:  # a read-only run directory: nothing recorded, the file is still read
            pass
        return None
    if recorded.read_text().strip() != actual:
        return "damaged: its bytes differ from the checksum recorded when it was written (corrupt or truncated)"
    return None
