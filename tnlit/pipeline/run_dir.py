"""A run directory: the config it belongs to (its identity), what is done (``state.json``), and the weight files of
finished work; opened, resumed or refused here.

```
run_dir/
  .lock              held by the process running the run (tnlit.pipeline.lock): its PID and host
  config.json        the config this directory belongs to (a different one is refused unless overwrite)
  state.json         what is done, the metrics and the times so far (rewritten atomically, with its checksum inside),
                     and ``inputs``: the identity (sha256) of the teacher's weights and of the data files
  report.csv/.json   the compression report (choices.csv: the candidates that format auto weighed)
  init.safetensors   the factors fitted to calibration inputs, when init.method is activation
  ckpt/<phase>/      Lightning's last.ckpt of the phase in progress (trainable tensors only)
  slices/<name>.safetensors   each finished slice's factors
  global.safetensors the factors after global finetuning
  cache/             the activation store of the cache and serial modes (tnlit.activations.store)
  student.safetensors          the assembled student
  *.sha256           beside every weight file and checkpoint: its checksum, recorded when it was written
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

from tnlit.activations.store import teacher_fingerprint
from tnlit.atomic import atomic_text
from tnlit.checksums import file_sha256, json_checksum, sidecar, verified_problem, write_verified
from tnlit.methods.common import factor_parameters
from tnlit.slices import Slice, SliceModule
from tnlit.tensorize import Rule, TensorizePlan

__all__ = [
    "Run",
    "RunDirError",
    "data_files",
    "datamodule_from_config",
    "device_for",
    "factor_state",
    "identity",
    "open_run_dir",
    "plain",
    "read_json",
    "read_run_config",
    "read_state",
    "refuse_another",
    "register_datamodule",
    "run_inputs",
    "usable",
]


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
        """Write ``state.json`` atomically, with the checksum of its content inside (``checksum``)."""
        state = {**self.state, "checksum": json_checksum(self.state)}
        atomic_text((self.state_dir or self.dir) / "state.json", json.dumps(state, indent=2) + "\n")

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
        if not all(f.exists() for f in files) or not all([usable(f) for f in files]):
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
        state = read_state(rank_dir / "state.json")
        return replace(self, **{"dir": rank_dir, "state": state, "shared": self.root, **changes})


def factor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable factors by parameter name (what slice, init and global files hold)."""
    ids = {id(p) for p in factor_parameters([module])}
    return {n: p for n, p in module.named_parameters() if id(p) in ids}


