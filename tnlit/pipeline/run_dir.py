"""A run directory: the config it belongs to (its identity), what is done (``state.json``), and the weight files of
finished work; opened, resumed or refused here.

```
run_dir/
  config.json        the config this directory belongs to (a different one is refused unless overwrite)
  state.json         what is done, the metrics and the times so far (rewritten atomically)
  report.csv/.json   the compression report (choices.csv: the candidates that format auto weighed)
  init.safetensors   the factors fitted to calibration inputs, when init.method is activation
  ckpt/<phase>/      Lightning's last.ckpt of the phase in progress (trainable tensors only)
  slices/<name>.safetensors   each finished slice's factors
  global.safetensors the factors after global finetuning
  cache/             the activation store of the cache and serial modes (tnlit.activations.store)
  student.safetensors          the assembled student
  ranks/rank<r>/     in a torchrun / srun job: that rank's state, checkpoints and store
  logs/<phase>/version_<n>/    CSV metrics, one version a (re)start of the phase
  wandb/             the W&B run's files when log.wandb is on
```
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from safetensors.torch import load_file, save_file
from torch import nn

from tnlit.atomic import atomic_path, atomic_text
from tnlit.methods.common import factor_parameters
from tnlit.slices import Slice, SliceModule
from tnlit.tensorize import Rule, TensorizePlan

__all__ = ["Run", "RunDirError", "device_for", "factor_state", "identity", "open_run_dir", "plain", "refuse_another"]


class RunDirError(RuntimeError):
    """A run directory that belongs to another config, or holds a checkpoint that cannot be used."""


def device_for(accelerator: str) -> str:
    """Where the work outside Lightning's Trainer runs (the store's teacher passes, the init's fit, evaluation)."""
    return "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"


@dataclass
class Run:
    """A run directory in use by this process: where its files go, what is done, and how its phases train.

    In a one-process run ``dir`` and ``shared`` are both the run directory. A rank of a torchrun job keeps its state,
    checkpoints and activation store in its own ``dir`` (``run_dir/ranks/rank<r>``) and writes its finished slices to
    ``shared``, the run directory; only the process with ``writer`` set writes the run's own results.
    """

    dir: Path
    state: dict[str, Any] = field(default_factory=dict)
    shared: Path | None = None
    """Where finished slices and factor files go; None: ``dir``."""
    accelerator: str = "cpu"
    precision: str | None = None
    progress: bool = True
    seed: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)
    """Further Lightning Trainer arguments: ``devices``, ``strategy``, ``num_nodes``, ``callbacks``."""
    loggers: Any = None
    """The run's loggers (tnlit.pipeline.callbacks.Loggers); None: CSV only."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    """The student's metric after every epoch (``eval_each_epoch``), or None."""
    writer: bool = True
    """Whether this process writes the run's results (``global.safetensors``); off on a job's ranks above 0."""
    state_dir: Path | None = None
    """Where ``state.json`` goes when not in ``dir`` (a rank's times during the job's global phase)."""

    @property
    def root(self) -> Path:
        """The run directory itself."""
        return self.shared or self.dir

    @property
    def device(self) -> str:
        return device_for(self.accelerator)

    def save(self) -> None:
        """Write ``state.json`` atomically."""
        atomic_text((self.state_dir or self.dir) / "state.json", json.dumps(self.state, indent=2) + "\n")

    def once(self, key: str | tuple[str, ...], compute: Callable[[], Any]) -> Any:
        """``state[key]`` (a tuple: a nested key), computed and recorded the first time only: a resumed run does not
        compute it again."""
        *outer, last = (key,) if isinstance(key, str) else key
        place = self.state
        for k in outer:
            place = place.setdefault(k, {})
        if last not in place:
            place[last] = compute()
            self.save()
        return place[last]

    def times(self, phase: str) -> dict[str, float]:
        """The phase's seconds in ``state["times"]``: optimisation (forward, backward, step) and wall."""
        return self.state.setdefault("times", {}).setdefault(phase, {"optimisation_s": 0.0, "wall_s": 0.0})

    def slice_file(self, s: Slice) -> Path:
        return self.root / "slices" / f"{s.name}.safetensors"

    def save_slices(self, student: nn.Module, group: list[Slice]) -> None:
        for s in group:
            save_factors(factor_state(SliceModule(student, s)), self.slice_file(s))

    def load_slices(self, student: nn.Module, group: list[Slice]) -> bool:
        """Load the group's finished slices; False (and nothing loaded) unless all of them are finished and sound."""
        files = [self.slice_file(s) for s in group]
        if not all(f.exists() for f in files):
            return False
        try:
            states = [load_file(f) for f in files]
            for s, state in zip(group, states):
                SliceModule(student, s).load_state_dict(state, strict=False)
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
            warnings.warn(
                f"finished slice files {[str(f) for f in files]} are unreadable ({err}); training again", stacklevel=2
            )
            return False
        return True

    def for_rank(self, rank_dir: Path, **changes: Any) -> Run:
        """The same run as a rank of a job sees it: its own directory and state (resumed), results to this one's."""
        state_file = rank_dir / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        return replace(self, **{"dir": rank_dir, "state": state, "shared": self.root, **changes})


