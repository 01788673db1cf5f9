"""Slice-parallel ``compress``: the slices split across the processes of a torchrun or SLURM job.

``torchrun --nproc_per_node N tnlit compress --config X.yaml`` (or ``srun`` with N tasks) runs one ``compress``
per process. Slices share no parameters, so there is no gradient to synchronise: each rank trains its own share of
the slices with its own single-device Trainers, exactly as a one-process run would train them, and writes each
finished slice's factors into the shared run directory. Rank 0 claims the run directory, waits until every rank is
done, then assembles, evaluates and writes the student once.

- **Shares**: consecutive slices, balanced by their parameter counts (:func:`partition`); a rank's teacher forward
  stops after its last slice (``tnlit.activations.capture``), so the first ranks run only a prefix of the teacher.
- **Per-rank work**: each rank keeps its state, epoch checkpoints and activation store under
  ``run_dir/ranks/rank<r>/``; its training times are merged into rank 0's ``state.json`` (``times`` and
  ``distributed``). Rerunning resumes: finished slices are loaded, not trained again, whatever the number of ranks.
- **Global phase** (``global``, or the hybrid's second half): every rank trains it together under Lightning's DDP
  (this process group: NCCL for CUDA tensors, gloo otherwise), the data split between ranks by Lightning's
  distributed sampler; rank 0 writes the result and the run's state, each other rank its times in its directory.
- **Failures**: torch.distributed's key-value store is the only channel (the process group uses gloo, for
  coordination only: no tensor is ever communicated). A rank whose call raises posts its error there; the others
  look for it after every training step and while they wait, and raise :class:`PeerFailure` naming the rank and its
  error, so every rank ends with the error instead of waiting forever. A rank killed outright is torchrun's to
  handle (it stops the others).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer

__all__ = ["PeerFailure", "Ranks", "current", "join", "launched", "partition"]

_PREFIX = "tnlit/"
# How often a waiting rank looks at the store, and at most how often a training rank does (a store lookup is a
# network round trip: once a step would slow down small steps).
_POLL_S = 0.2
# How long a failing rank waits for the others to have read its error before it exits (torchrun stops the others
# as soon as one process ends, which could cut off their report of the error).
_ACK_S = 60.0


class PeerFailure(RuntimeError):
    """Another rank of the job failed: this rank stops too, with that rank's error."""


