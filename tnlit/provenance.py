"""Provenance sidecars: what produced a results file (command, config, git hash, date, versions, device)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tnlit.atomic import atomic_text

__all__ = ["provenance", "write_provenance"]

_PACKAGES = ("tnlit", "torch", "torchvision", "lightning", "transformers", "tensorly", "tensorly-torch", "opt_einsum")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts a results file needs beside it to be trusted and rerun."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config or {},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "packages": versions,
        "device": _device(),
        "platform": platform.platform(),
    }


def write_provenance(path: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write :func:`provenance` as JSON to ``path`` (atomically) and return it."""
    info = provenance(config)
    atomic_text(path, json.dumps(info, indent=2) + "\n")
    return info