def save_factors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to a safetensors file atomically, its checksum recorded beside it."""
    write_verified(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


def usable(path: Path) -> bool:
    """Whether a weight file of the run is there and its bytes are those recorded when it was written. A damaged one
    is said, naming it, and set aside (``<file>.corrupt``): the piece it held is computed again, never loaded."""
    problem = verified_problem(path)
    if problem is None:
        return True
    if problem != "missing":
        warnings.warn(f"{path} is {problem}; set aside as {path.name}.corrupt and computed again", stacklevel=2)
        path.replace(path.with_name(path.name + ".corrupt"))
        sidecar(path).unlink(missing_ok=True)
    return False


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
        if key in ("progress", "log", "eval_each_epoch", "trust_run_dir"):  # shown and recorded, not computed
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
    defaults = plain(
        {
            name: p.default
            for name, p in inspect.signature(defaults_of).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    )
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
    # Where the run is and whether it may be discarded are not what it computes: a moved run directory resumes.
    config = {k: v for k, v in _with_defaults(config, defaults_of).items() if k not in ("run_dir", "overwrite")}
    if isinstance(config.get("init"), dict) and config["init"].get("method") == "svd":
        config = {**config, "init": {"method": "svd"}}
    return config


def refuse_another(run_dir: Path, config: dict[str, Any], overwrite: bool, defaults_of: Callable[..., Any]) -> None:
    """Raise RunDirError when the directory holds a run of another config and overwrite is off; reads only."""
    saved = run_dir / "config.json"
    if overwrite or not saved.exists():
        return
    old, config = identity(read_run_config(run_dir), defaults_of), identity(config, defaults_of)
    if old != config:
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise RunDirError(
            f"{run_dir} holds a run of another config (differs in: {', '.join(changed)}); give another run_dir, "
            "or overwrite=true to discard that run"
        )


def open_run_dir(
    run_dir: Path,
    config: dict[str, Any],
    overwrite: bool,
    defaults_of: Callable[..., Any],
    inputs_of: Callable[[dict[str, Any]], dict[str, Any]] = lambda previous: {},
) -> dict[str, Any]:
    """The run's state: fresh, or resumed when the directory holds a run of the same config and inputs.

    ``inputs_of(previous)`` gives the identity of what the run reads besides its config (:func:`run_inputs`; given the
    identity recorded before, to reuse its hashes of unchanged files). A run whose inputs changed is refused, or with
    ``overwrite`` discarded; one that recorded none (made before tnlit kept them) adopts them.
    """
    refuse_another(run_dir, config, overwrite, defaults_of)
    saved = run_dir / "config.json"
    if saved.exists() and overwrite and _another_config(run_dir, config, defaults_of):
        _clear(run_dir)
    state = read_state(run_dir / "state.json")
    inputs = inputs_of(state.get("inputs") or {})
    if (changed := _changed_inputs(state.get("inputs"), inputs)) and overwrite:
        _clear(run_dir)
        state = {}
    elif changed:
        raise RunDirError(
            f"{run_dir} was made with another {' and another '.join(changed)} than this run reads now: never a mix "
            "of the two. Restore it, give another run_dir, or overwrite=true to start afresh"
        )
    elif state and "inputs" not in state:
        warnings.warn(
            f"{run_dir} recorded no identity of its teacher and data (an older run): adopting them now", stacklevel=2
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        atomic_text(saved, json.dumps(config, indent=2) + "\n")
    state["inputs"] = inputs
    return state


def _clear(run_dir: Path) -> None:
    """Delete everything in the run directory but its lock (held by this process): overwrite."""
    for child in run_dir.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _another_config(run_dir: Path, config: dict[str, Any], defaults_of: Callable[..., Any]) -> bool:
    """Whether the directory's config.json is another config's, or unreadable."""
    try:
        return identity(read_run_config(run_dir), defaults_of) != identity(config, defaults_of)
    except RunDirError:
        return True


def _changed_inputs(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between two records of :func:`run_inputs`, in words ("teacher (weights x)", "data file y")."""
    if not old:
        return []
    changed = []
    if old.get("teacher", {}).get("sha256") != new.get("teacher", {}).get("sha256"):
        changed.append(f"teacher (weights {new.get('teacher', {}).get('weights') or 'by name'})")
    files = set(old.get("data_files", {})) | set(new.get("data_files", {}))
    changed += [
        f"data file {f}"
        for f in sorted(files)
        if old.get("data_files", {}).get(f, {}).get("sha256") != new.get("data_files", {}).get(f, {}).get("sha256")
    ]
    return changed