def launched() -> bool:
    """Whether torchrun or srun started this process as one of several (WORLD_SIZE or SLURM_STEP_NUM_TASKS above 1)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    # The step's task count, not the allocation's (SLURM_NTASKS): a batch script that runs one python in an
    # allocation of several tasks is one process, and would wait forever for the others.
    return SLURMEnvironment.detect() and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


@dataclass
class Ranks:
    """This process's place in the job, and the key-value store that the ranks share."""

    rank: int
    world_size: int
    local_rank: int
    store: Any = field(repr=False)
    _checked: float = field(default=0.0, repr=False)

    @property
    def main(self) -> bool:
        """Rank 0: claims the run directory, evaluates, assembles the student."""
        return self.rank == 0

    def devices(self, accelerator: str) -> list[int] | int:
        """Lightning's ``devices`` for this rank: its own GPU (the local rank's), or one CPU process."""
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return [self.local_rank] if on_gpu else 1

    def ddp(self, accelerator: str) -> dict[str, Any]:
        """Lightning's arguments for a phase that every rank trains together (the global phase: DDP)."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0])
        local = local or self.world_size
        return {"strategy": "ddp", "devices": local, "num_nodes": max(1, self.world_size // local)}

    # ------------------------------------------------------------------ signals

    def announce(self, what: str) -> None:
        """Say that ``what`` is done (every rank can wait for it)."""
        self.store.set(_PREFIX + what, "1")

    def wait_for(self, whats: Sequence[str]) -> None:
        """Wait until every one of ``whats`` is announced; raise :class:`PeerFailure` when a rank fails meanwhile."""
        keys = [_PREFIX + w for w in whats]
        while not self.store.check(keys):
            self.check(force=True)
            time.sleep(_POLL_S)
        self.check(force=True)

    def check(self, force: bool = False) -> None:
        """Raise :class:`PeerFailure` when another rank has failed (at most every ``_POLL_S`` unless forced)."""
        now = time.monotonic()
        if not force and now - self._checked < _POLL_S:
            return
        self._checked = now
        if self.store.check([_PREFIX + "failed"]):
            message = self.store.get(_PREFIX + "failed").decode()
            # Said before the acknowledgement: torchrun may stop this process as soon as the failed rank has exited.
            print(f"tnlit rank {self.rank}: stopping, {message}", file=sys.stderr, flush=True)
            self.store.set(_PREFIX + f"ack/{self.rank}", "1")
            raise PeerFailure(message)

    def fail(self, err: BaseException) -> None:
        """Post this rank's error for the others (the first failure wins), and give them time to read it."""
        message = f"rank {self.rank} of {self.world_size} failed: {type(err).__name__}: {err}"
        # compare_set writes only when the key is absent (expected ""): a later failure does not hide the first.
        self.store.compare_set(_PREFIX + "failed", "", message)
        others = [_PREFIX + f"ack/{r}" for r in range(self.world_size) if r != self.rank]
        done = [_PREFIX + f"done/{r}" for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + _ACK_S
        while time.monotonic() < deadline:
            # A rank that has read the error, or finished its share and left, needs no more time.
            if all(self.store.check([a]) or self.store.check([d]) for a, d in zip(others, done)):
                break
            time.sleep(_POLL_S)


_CURRENT: Ranks | None = None


def current() -> Ranks | None:
    """The job this process has joined (inside :func:`join`), or None."""
    return _CURRENT


@contextlib.contextmanager
def join(timeout_s: float = 1800.0) -> Iterator[Ranks]:
    """Join the job's process group (gloo; for coordination only) for the block, and share its failures.

    An exception in the block (other than a peer's failure) is posted for the other ranks before it propagates. Each
    rank is the "global zero" of its own single-device Trainers while inside (Lightning decides from the RANK
    variable otherwise, and would keep ranks above 0 from writing their logs and checkpoints).
    """
    global _CURRENT
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from lightning_utilities.core.rank_zero import rank_zero_only

    env = TorchElasticEnvironment() if TorchElasticEnvironment.detect() else SLURMEnvironment()
    rank, world_size, local_rank = env.global_rank(), env.world_size(), env.local_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # so that "cuda" means this rank's GPU
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        # gloo coordinates; NCCL carries the global phase's DDP gradients on GPUs (Lightning reuses this group).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    store = dist.distributed_c10d._get_default_store()
    ranks = Ranks(rank, world_size, local_rank, store)
    saved_rank, rank_zero_only.rank = getattr(rank_zero_only, "rank", 0), 0
    _CURRENT = ranks
    try:
        yield ranks
    except PeerFailure:
        raise
    except BaseException as err:
        ranks.fail(err)
        raise
    finally:
        _CURRENT = None
        rank_zero_only.rank = saved_rank
        if created:
            dist.destroy_process_group()


class PeerWatch(Callback):
    """Stops a rank's training with :class:`PeerFailure` as soon as another rank has failed."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.ranks.check()


def partition(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut ``len(sizes)`` consecutive items into ``parts`` consecutive ranges whose largest total size is smallest.

    Consecutive, so that a rank's teacher forward can stop after its last slice; every range is non-empty while
    there are enough items (the ranges beyond ``len(sizes)`` are empty). Exact, by dynamic programming.
    """
    n = len(sizes)
    parts_used = min(parts, n)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # cost[k][i]: the smallest largest total cutting the first i items into k non-empty ranges; cut[k][i]: its cut.
    cost = [[inf] * (n + 1) for _ in range(parts_used + 1)]
    cut = [[0] * (n + 1) for _ in range(parts_used + 1)]
    cost[0][0] = 0
    for k in range(1, parts_used + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(cost[k - 1][j], prefix[i] - prefix[j])
                if value < cost[k][i]:
                    cost[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts_used, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    ranges = [range(a, b) for a, b in reversed(bounds)]
    return ranges + [range(n, n)] * (parts - parts_used)


def train_share(
    ranks: Ranks,
    names: Sequence[str],
    sizes: Sequence[int],
    train: Callable[[list[int]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Train this rank's share of the slices, then wait for every rank; return what each rank reported.

    Args:
        ranks: The job.
        names: The slices' names, in model order.
        sizes: Their parameter counts (what the shares balance).
        train: Trains the slices at the given indices (those already finished it loads instead) and returns this
            rank's report (JSON-able: its times); called even for an empty share.
    """
    share = list(partition(sizes, ranks.world_size)[ranks.rank])
    report = {"rank": ranks.rank, "slices": [names[i] for i in share], **train(share)}
    import json

    ranks.store.set(_PREFIX + f"report/{ranks.rank}", json.dumps(report))
    ranks.announce(f"done/{ranks.rank}")
    ranks.wait_for([f"done/{r}" for r in range(ranks.world_size)])
    return [json.loads(ranks.store.get(_PREFIX + f"report/{r}")) for r in range(ranks.world_size)]
