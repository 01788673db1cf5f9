"""The `tnlit` command: help, every shipped config, the report end to end, and clear errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tnlit
from tnlit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
# The package's configs (what pip installs); the repository's configs/ links to them.
SHIPPED = Path(tnlit.__file__).parent / "configs"
# quickstart.yaml is the quickstart's list of runs, not a config.
CONFIGS = sorted(p for p in SHIPPED.rglob("*.yaml") if p.name != "quickstart.yaml")
# configs/<model>/<dataset>/<method>_cr<rate>.yaml (a method's variant after a dash), or a teacher's fit config.
SCHEME = re.compile(r"[a-z0-9_]+/[a-z0-9_]+/([a-z]+(-[a-z0-9]+)*_cr\d+(\.\d+)?|teacher)\.yaml")


def test_there_are_configs():
    assert len(CONFIGS) >= 3


def test_the_repositorys_configs_are_the_shipped_ones():
    assert (ROOT / "configs").resolve() == SHIPPED.resolve()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(SHIPPED)))
def test_every_config_follows_the_naming_scheme(config):
    assert SCHEME.fullmatch(config.relative_to(SHIPPED).as_posix())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(SHIPPED)))
def test_every_shipped_config_parses(config, capsys):
    # LightningCLI fit configs (tnlit fit --config X.yaml): every teacher.yaml.
    if config.name == "teacher.yaml":
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--print_config"])
        assert done.value.code == 0
        assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].startswith("tnlit.methods.teacher.")
        return
    subcommand = "report" if config.name.startswith("report_") else "compress"
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["plan"]["rules"], "a plan with rules"
    build_parser().parse_args([subcommand, "--config", str(config)])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--plan.rules", "--plan.exclude", "--dry_run", "--pretrained", "--csv", "--json"):
        assert option in out
    assert "meta device" in out  # docstrings become help


def test_report_end_to_end(tmp_path, capsys):
    main(
        [
            "report",
            "--config",
            str(ROOT / "configs/tiny_gpt2/architecture/report_cr0.48.yaml"),
            "--csv",
            str(tmp_path / "r.csv"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "whole-model CR" in out
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["ranks"] == [33]
    assert (tmp_path / "r.csv").read_text().startswith("name,format,module_type,shape")


def test_gpt2_xl_dry_run_shows_the_papers_numbers(capsys):
    main(["report", "--config", str(ROOT / "configs/gpt2_xl/architecture/report_cr0.48.yaml")])
    out = capsys.readouterr().out
    assert "96 layers tensorized, whole-model CR 0.30" in out
    assert "40x40 -> 80x80  832" in out


def test_bad_plan_is_a_clear_error_without_traceback(capsys):
    with pytest.raises(SystemExit) as done:
        rules = '[{pattern: "transformer.h.0.mlp.c_fc", format: mpo, cr: 0.999}]'
        main(["report", "--model", "tiny-gpt2", "--plan.rules", rules])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "out of reach" in err and "Traceback" not in err


def test_config_typo_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-gpt2\nplan:\n  rules:\n    - pattern: x\n      format: mpo\n      crr: 0.5\n")
    with pytest.raises(SystemExit) as done:
        main(["report", "--config", str(bad)])
    assert done.value.code == 2
    assert "crr" in capsys.readouterr().err


def test_unknown_model_names_what_is_known(capsys):
    with pytest.raises(SystemExit) as done:
        main(["report", "--model", "no-such-model", "--plan.rules", "[{pattern: x, format: mpo}]"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "tiny-gpt2" in err


def test_console_script_is_installed():
    tnlit = Path(sys.executable).with_name("tnlit")
    out = subprocess.run([tnlit, "--help"], capture_output=True, text=True, check=True)
    assert "report" in out.stdout and "fit|validate|test" in out.stdout


def test_report_on_a_saved_hugging_face_directory(tmp_path, capsys):
    from conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "model")
    main(
        [
            "report",
            "--model",
            str(tmp_path / "model"),
            "--plan.rules",
            "[{pattern: 'transformer.h.1.mlp.c_fc', format: lowrank, cr: 0.5}]",
        ]
    )
    assert "transformer.h.1.mlp.c_fc  lowrank" in capsys.readouterr().out


def test_lightning_subcommands_are_lightning_cli():
    tnlit = Path(sys.executable).with_name("tnlit")
    out = subprocess.run([tnlit, "fit", "--help"], capture_output=True, text=True, check=True)
    assert "--trainer.max_epochs" in out.stdout and "--model" in out.stdout


COMPRESS = """\
teacher: tiny-gpt2
task: causal_lm
data:
  class_path: tnlit.data.offline.PydocTextDataModule
  init_args: {{seq_len: 16, batch_size: 4, train_sequences: 8}}
