"""SIGTERM and SIGINT during a run: stop, keep what is checkpointed, say how to resume, and exit non-zero.

The handlers raise :class:`RunInterrupted` (a ``SystemExit`` with code 128 + the signal's number: 143 for SIGTERM,
130 for SIGINT), which Lightning's Trainer passes through after its own clean-up; epoch checkpoints, finished slices
and ``state.json`` were written atomically as the run went, so rerunning the same command resumes from them. Under
SLURM, Lightning's requeue signal (SIGUSR1, with auto-requeue) is Lightning's: the requeued job reruns the command
and resumes the same way.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["RunInterrupted", "stop_on_signals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SystemExit):
    """The run was stopped by a signal; ``code`` is the exit status (128 + the signal's number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise RunInterrupted(signum)


@contextmanager
def stop_on_signals(run_dir: Path, command: str = "the same command") -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT stop the run with :class:`RunInterrupted` and a message on stderr; the
    previous handlers come back after it. Off the main thread (where no handler can be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    except (RunInterrupted, SIGTERMException) as err:  # SIGTERMException: Lightning's, should its handler run alone
        signum = getattr(err, "signum", signal.SIGTERM)
        print(
            f"tnlit: the run in {run_dir} stopped on {signal.Signals(signum).name}; its progress is kept as far as "
            "it was checkpointed (finished slices and phases, the current phase's last epoch). Rerun "
            f"{command} to resume it.",
            file=sys.stderr,
            flush=True,
        )
        if isinstance(err, RunInterrupted):
            raise
        raise RunInterrupted(signum) from err
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
