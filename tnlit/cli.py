"""The ``tnlit`` command.

``tnlit fit | validate | test | predict`` are LightningCLI's subcommands (teacher training, global
finetuning); the others are tnlit's own. Every subcommand takes ``--config FILE.yaml`` and
``--print_config``, and ``--help`` shows every option with its documentation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from tnlit.pipeline import RunDirError
from tnlit.tensorize import CompressionReport, TensorizeError, TensorizePlan, estimate, tensorize

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["lightning_cli", "main", "report", "run_command"]

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Field docstrings of the config dataclasses (Rule, TensorizePlan) become the help of their options.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def report(
    model: str,
    plan: TensorizePlan,
    pretrained: bool = False,
    dry_run: bool = False,
    csv: Path | None = None,
    json: Path | None = None,
) -> CompressionReport:
    """Tensorize a model by a plan and print the compression report: one row per layer, then the whole model.

    Args:
        model: A built-in name (tiny-gpt2, gpt2-xl-arch), a torchvision model name (resnet34), a local
            Hugging Face model directory, or a Hugging Face hub name.
        plan: The tensorization plan: rules (pattern, format, cr | rank | bond_dim, sites) and exclude.
        pretrained: Load pretrained weights for a torchvision name (otherwise random weights).
        dry_run: Count parameters from closed forms only: no weights, no decomposition, no error column.
            The model is built on the meta device, so GPT-2 XL takes seconds and no memory.
        csv: Also write the per-layer rows to this CSV file.
        json: Also write the report (rows and whole-model counts) to this JSON file.
    """
    from tnlit.models import load_model

    net = load_model(model, pretrained=pretrained, meta=dry_run)
    if dry_run:
        result = estimate(net, plan)
    else:
        _, result = tensorize(net, plan)
    print(result)
    if csv is not None:
        result.to_csv(csv)
    if json is not None:
        result.to_json(json)
    return result


def _commands() -> dict:
    """tnlit's own subcommands: a function each, whose signature and docstring make the options and help."""
    from tnlit.inspect_command import inspect
    from tnlit.pipeline import compress
    from tnlit.quickstart import quickstart

    return {"report": report, "compress": compress, "quickstart": quickstart, "inspect": inspect}


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
    for name, fn in _commands().items():
        sub = ArgumentParser(description=fn.__doc__.split("\n\n")[0])
        sub.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below.")
        sub.add_function_arguments(fn, as_group=False)
        subcommands.add_subcommand(name, sub, help=fn.__doc__.split("\n")[0])
    return parser


def lightning_cli(argv: list[str] | None) -> LightningCLI:
    """LightningCLI over any LightningModule / LightningDataModule (``--model``, ``--data`` class paths).

    ``argv=None`` lets it read ``sys.argv`` itself (it warns when given both). Returns the CLI, whose ``model``,
    ``datamodule`` and ``trainer`` are the ones that ran.
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )


def run_command(argv: list[str], parser: ArgumentParser | None = None) -> Any:
    """Parse ``argv`` (``compress --config X.yaml``, ...) as the command line does, run that subcommand, and return
    its result. Bad options exit with jsonargparse's message naming the key."""
    parser = parser or build_parser()
    cfg = parser.parse_args(argv)
    name = cfg.subcommand
    # Instantiating builds the plan's rules, which check themselves (a CR outside (0, 1) fails here).
    init = parser.instantiate(cfg)[name]
    return _commands()[name](**{k: v for k, v in init.items() if k != "config"})


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
    except (TensorizeError, ValueError, RunDirError, FileNotFoundError) as err:
        # A bad plan or model name is the user's to fix: say what, without a traceback.
        parser.exit(2, f"tnlit {name}: error: {err}\n")
    if name == "compress":
        print(json.dumps({k: result.get(k) for k in ("teacher_metric", "init_metric", "metrics", "times")}, indent=2))


if __name__ == "__main__":
    main()
