"""The on-disk activation store: the teacher's activations at every slice's entry and exit, one shard a batch.

```
<root>/
  manifest.json              format version, teacher and data fingerprints, storage dtype, slices, shards, complete
  shard-000000.safetensors   training batch 0: "<slice>/input" and "<slice>/target" for every slice
  shard-000001.safetensors   ...
```

``open_store`` makes a store fit to use. It validates what is there, then fills in what is missing with one pass
over the DataModule's training batches (seeded, so the pass gives the same batches every time) and one teacher
forward per missing shard (``capture``: every slice at once, stopping after the last exit):

- a manifest of another teacher, data, storage dtype, slice set or format version is said (what differs) and
  the store rebuilt;
- a shard that is missing, or whose bytes do not match the manifest's checksum, is said (by name) and recomputed:
  each shard is a self-contained pair of (model input, teacher activations), so the others stay good;
- a shard whose recorded input hash differs from the batch the data gives now is said and recomputed;
- an interrupted build (``complete: false``) resumes: shards already written are kept.

``ActivationStore`` reads a finished store back, any subset of slices, as float32 (``tnlit.data.activations``
wraps it in a DataModule). A store is written by one process at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, seed_everything
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from tqdm import tqdm

from tnlit.activations.capture import batch_input, capture
from tnlit.atomic import atomic_path, atomic_text
from tnlit.checksums import file_sha256
from tnlit.slices import Slice
from tnlit.types import StorageDtype

__all__ = [
    "FORMAT_VERSION",
    "ActivationStore",
    "data_fingerprint",
    "open_store",
    "teacher_fingerprint",
    "tensor_sha256",
]

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
# While building, the manifest is rewritten at most this often: a kill loses at most this much finished work
# (shards on disk that the manifest does not list yet are recomputed), and a store of 10^5 shards is not
# rewritten 10^5 times.
_MANIFEST_EVERY_S = 10.0


# ------------------------------------------------------------------------------------------ fingerprints


def _hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    # The raw bytes, whatever the dtype (numpy has no bfloat16): viewed as uint8, no copy on CPU.
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state_dict: every entry's name, shape, dtype and bytes."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes (a batch's model input, in the manifest)."""
    h = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
    _hash_tensor(h, tensor)
    return h.hexdigest()


def data_fingerprint(data: LightningDataModule, seed: int) -> dict[str, Any]:
    """What decides the training batches: the DataModule's class path and hyper-parameters, and the seed of the pass
    (the loader's shuffling and augmentation draw from it)."""
    cls = type(data)
    value = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(data.hparams), "seed": seed}
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------------------ reading


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The store's manifest, or None when there is none (an unreadable one is said, and counts as none)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"activation store manifest {path} is unreadable ({err}); rebuilding the store", stacklevel=3)
        return None


class ActivationStore:
    """A finished activation store, read back batch by batch. ``open_store`` validates it; reading does not."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if manifest is None or not manifest.get("complete"):
            raise FileNotFoundError(f"{self.root} holds no finished activation store: build it with open_store()")
        self.manifest = manifest
        self.slice_names: list[str] = [s["name"] for s in manifest["slices"]]
        self.built = 0
        """Shards that ``open_store`` computed when it opened this store (0: reused as it was)."""

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    def read(self, index: int, slices: Sequence[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Batch ``index`` as ``{slice name: (input, target)}`` in float32, reading only those slices' tensors."""
        names = self.slice_names if slices is None else list(slices)
        with safe_open(self.root / self.manifest["shards"][index]["file"], framework="pt") as f:
            return {n: (f.get_tensor(f"{n}/input").float(), f.get_tensor(f"{n}/target").float()) for n in names}


# ------------------------------------------------------------------------------------------ building


def open_store(
    root: str | Path,
    teacher: nn.Module,
    data: LightningDataModule,
    slices: Sequence[Slice],
    *,
    seed: int = 0,
    dtype: StorageDtype = "float32",
    device: str | torch.device = "cpu",
    autocast: torch.dtype | None = None,
    check_inputs: bool = True,
    progress: bool = True,
) -> ActivationStore:
    """Open the activation store at ``root`` for this teacher, data and slices, building whatever it lacks.

    Args:
        root: The store's directory (created if needed). Only ``manifest.json`` and ``shard-*`` files in it are
            ever written or deleted.
        teacher: The dense model; run in eval mode on ``device`` (it is moved there).
        data: The DataModule, set up for ``fit``: its ``train_dataloader()`` gives the batches, one shard each.
        slices: The slices whose entry input and exit output are stored.
        seed: Seeds everything before the pass over the data, so that every pass gives the same batches.
        dtype: Storage dtype of the activations (``float32``, ``bfloat16`` or ``float16``); read back as float32.
        device: Where the teacher runs.
        autocast: Run the teacher under autocast to this dtype (as ``bf16-mixed`` training would); None: as it is.
        check_inputs: Also check a finished store's shards against the data's batches (one pass over the data,
            no teacher forwards); off, a finished store whose shards match their checksums is used as it is.
        progress: Show a progress bar over the batches.
    """
    root = Path(root)
    if dtype not in _DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    header = {
        "format": FORMAT_VERSION,
        "teacher": teacher_fingerprint(teacher),
        "data": data_fingerprint(data, seed),
        "dtype": dtype,
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        "slices": [{"name": s.name, "entry": s.entry, "exit": s.exit} for s in slices],
    }
    manifest = _read_manifest(root)
    if manifest is not None and (changed := [k for k in header if manifest.get(k) != header[k]]):
        warnings.warn(
            f"activation store {root} was built for something else (differs in: {', '.join(changed)}); rebuilding it",
            stacklevel=2,
        )
        manifest = None
    if manifest is None:  # start afresh: nothing of another store, or of an unlisted build, is kept
        (root / MANIFEST).unlink(missing_ok=True)
        _remove_shards(root, keep=0)
    shards: list[dict[str, Any] | None] = list(manifest.get("shards", [])) if manifest else []
    bad: dict[str, list[str]] = {}
    for i, entry in enumerate(shards):
        if entry is not None and (problem := _shard_problem(root, entry)):
            bad.setdefault(problem, []).append(entry["file"])
            shards[i] = None
    for problem, files in bad.items():
        warnings.warn(f"activation store {root}: shard(s) {_listing(files)} {problem}; recomputing them", stacklevel=2)
    if manifest is not None and manifest.get("complete") is not True:
        done = sum(entry is not None for entry in shards)
        warnings.warn(
            f"activation store {root}: its build was interrupted ({done} shards kept); completing it", stacklevel=2
        )
    sound = manifest is not None and manifest.get("complete") is True and all(shards)
    if sound and not check_inputs:
        built = 0
    else:
        built = _fill(root, header, shards, teacher, data, slices, seed, dtype, device, autocast, sound, progress)
    store = ActivationStore(root)
    store.built = built
    return store