def factor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable factors by parameter name (what slice, init and global files hold)."""
    ids = {id(p) for p in factor_parameters([module])}
    return {n: p for n, p in module.named_parameters() if id(p) in ids}


def save_factors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def load_factors(student: nn.Module, path: Path) -> None:
    """Load a factor file into the student; RunDirError when it lacks some of the student's factors."""
    missing = set(factor_state(student)) - set(state := load_file(path))
    if missing:
        raise RunDirError(f"{path} lacks {len(missing)} factor tensors of this student: delete it to retrain")
    student.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------ identity


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON-able data: dataclasses as dicts, the DataModule as class path + hyper-parameters."""
    out = {}
    for key, value in values.items():
        if key in ("progress", "log", "eval_each_epoch"):  # what is shown and recorded, not what is computed
            continue
        if isinstance(value, LightningDataModule):
            cls = type(value)
            value = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.hparams)}
        elif hasattr(value, "__dataclass_fields__"):
            value = asdict(value)
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def _with_defaults(old: dict[str, Any], defaults_of: Callable[..., Any]) -> dict[str, Any]:
    """A saved config with the settings it lacks at their defaults (those of ``defaults_of``'s signature): a setting
    added to tnlit after a run started, left at its default, computes what the run computed, so the run stays
    resumable (and finished)."""
    defaults = plain({name: p.default for name, p in inspect.signature(defaults_of).parameters.items()
                      if p.default is not inspect.Parameter.empty})  # fmt: skip
    defaults["plan"] = plain({"plan": TensorizePlan(rules=[])})["plan"]
    rule = plain({"rule": Rule(pattern=".", format="mpo")})["rule"]

    def fill(value: Any, default: Any) -> Any:
        if not isinstance(value, dict) or not isinstance(default, dict):
            return value
        return {**default, **{k: fill(v, default.get(k)) for k, v in value.items()}}

    filled = fill(old, defaults)
    if isinstance(filled.get("plan"), dict):
        filled["plan"]["rules"] = [fill(r, rule) for r in filled["plan"].get("rules", [])]
    return filled


def identity(config: dict[str, Any], defaults_of: Callable[..., Any]) -> dict[str, Any]:
    """What makes two configs the same run: the config with its missing settings at their defaults, less the
    settings that compute nothing (the activation-aware fit's options when the factors start from the SVD)."""
    config = _with_defaults(config, defaults_of)
    if isinstance(config.get("init"), dict) and config["init"].get("method") == "svd":
        config = {**config, "init": {"method": "svd"}}
    return config


def refuse_another(run_dir: Path, config: dict[str, Any], overwrite: bool, defaults_of: Callable[..., Any]) -> None:
    """Raise RunDirError when the directory holds a run of another config and overwrite is off; reads only."""
    saved = run_dir / "config.json"
    if overwrite or not saved.exists():
        return
    old, config = identity(json.loads(saved.read_text()), defaults_of), identity(config, defaults_of)
    if old != config:
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise RunDirError(
            f"{run_dir} holds a run of another config (differs in: {', '.join(changed)}); give another run_dir, "
            "or overwrite=true to discard that run"
        )


def open_run_dir(
    run_dir: Path, config: dict[str, Any], overwrite: bool, defaults_of: Callable[..., Any]
) -> dict[str, Any]:
    """The run's state: fresh, or resumed when the directory holds a run of the same config."""
    refuse_another(run_dir, config, overwrite, defaults_of)
    saved = run_dir / "config.json"
    if saved.exists() and identity(json.loads(saved.read_text()), defaults_of) != identity(config, defaults_of):
        shutil.rmtree(run_dir)  # overwrite
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        atomic_text(saved, json.dumps(config, indent=2) + "\n")
    state_file = run_dir / "state.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}
