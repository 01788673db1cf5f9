"""How a ``tnlit`` subcommand's options come from its function: the signature and docstring make a jsonargparse
parser (``--config FILE.yaml``, ``--print_config``, ``--help``), and parsing then instantiating calls the function.
Also LightningCLI for ``tnlit fit | validate | test | predict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from tnlit.pipeline.callbacks import quiet_lightning

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["call_command", "command_parser", "lightning_cli"]


def command_parser(fn: Callable[..., Any]) -> ArgumentParser:
    """The parser of one subcommand: ``--config`` and one option per parameter of ``fn``, documented by its
    docstring (and the field docstrings of dataclass parameters: Rule, TensorizePlan, the settings)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(description=fn.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below.")
    parser.add_function_arguments(fn, as_group=False)
    return parser


def call_command(fn: Callable[..., Any], argv: list[str], parser: ArgumentParser | None = None) -> Any:
    """Parse ``argv`` as the command line gives it to ``fn``'s subcommand, then call ``fn``. Bad options exit with
    jsonargparse's message naming the key; instantiating builds the plan's rules, which check themselves."""
    parser = parser or command_parser(fn)
    init = parser.instantiate(parser.parse_args(argv))
    return fn(**{k: v for k, v in init.items() if k != "config"})


def lightning_cli(argv: list[str] | None) -> LightningCLI:
    """LightningCLI over any LightningModule / LightningDataModule (``--model``, ``--data`` class paths).

    ``argv=None`` lets it read ``sys.argv`` itself (it warns when given both). Returns the CLI, whose ``model``,
    ``datamodule`` and ``trainer`` are the ones that ran.
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    quiet_lightning()
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