def _shard_problem(root: Path, entry: dict[str, Any]) -> str | None:
    """Why a recorded shard cannot be used, or None when its bytes are the ones recorded."""
    path = root / entry["file"]
    if not path.is_file():
        return "missing"
    if file_sha256(path) != entry["sha256"]:
        return "damaged (bytes differ from the manifest's checksum: corrupt or truncated)"
    return None


def _listing(files: list[str], most: int = 8) -> str:
    return ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")


def _fill(
    root: Path,
    header: dict[str, Any],
    shards: list[dict[str, Any] | None],
    teacher: nn.Module,
    data: LightningDataModule,
    slices: Sequence[Slice],
    seed: int,
    dtype: StorageDtype,
    device: str | torch.device,
    autocast: torch.dtype | None,
    sound: bool,
    progress: bool,
) -> int:
    """One pass over the training batches: compute every shard that is missing, bad or of another batch."""
    seed_everything(seed, workers=True, verbose=False)  # the same batches as every earlier pass
    loader = data.train_dataloader()
    total = len(loader) if hasattr(loader, "__len__") else None
    was_training = teacher.training
    teacher.eval().to(device)
    built, count, written = 0, 0, time.monotonic() - _MANIFEST_EVERY_S
    other_batch: list[str] = []
    bar = tqdm(loader, total=total, desc="caching activations", unit="batch", disable=not progress)
    try:
        for i, batch in enumerate(bar):
            count = i + 1
            x = batch_input(batch)
            x_hash = tensor_sha256(x)
            entry = shards[i] if i < len(shards) else None
            if entry is not None and entry["input_sha256"] == x_hash:
                continue
            if entry is not None:
                other_batch.append(entry["file"])
            entry = _compute_shard(root, i, teacher, x, slices, dtype, device, autocast, x_hash)
            shards.extend([None] * (i + 1 - len(shards)))
            shards[i] = entry
            built += 1
            if time.monotonic() - written >= _MANIFEST_EVERY_S:
                _write_manifest(root, header, shards, complete=False)
                written = time.monotonic()
    finally:
        bar.close()
        teacher.train(was_training)
        if other_batch:
            warnings.warn(
                f"activation store {root}: shard(s) {_listing(other_batch)} were computed from other batches than "
                "the data gives now; recomputed them",
                stacklevel=3,
            )
    if built or not sound or len(shards) != count:
        del shards[count:]  # the data now gives fewer batches than the store held
        _write_manifest(root, header, shards, complete=True)
        _remove_shards(root, keep=count)
    return built


@torch.no_grad()
def _compute_shard(
    root: Path,
    index: int,
    teacher: nn.Module,
    x: torch.Tensor,
    slices: Sequence[Slice],
    dtype: StorageDtype,
    device: str | torch.device,
    autocast: torch.dtype | None,
    x_hash: str,
) -> dict[str, Any]:
    """Run the teacher on one batch, write its shard atomically, and return the shard's manifest entry."""
    device = torch.device(device)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        pairs = capture(teacher, x.to(device), slices)
    # copy=True: one slice's exit is often the next slice's entry (the same tensor), and a shard may not hold
    # two views of one storage.
    tensors = {
        f"{name}/{role}": t.to(device="cpu", dtype=_DTYPES[dtype], memory_format=torch.contiguous_format, copy=True)
        for name, pair in pairs.items()
        for role, t in zip(("input", "target"), pair)
    }
    blob = save(tensors, metadata={"input_sha256": x_hash})
    path = root / _shard_name(index)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return {
        "file": path.name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "input_sha256": x_hash,
        "shapes": {key: list(t.shape) for key, t in tensors.items()},
    }


def _write_manifest(root: Path, header: dict[str, Any], shards: list[dict[str, Any] | None], complete: bool) -> None:
    atomic_text(root / MANIFEST, json.dumps({**header, "complete": complete, "shards": shards}, indent=1) + "\n")


def _remove_shards(root: Path, keep: int) -> None:
    """Delete the shard files from index ``keep`` on (and temporary files a kill left), nothing else."""
    if not root.is_dir():
        return
    for path in root.glob("shard-*.safetensors*"):
        index = path.name.removeprefix("shard-").split(".", 1)[0]
        if path.name.endswith(".tmp") or not index.isdigit() or int(index) >= keep:
            path.unlink(missing_ok=True)
