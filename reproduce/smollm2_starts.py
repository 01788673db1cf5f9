"""How good is each untrained start on SmolLM2-135M? The perplexity of a student straight from its decomposition.

Slice-wise distillation and global finetuning recover from a start; on a real pretrained LM the start decides how
much there is to recover (results/smollm2.md). Every student here has its MLPs (90 matrices) decomposed at one
per-matrix CR and is evaluated, untrained, on each calibration source's held-out tail and an unseen source:

- ``tt_svd``: the paper's two-site MPO by TT-SVD (the least weight error);
- ``svd``: low rank by truncated SVD (the least weight error);
- ``whitened``: low rank by the whitened SVD (``init: activation``, the least output error on calibration inputs,
  exact), at a few dampings and calibration sizes;
- ``whitened gate/up (down)``: only the gate and up (only the down) projections compressed: which ones cost the
  perplexity (a diagnostic: a smaller whole-model CR);
- ``whitened x/y``: gate/up at per-matrix CR x and down at y, the same whole-model CR as the uniform one: whether
  moving rank between the two kinds helps.

    python reproduce/smollm2_starts.py                 # SmolLM2-135M, about 10 min on 2 CPU cores
    python reproduce/smollm2_starts.py --model DIR --tokenizer bytes --quick      # a smoke run (tests)

Writes ``<out>/smollm2_starts.{csv,md,provenance.json}``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.activations import activation_init_, input_covariances
from tnlit.atomic import atomic_csv, atomic_text
from tnlit.data.text_sources import TextSourcesDataModule
from tnlit.evaluate import perplexity
from tnlit.markdown import markdown_table
from tnlit.models.weights import load_teacher
from tnlit.provenance import write_provenance

MLP = r"model\.layers\.\d+\.mlp\.{}_proj"
ALL, GATE_UP, DOWN = MLP.format("(gate|up|down)"), MLP.format("(gate|up)"), MLP.format("down")


def variants(cr: float) -> list[dict[str, Any]]:
    """Each start: its rules, whether the whitened fit runs (and with which damping / calibration batches)."""
    lowrank = {"format": "lowrank"}
    out = [
        {"start": "tt_svd", "rules": [Rule(ALL, "mpo", sites=2, cr=cr)]},
        {"start": "svd", "rules": [Rule(ALL, cr=cr, **lowrank)]},
    ]
    for damping, share in ((1e-6, 1.0), (1e-2, 1.0), (1e-6, 0.25)):
        name = f"whitened (damping {damping:g}, {share:g} of the calibration)"
        out.append({"start": name, "rules": [Rule(ALL, cr=cr, **lowrank)], "damping": damping, "share": share})
    out += [
        {"start": "whitened gate/up only", "rules": [Rule(GATE_UP, cr=cr, **lowrank)]},
        {"start": "whitened down only", "rules": [Rule(DOWN, cr=cr, **lowrank)]},
    ]
    # Gate/up (two 576 x 1536 matrices) and down (one) at CRs whose mean is cr: the same parameter count.
    for gate_up in (cr - 0.1, cr + 0.1):
        down = 3 * cr - 2 * gate_up
        if 0 < gate_up < 1 and 0 < down < 1:
            rules = [Rule(GATE_UP, cr=round(gate_up, 3), **lowrank), Rule(DOWN, cr=round(down, 3), **lowrank)]
            out.append({"start": f"whitened {gate_up:.2f}/{down:.2f}", "rules": rules})
    for v in out[2:]:
        v.setdefault("damping", 1e-6)
        v.setdefault("share", 1.0)
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    teacher = load_teacher(args.model).eval()
    data = TextSourcesDataModule(
        sources=args.text,
        unseen=args.unseen,
        tokenizer=args.tokenizer or args.model,
        batch_size=args.batch_size,
        train_sequences=args.calibration_batches * args.batch_size,
        eval_sequences=args.eval_sequences,
    )
    data.setup("fit")
    tests = data.test_dataloaders()

    def row(start: str, model: torch.nn.Module, cr: float | str, seconds: float | str) -> dict[str, Any]:
        ppl = {f"ppl_{k}": round(perplexity(model, dl), 2) for k, dl in tests.items()}
        out = {"start": start, "whole_cr": cr, "fit_s": seconds, **ppl}
        print(out, flush=True)
        return out

    rows = [row("dense", teacher, 0.0, "")]
    names = [n for n, _ in teacher.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    started = time.perf_counter()
    covariances = input_covariances(teacher, data.train_dataloader(), names)
    calibration_s = time.perf_counter() - started
    quarter = input_covariances(teacher, data.train_dataloader(), names, max(1, args.calibration_batches // 4))
    for v in variants(args.cr):
        student, report = tensorize(copy.deepcopy(teacher), TensorizePlan(v["rules"]))
        seconds = 0.0
        if "damping" in v:
            started = time.perf_counter()
            activation_init_(student, teacher, covariances if v["share"] == 1 else quarter, damping=v["damping"])
            seconds = time.perf_counter() - started + calibration_s * v["share"]
        rows.append(row(v["start"], student, round(report.compression_rate, 4), round(seconds, 1)))
    dense = rows[0]
    for r in rows[1:]:
        ratios = [r[k] / dense[k] for k in dense if k.startswith("ppl_")]
        r["worst_ratio"] = round(max(ratios), 2)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the built-in smollm2-135m or a LLaMA-style HF dir")
    parser.add_argument("--tokenizer", help="default: the model's own; 'bytes' for a byte-level test model")
    parser.add_argument("--cr", type=float, default=0.5, help="per-matrix CR of the MLPs (0.5: whole-model 0.30)")
    parser.add_argument("--text", nargs="+", default=["pydoc", "news", "kjv"], help="calibration sources")
    parser.add_argument("--unseen", nargs="+", default=["sklearn"], help="evaluation-only sources")
    parser.add_argument("--calibration_batches", type=int, default=8, help="batches of 8 x 128 tokens (init's)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_sequences", type=int, default=32, help="evaluation windows per text")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 calibration batches, 2 windows a text")
    parser.add_argument("--out", default="results", help="where smollm2_starts.* are written")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration_batches, args.eval_sequences, args.batch_size = 2, 2, 2
    started = time.perf_counter()
    rows = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    atomic_csv(out / "smollm2_starts.csv", rows, columns)
    lines = [
        f"# {args.model}: perplexity of untrained starts, per text (`python reproduce/smollm2_starts.py`)",
        "",
        f"MLPs at per-matrix CR {args.cr}; {args.calibration_batches} calibration batches of {args.batch_size} x 128 "
        f"tokens; {args.eval_sequences} evaluation windows per text; fit_s: the whitened fit with its calibration "
        f"forward. This call: {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        *markdown_table(columns, [[r.get(c, "") for c in columns] for r in rows]),
        "",
    ]
    atomic_text(out / "smollm2_starts.md", "\n".join(lines))
    write_provenance(out / "smollm2_starts.provenance.json", vars(args))
    return rows


if __name__ == "__main__":
    main()
