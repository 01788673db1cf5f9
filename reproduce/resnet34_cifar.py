"""Regenerate the paper's ResNet-34 CIFAR table: teachers, every row's compress run, ours beside the paper's.

1. Trains the dense teachers of ``configs/resnet34/{cifar10,cifar100}/teacher.yaml`` (LightningCLI ``fit``
   configs) into the ``teacher_weights`` file the compress configs read (once: reused while the config is
   unchanged).
2. Runs every compress config of those folders (or those whose ``<dataset>/<name>`` matches ``--only``) exactly as
   ``tnlit compress --config X.yaml`` would: on GPUs, one run per GPU at a time (a subprocess each, with
   ``CUDA_VISIBLE_DEVICES``, its log in ``<runs>/logs/``); without GPUs, one after another in this process. A run
   directory resumes where it stopped, and a finished run only reports, so rerunning the script after a kill (or
   with more configs) trains only what is missing.
3. Writes ``<results>/resnet34_cifar.csv`` and ``.md`` (our top-1 and optimisation time beside the paper's, from
   reproduce/paper_resnet34_cifar.csv), ``resnet34_cifar.png`` and ``resnet34_cifar.provenance.json``.

    python reproduce/resnet34_cifar.py                              # all rows, on every visible GPU
    python reproduce/resnet34_cifar.py --only 'cifar10/.*cr0.5'     # a selection (regex on <dataset>/<name>)
    python reproduce/resnet34_cifar.py --gpus 0,1                   # these GPUs
    python reproduce/resnet34_cifar.py --smoke                      # end to end on CPU in minutes, made data

``--smoke`` writes made data in CIFAR's on-disk layout, derives each config with a narrow network
(``cifar-resnet34-w8``), a few dozen images and one epoch per phase into ``runs/resnet34_smoke/configs``, and runs
the whole script on them; its results go to ``runs/resnet34_smoke/results`` (never over the real table).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tnlit.atomic import atomic_csv, atomic_png, atomic_text
from tnlit.commands.quickstart import result_row, train_teacher
from tnlit.markdown import markdown_table

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "reproduce" / "paper_resnet34_cifar.csv"
DATASETS = ("cifar10", "cifar100")
SMOKE = Path("runs/resnet34_smoke")
# Smoke sizes: the paper's 10k / 30k / 50k become 20 / 40 / all of the 100 made train images.
SMOKE_TRAIN_SIZES = {10000: 20, 30000: 40}
FIELDS = [
    "config",
    "dataset",
    "cr",
    "method",
    "train_images",
    "status",
    "compression_rate",
    "teacher_top1",
    "init_top1",
    "final_top1",
    "best_top1",
    "time_to_best_min",
    "optimisation_min",
    "wall_min",
    "paper_top1",
    "paper_time_min",
]


def paper_numbers() -> dict[str, dict[str, str]]:
    """The paper's rows (PAPER.md), by ``<dataset>/<config name>``."""
    with PAPER.open() as f:
        return {row["config"]: row for row in csv.DictReader(f)}


def find_configs(configs: Path, only: str | None) -> list[tuple[str, Path]]:
    """``(key, path)`` of every compress config under ``configs/<dataset>/``, key = ``<dataset>/<name>``."""
    found = []
    for dataset in DATASETS:
        for path in sorted((configs / dataset).glob("*.yaml")):
            key = f"{dataset}/{path.stem}"
            if path.name != "teacher.yaml" and (only is None or re.search(only, key)):
                found.append((key, path))
    order = list(paper_numbers())  # the paper's table order; configs it lacks come last
    found.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    if not found:
        raise SystemExit(
            f"no compress config {'matching ' + repr(only) + ' ' if only else ''}under {configs}/<dataset>"
        )
    return found


# ------------------------------------------------------------------------------------------------- smoke