def _file_identity(path: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    """A file's size, mtime and sha256; the hash is taken from ``previous`` when size and mtime are unchanged."""
    stat = path.stat()
    known = previous or {}
    if known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns and "sha256" in known:
        return known
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def data_files(data: LightningDataModule) -> dict[str, Path]:
    """The files a DataModule reads by its hyper-parameters: those named ``*file*`` (``data_files``, ...), by key."""
    found = {}
    for key, value in dict(getattr(data, "hparams", {})).items():
        if "file" not in key or value is None:
            continue
        for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            found[f"{key}[{i}]" if isinstance(value, (list, tuple)) else key] = Path(item).expanduser()
    return found


def run_inputs(
    model: nn.Module,
    weights: Path | None,
    data: LightningDataModule,
    previous: dict[str, Any],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The identity of what a run reads besides its config: the teacher's content (sha256 over its state_dict, as
    loaded; kept with the weights file's path, size and mtime, and taken from ``previous`` when those are unchanged;
    ``fingerprint`` when the caller has it already) and each data file's sha256 (idem)."""
    old = previous.get("teacher", {})
    teacher: dict[str, Any] = {"weights": None if weights is None else str(Path(weights).resolve())}
    if weights is not None and old.get("weights") == teacher["weights"]:
        stat = Path(weights).stat()
        if (old.get("size"), old.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            teacher = old
    if "sha256" not in teacher:
        if weights is not None:
            stat = Path(weights).stat()
            teacher.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        teacher["sha256"] = fingerprint or teacher_fingerprint(model)
    files = {
        str(p.resolve()): _file_identity(p, previous.get("data_files", {}).get(str(p.resolve())))
        for p in data_files(data).values()
        if p.is_file()
    }
    return {"teacher": teacher, "data_files": files}


# ------------------------------------------------------------------------------------------ reading a run directory


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run directory; RunDirError naming it (and ``what`` to do) when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} is unreadable ({err}): {what}") from err


def read_state(path: Path) -> dict[str, Any]:
    """A run's ``state.json`` (``{}`` when absent). One that cannot be read, or whose content differs from the
    checksum inside it, is said and set aside (``state.json.corrupt``): the run starts its record afresh, and its
    finished pieces are still loaded from their (verified) files."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        checksum = state.pop("checksum", None)
        problem = None if checksum in (None, json_checksum(state)) else "its content differs from its checksum"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        problem = f"unreadable ({err})"
    if problem is None:
        return state
    warnings.warn(
        f"{path} cannot be trusted: {problem}; set aside as {path.name}.corrupt: the run's record starts "
        "afresh (finished pieces are kept, metrics measured again)",
        stacklevel=2,
    )
    path.replace(path.with_name(path.name + ".corrupt"))
    return {}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``config.json``; RunDirError naming it when it cannot be read.

    Read only as data: nothing it names is imported here (:func:`datamodule_from_config` does that, guarded)."""
    return read_json(
        Path(run_dir) / "config.json", "restore it, or give the same command with overwrite=true to start afresh"
    )


_REGISTERED: dict[str, type] = {}


def register_datamodule(cls: type) -> type:
    """Allow ``cls`` to be built from a run directory's config (``class_path``) without ``trust``; usable as a class
    decorator. tnlit's own DataModules need no registration."""
    _REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def datamodule_from_config(spec: dict[str, Any], trust: bool = False) -> LightningDataModule:
    """The DataModule a run directory's config names (``class_path`` + ``init_args``).

    A run directory is data that may come from someone else: its class path is imported only when it names one of
    tnlit's own DataModules, one registered with :func:`register_datamodule`, or ``trust`` is on (``--trust_run_dir
    true``); anything else is refused (RunDirError naming the path). The class must be a LightningDataModule.
    """
    import importlib

    path = str(spec.get("class_path", ""))
    module, _, name = path.rpartition(".")
    if path in _REGISTERED:
        cls = _REGISTERED[path]
    elif trust or module == "tnlit" or module.startswith("tnlit."):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise RunDirError(f"the run's data class_path {path!r} cannot be imported ({err})") from err
    else:
        raise RunDirError(
            f"the run directory's config names data class_path {path!r}, which is not tnlit's own: refused (a run "
            "directory may come from anyone). Register the class (tnlit.pipeline.run_dir.register_datamodule), give "
            "the data yourself, or trust_run_dir=true if you trust this directory"
        )
    if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
        raise RunDirError(f"the run's data class_path {path!r} is not a LightningDataModule: refused")
    if not trust and path not in _REGISTERED and not cls.__module__.startswith("tnlit."):
        raise RunDirError(f"the run's data class_path {path!r} resolves outside tnlit ({cls.__module__}): refused")
    return cls(**spec.get("init_args", {}))