plan:
  rules:
    - pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)'
      format: mpo
      {rule}
run_dir: {run_dir}
accelerator: cpu
progress: false
{extra}
"""


@pytest.mark.parametrize(
    ("rule", "extra", "named"),
    [
        ("cr: 0.5", "slicewise: {lerning_rate: 1.0e-3}", ["slicewise.lerning_rate"]),
        ("cr: 0.5", "slicewise: {epochs: two}", ["slicewise.epochs", "two"]),
        ("cr: 1.5", "", ["CR must be", "1.5"]),
        ("bond_dim: 1000", "", ["transformer.h.0.mlp.c_fc", "bond dimension 1000 is impossible", "use 1 to 128"]),
    ],
    ids=["unknown-key", "wrong-type", "cr-out-of-range", "rank-out-of-reach"],
)
def test_compress_config_mistake_fails_before_any_work(tmp_path, capsys, monkeypatch, rule, extra, named):
    from tnlit.data.offline import PydocTextDataModule

    def no_work(*args, **kwargs):
        pytest.fail("a config mistake reached data loading or evaluation")

    monkeypatch.setattr(PydocTextDataModule, "setup", no_work)
    monkeypatch.setattr("tnlit.pipeline.recipe.evaluate_task", no_work)
    config = tmp_path / "x.yaml"
    config.write_text(COMPRESS.format(rule=rule, extra=extra, run_dir=tmp_path / "run"))
    with pytest.raises(SystemExit) as done:
        main(["compress", "--config", str(config)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in named), err
    assert "Traceback" not in err
    # Nothing claimed the run directory: the corrected config runs there without overwrite.
    assert not (tmp_path / "run").exists()


def test_compress_help_documents_the_logging_options(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    for option in ("--log.wandb ", "--log.wandb_project", "--log.wandb_name", "--log.wandb_mode"):
        assert option in out
    assert "wandb sync" in out and "WANDB_MODE" in out


def test_format_auto_and_a_budget_parse_from_a_compress_config(tmp_path, capsys):
    config = tmp_path / "auto.yaml"
    config.write_text(COMPRESS.format(rule="cr: 0.5", extra="", run_dir=tmp_path / "run").replace("mpo", "auto"))
    parser = build_parser()
    plan = parser.instantiate(parser.parse_args(["compress", "--config", str(config)]))["compress"]["plan"]
    assert (plan.rules[0].format, plan.rules[0].cr, plan.budget) == ("auto", 0.5, None)
    budgeted = tmp_path / "budget.yaml"
    budgeted.write_text(
        COMPRESS.format(rule="", extra="", run_dir=tmp_path / "run").replace("rules:", "budget: 0.3\n  rules:")
    )
    plan = parser.instantiate(parser.parse_args(["compress", "--config", str(budgeted)]))["compress"]["plan"]
    assert (plan.rules[0].format, plan.budget) == ("mpo", 0.3)
    with pytest.raises(SystemExit) as done:
        main(["compress", "--config", str(budgeted), "--print_config"])
    assert done.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["plan"]["budget"] == 0.3


def test_report_with_format_auto_and_with_a_budget(capsys):
    auto = "[{pattern: 'transformer.h.0.mlp.c_fc', format: auto, cr: 0.5}]"
    main(["report", "--model", "tiny-gpt2", "--plan.rules", auto])
    out = capsys.readouterr().out
    assert "format auto: 1 layers" in out and "transformer.h.0.mlp.c_fc  auto" not in out
    rules = "[{pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)', format: mpo}]"
    main(["report", "--model", "tiny-gpt2", "--plan.rules", rules, "--plan.budget", "0.3"])
    assert "(budget 0.3000)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--plan.rules", "[{pattern: 'transformer.h.0.mlp.c_fc', format: auto}]"], "format 'auto' compares formats"),
        (
            ["--plan.rules", "[{pattern: 'transformer.h.0.mlp.c_fc', format: mpo}]", "--plan.budget", "1.2"],
            "plan budget must be a whole-model CR strictly between 0 and 1",
        ),
        (
            [
                "--plan.rules",
                "[{pattern: 'transformer.h.0.mlp.c_fc', format: mpo}]",
                "--plan.budget",
                "0.3",
                "--dry_run",
                "true",
            ],
            "no weights (meta device)",
        ),
    ],
    ids=["auto-without-cr", "budget-out-of-range", "budget-on-dry-run"],
)
def test_auto_and_budget_mistakes_are_clear_cli_errors(capsys, args, needle):
    with pytest.raises(SystemExit) as done:
        main(["report", "--model", "tiny-gpt2", *args])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