def smoke_configs(configs: Path, out: Path) -> Path:
    """Write made CIFAR data and a narrow, tiny, one-epoch copy of every config (teachers included) under ``out``."""
    from tnlit.data.cifar import write_made_cifar

    data = out / "data"
    for dataset in DATASETS:
        write_made_cifar(data, dataset, train=100, test=40, seed=DATASETS.index(dataset))
        narrow = "cifar-resnet34-w8" if dataset == "cifar10" else "cifar100-resnet34-w8"
        target = out / "configs" / dataset
        target.mkdir(parents=True, exist_ok=True)
        teacher = yaml.safe_load((configs / dataset / "teacher.yaml").read_text())
        teacher["trainer"].update(max_epochs=4, logger=False, enable_checkpointing=False)
        teacher["trainer"].pop("callbacks", None)  # the real config's checkpoint folder is not the smoke run's
        teacher["model"]["init_args"].update(model=narrow, lr=0.05)
        teacher["data"]["init_args"].update(root=str(data), batch_size=16, num_workers=0)
        atomic_text(target / "teacher.yaml", yaml.safe_dump(teacher, sort_keys=False))
        for path in sorted((configs / dataset).glob("*.yaml")):
            if path.name == "teacher.yaml":
                continue
            config = yaml.safe_load(path.read_text())
            config.update(
                teacher=narrow,
                teacher_weights=str(out / dataset / "teacher.safetensors"),
                run_dir=str(out / dataset / path.stem),
                accelerator="cpu",
                precision=None,
            )
            size = config["data"]["init_args"].get("train_size")
            config["data"]["init_args"].update(root=str(data), num_workers=0, train_size=SMOKE_TRAIN_SIZES.get(size))
            for phase in ("slicewise", "finetune"):
                if phase in config:
                    config[phase]["epochs"] = 1
            atomic_text(target / path.name, f"# smoke copy of {path}\n" + yaml.safe_dump(config, sort_keys=False))
    return out / "configs"


# ------------------------------------------------------------------------------------------------- jobs


def _teacher_target(configs: Path, dataset: str) -> Path:
    """The folder the dataset's compress configs expect the teacher's weights in (as ``teacher.safetensors``)."""
    for path in sorted((configs / dataset).glob("*.yaml")):
        weights = yaml.safe_load(path.read_text()).get("teacher_weights")
        if path.name != "teacher.yaml" and weights:
            if Path(weights).name != "teacher.safetensors":
                raise SystemExit(f"{path}: teacher_weights must be <folder>/teacher.safetensors, got {weights}")
            return Path(weights).parent
    raise SystemExit(f"no compress config under {configs / dataset} names its teacher_weights")


def run_jobs(jobs: list[tuple[str, list[str]]], gpus: list[str], logs: Path) -> dict[str, int]:
    """Run ``(name, argv)`` subprocesses, one per GPU at a time; returns each job's exit status."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, status = list(jobs), {}, {}
    while pending or running:
        for gpu in gpus:
            if gpu not in running and pending:
                name, argv = pending.pop(0)
                log = (logs / f"{name.replace('/', '_')}.log").open("a")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                print(f"[gpu {gpu}] start {name} (log {log.name})", flush=True)
                running[gpu] = (name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2)
        for gpu, (name, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status[name] = proc.returncode
                print(f"[gpu {gpu}] {'done' if proc.returncode == 0 else 'FAILED'} {name}", flush=True)
                del running[gpu]
    return status


def train_teachers(configs: Path, datasets: list[str], gpus: list[str], logs: Path) -> dict[str, int]:
    """Train (or reuse) each dataset's teacher: in parallel on GPUs, else in this process."""
    targets = {d: (configs / d / "teacher.yaml", _teacher_target(configs, d)) for d in datasets}
    if not gpus:
        for config, out in targets.values():
            train_teacher(config, out, progress=False)
        return {d: 0 for d in datasets}
    jobs = [
        (f"{d}/teacher", [sys.executable, __file__, "--train-teacher", str(c), str(o)]) for d, (c, o) in targets.items()
    ]
    return run_jobs(jobs, gpus, logs)


def run_configs(runs: list[tuple[str, Path]], gpus: list[str], logs: Path, extra: list[str]) -> dict[str, int]:
    """Run every compress config (resuming its run directory): subprocesses on GPUs, else in this process."""
    if gpus:
        command = [sys.executable, "-m", "tnlit.cli", "compress", "--progress=false", *extra]
        jobs = [(key, [*command, "--config", str(path)]) for key, path in runs]
        return run_jobs(jobs, gpus, logs)
    from tnlit.cli import run_command

    status = {}
    for i, (key, path) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] tnlit compress --config {path}", flush=True)
        try:
            run_command(["compress", "--config", str(path), "--progress=false", *extra])
            status[key] = 0
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others; the table says it failed
            print(f"[{i}/{len(runs)}] FAILED {key}: {type(err).__name__}: {err}", flush=True)
            status[key] = 1
    return status


# ------------------------------------------------------------------------------------------------- results


