"""The ``tnlit`` command.

``tnlit fit | validate | test | predict`` are LightningCLI's subcommands (teacher training, global finetuning);
the others are tnlit's own, one module each in :mod:`tnlit.commands`. Every subcommand takes ``--config FILE.yaml``
and ``--print_config``, and ``--help`` shows every option with its documentation.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser

from tnlit.commands.compress import compress, print_result
from tnlit.commands.export import export
from tnlit.commands.inspect import inspect
from tnlit.commands.parsing import command_parser, lightning_cli
from tnlit.commands.quickstart import quickstart
from tnlit.commands.report import report
from tnlit.pipeline import RunDirError
from tnlit.tensorize import TensorizeError

__all__ = ["COMMANDS", "build_parser", "lightning_cli", "main", "run_command"]

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

COMMANDS: dict[str, Callable[..., Any]] = {
    "report": report,
    "compress": compress,
    "quickstart": quickstart,
    "inspect": inspect,
    "export": export,
}
"""tnlit's own subcommands: a function each, whose signature and docstring make the options and help."""


def build_parser() -> ArgumentParser:
    """The parser of tnlit's own subcommands (LightningCLI parses ``fit | validate | test | predict``)."""
    parser = ArgumentParser(
        prog="tnlit",
        description=(
            "Compress pretrained networks by tensorization. Also: 'tnlit fit|validate|test|predict' "
            "(LightningCLI; see 'tnlit fit --help')."
        ),
    )
    subcommands = parser.add_subcommands()
    for name, fn in COMMANDS.items():
        subcommands.add_subcommand(name, command_parser(fn), help=fn.__doc__.split("\n")[0])
    return parser


def run_command(argv: list[str], parser: ArgumentParser | None = None) -> Any:
    """Parse ``argv`` (``compress --config X.yaml``, ...) as the command line does, run that subcommand, and return
    its result. Bad options exit with jsonargparse's message naming the key."""
    parser = parser or build_parser()
    cfg = parser.parse_args(argv)
    name = cfg.subcommand
    # Instantiating builds the plan's rules, which check themselves (a CR outside (0, 1) fails here).
    init = parser.instantiate(cfg)[name]
    return COMMANDS[name](**{k: v for k, v in init.items() if k != "config"})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tnlit`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _LIGHTNING_SUBCOMMANDS:
        lightning_cli(None if from_command_line else argv)
        return
    parser = build_parser()
    name = argv[0] if argv else ""
    try:
        result = run_command(argv, parser)
    except (TensorizeError, ValueError, RunDirError, FileNotFoundError, FileExistsError) as err:
        # A bad plan or model name is the user's to fix: say what, without a traceback.
        parser.exit(2, f"tnlit {name}: error: {err}\n")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # A full disk (or quota) or a read-only file system: what was written atomically stays sound; rerun resumes.
        parser.exit(
            1,
            f"tnlit {name}: error: cannot write {err.filename or ''} ({err.strerror}): free some space "
            "(or make it writable) and rerun the same command; it resumes\n",
        )
    if name == "compress":
        print_result(result)


if __name__ == "__main__":
    main()