def result_rows(runs: list[tuple[str, Path]], status: dict[str, int]) -> list[dict[str, Any]]:
    """One row per config: ours from its run directory's state.json (when finished), the paper's beside it."""
    paper = paper_numbers()
    rows = []
    for key, path in runs:
        config = yaml.safe_load(path.read_text())
        ref = paper.get(key, {})
        row: dict[str, Any] = {
            "config": key,
            "dataset": key.split("/")[0],
            "cr": config["plan"]["rules"][0].get("cr"),
            "method": config["method"],
            "train_images": ref.get("train_images", ""),
            "paper_top1": ref.get("paper_top1", ""),
            "paper_time_min": ref.get("paper_time_min", ""),
        }
        state_file = Path(config["run_dir"]) / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if stale(config):
            rows.append(row | {"status": "stale (older than its teacher)", "curve": []})
            continue
        if status.get(key, 0) != 0 or "final_metric" not in state:
            rows.append(row | {"status": "failed" if status.get(key, 0) else "not finished", "curve": []})
            continue
        ours = result_row(path, state)  # the quickstart's row: best metric, time to best, optimisation and wall time
        rows.append(
            row
            | {
                "status": "done",
                "compression_rate": ours["compression_rate"],
                "teacher_top1": ours["teacher_metric"],
                "init_top1": ours["init_metric"],
                "final_top1": ours["final_metric"],
                "best_top1": ours["best_metric"],
                "time_to_best_min": round(ours["time_to_best_s"] / 60, 2),
                "optimisation_min": round(ours["optimisation_s"] / 60, 2),
                "wall_min": round(ours["wall_s"] / 60, 2),
                "curve": ours["curve"],
            }
        )
    return rows


def stale(config: dict[str, Any]) -> bool:
    """Whether the run directory was started before its teacher's weights were last written (a teacher trained again
    after its config changed): compress() resumes by config, which names the weights file, not its content."""
    started, weights = Path(config["run_dir"]) / "config.json", Path(config.get("teacher_weights") or "")
    return started.is_file() and weights.is_file() and started.stat().st_mtime < weights.stat().st_mtime


def run_status(config: dict[str, Any]) -> str:
    """What a row's run directory holds: ``new``, ``started (<phases>)``, ``finished`` or ``stale``."""
    state_file = Path(config["run_dir"]) / "state.json"
    if not state_file.exists():
        return "new" + ("" if Path(config.get("teacher_weights") or "").is_file() else " (teacher not trained yet)")
    if stale(config):
        return "stale (older than its teacher)"
    state = json.loads(state_file.read_text())
    if "final_metric" in state:
        return f"finished: top-1 {state['final_metric'].get('top1')}"
    return f"started ({', '.join(state.get('times', {})) or 'evaluated only'})"


def warn_stale(runs: list[tuple[str, Path]]) -> None:
    """Say which run directories predate their teacher (they would only report their old results)."""
    for key, path in runs:
        config = yaml.safe_load(path.read_text())
        if stale(config):
            print(
                f"warning: {key}: {config['run_dir']} predates {config['teacher_weights']}: delete it to run this "
                "row on the new teacher; it is left out of the table",
                flush=True,
            )


def markdown(rows: list[dict[str, Any]], note: str) -> str:
    paper = paper_numbers()
    lines = ["# ResNet-34 on CIFAR: ours beside the paper's", "", note, ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        teacher = next((r["teacher_top1"] for r in group if r.get("teacher_top1") is not None), "-")
        lines += [
            f"## {dataset} (teacher top-1: ours {teacher}, paper {paper[f'{dataset}/teacher']['paper_top1']})",
            "",
        ]
        cells = (
            "cr",
            "method",
            "train_images",
            "compression_rate",
            "init_top1",
            "final_top1",
            "best_top1",
            "paper_top1",
            "time_to_best_min",
            "optimisation_min",
            "paper_time_min",
            "status",
        )
        header = (
            "CR",
            "method",
            "train images",
            "CR (model)",
            "top-1 start",
            "top-1 final",
            "top-1 best",
            "paper top-1",
            "to best (min)",
            "optimisation (min)",
            "paper time (min)",
            "status",
        )
        lines += [*markdown_table(header, ([r.get(c) for c in cells] for r in group), empty="-"), ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels, one bar pair per row: top-1 (best) ours vs paper, and time to best ours vs the paper's time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [r["config"].replace("/", "\n") for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(rows)), 5))

    def num(value: Any) -> float:
        return float(value) if value not in (None, "") else float("nan")

    for ax, (ours, theirs, label) in zip(
        axes, [("best_top1", "paper_top1", "top-1 (%)"), ("time_to_best_min", "paper_time_min", "time to best (min)")]
    ):
        ax.bar([x - 0.2 for x in xs], [num(r.get(ours)) for r in rows], width=0.4, label="ours", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], [num(r.get(theirs)) for r in rows], width=0.4, label="paper", color="tab:grey")
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    atomic_png(fig, path)


def log_to_wandb(rows: list[dict[str, Any]], results: Path, project: str) -> None:
    """The finished table as a W&B run of its own (job type ``table``): a wandb Table and the CSV as an artifact."""
    import wandb

    run = wandb.init(
        project=project,
        name="resnet34_cifar",
        job_type="table",
        group="resnet34_cifar",
        mode=os.environ.get("WANDB_MODE") or "offline",
        dir=str(results),
    )
    run.log({"resnet34_cifar": wandb.Table(columns=FIELDS, data=[[r.get(f) for f in FIELDS] for r in rows])})
    artifact = wandb.Artifact("resnet34_cifar", type="results")
    artifact.add_file(str(results / "resnet34_cifar.csv"))
    run.log_artifact(artifact)
    run.finish()


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        type=Path,
        default=Path("configs/resnet34"),
        help="folder with <dataset>/teacher.yaml and <dataset>/*.yaml compress configs",
    )
    parser.add_argument("--only", help="run only the configs whose <dataset>/<name> matches this regex")
    parser.add_argument(
        "--gpus",
        help="comma-separated GPU ids, one run per GPU at a time (default: every visible "
        "GPU; none: in this process, on the CPU)",
    )
    parser.add_argument("--results", type=Path, help="where the table goes (default: results)")
    parser.add_argument(
        "--wandb-project",
        help="also log every run, and the table, to this W&B project (offline unless $WANDB_MODE says otherwise)",
    )
    parser.add_argument("--smoke", action="store_true", help="made data, narrow network, one epoch: minutes on CPU")
    parser.add_argument(
        "--list", action="store_true", help="say what each selected row's run directory holds; run nothing"
    )
    parser.add_argument("--train-teacher", nargs=2, metavar=("CONFIG", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_teacher:  # a subprocess of train_teachers on one GPU
        train_teacher(Path(args.train_teacher[0]), Path(args.train_teacher[1]), progress=False)
        return 0

    started = time.perf_counter()
    configs = smoke_configs(args.configs, SMOKE) if args.smoke else args.configs
    results = args.results or (SMOKE / "results" if args.smoke else Path("results"))
    if args.gpus is not None:
        gpus = [g for g in args.gpus.split(",") if g]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())] if not args.smoke else []
    runs = find_configs(configs, args.only)
    if args.list:
        for key, path in runs:
            print(f"{key:32s} {run_status(yaml.safe_load(path.read_text()))}")
        return 0
    logs = Path(yaml.safe_load(runs[0][1].read_text())["run_dir"]).parent.parent / "logs"
    extra = ["--log.wandb=true", f"--log.wandb_project={args.wandb_project}"] if args.wandb_project else []

    datasets = sorted({key.split("/")[0] for key, _ in runs})
    teachers = train_teachers(configs, datasets, gpus, logs)
    failed_teachers = {d for d in datasets if teachers.get(f"{d}/teacher", teachers.get(d, 0))}
    warn_stale(runs)
    todo = [
        (k, p) for k, p in runs if k.split("/")[0] not in failed_teachers and not stale(yaml.safe_load(p.read_text()))
    ]
    status = run_configs(todo, gpus, logs, extra) | {k: 1 for k, p in runs if (k, p) not in todo}
    rows = result_rows(runs, status)
    total_s = time.perf_counter() - started

    results.mkdir(parents=True, exist_ok=True)
    atomic_csv(results / "resnet34_cifar.csv", rows, FIELDS, extrasaction="ignore")
    where = f"{len(gpus)} GPU(s) ({','.join(gpus)})" if gpus else "this process (CPU or one GPU)"
    note = (
        f"Written by `python reproduce/resnet34_cifar.py{' --smoke' if args.smoke else ''}` on {where}; this "
        f"invocation took {total_s / 60:.1f} min (finished runs are reused). Top-1 in %, best after any epoch; times "
        "in minutes of optimisation (forward + backward + step, as the paper counts them), *to best* being the time "
        "to the best top-1. The paper's numbers (one A10G) are PAPER.md's, labelled as such; our device is in "
        "resnet34_cifar.provenance.json."
        + (" SMOKE RUN: made data and a narrow network, the numbers mean nothing." if args.smoke else "")
    )
    atomic_text(results / "resnet34_cifar.md", markdown(rows, note))
    plot(rows, results / "resnet34_cifar.png")
    from tnlit.provenance import write_provenance

    write_provenance(
        results / "resnet34_cifar.provenance.json",
        {
            "configs": {str(p): p.read_text() for _, p in runs},
            "gpus": gpus,
            "smoke": args.smoke,
            "total_s": round(total_s, 1),
            "teachers": {d: str(configs / d / "teacher.yaml") for d in datasets},
        },
    )
    if args.wandb_project:
        log_to_wandb(rows, results, args.wandb_project)
    bad = [r["config"] for r in rows if r["status"] != "done"]
    print(
        f"resnet34_cifar: {len(rows) - len(bad)}/{len(rows)} rows done in {total_s / 60:.1f} min -> "
        f"{results}/resnet34_cifar.*" + (f"; not done: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
