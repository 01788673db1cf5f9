"""Training throughput of the CIFAR ResNet-34 table: images/s of slice-wise (stream) and global steps, and the
time each table row implies.

For every (phase, batch size, CR) that the configs of configs/resnet34/cifar{10,100} use, it builds the CIFAR
ResNet-34 (random weights: the speed does not depend on them), tensorizes it by the config's plan, and times
training steps with Lightning exactly as ``tnlit compress`` runs them (``SliceDistillation`` over every block
slice on one teacher forward, ``stream`` mode; ``GlobalFinetune`` of the factors), on made 32x32 batches from a
pinned-memory DataLoader. A step's time is forward + backward + optimizer step, synchronised, as the paper counts
time; the first ``--warmup`` steps (cuDNN autotuning, allocator growth) are not counted; images/s is the batch size
over the median step time.

The implied time of a row is its epochs x train images / images/s of each of its phases (evaluation excluded),
beside the paper's time (one A10G; PAPER.md). Writes ``<out>/bench_resnet34_gpu.csv`` (throughput),
``bench_resnet34_gpu_rows.csv`` (implied row times), ``bench_resnet34_gpu.md`` and a provenance JSON.

    python reproduce/bench_resnet34_gpu.py                       # on a GPU: float32, the configs' precision
    python reproduce/bench_resnet34_gpu.py --precision bf16-mixed
    python reproduce/bench_resnet34_gpu.py --quick               # CPU check: width 8, a few steps, runs/bench_quick
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from tnlit.atomic import atomic_csv, atomic_text
from tnlit.markdown import markdown_table
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.models.resnet import cifar_resnet34
from tnlit.pipeline.callbacks import OptimisationTimer, quiet_lightning
from tnlit.provenance import write_provenance
from tnlit.slices import make_slices
from tnlit.tensorize import TensorizePlan, tensorize

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "reproduce" / "paper_resnet34_cifar.csv"
TRAIN_IMAGES = 50000  # a config's train_size null: all of CIFAR's train images


class _Images(Dataset):
    """``length`` made CIFAR-shaped images and labels (fixed, held in memory)."""

    def __init__(self, length: int, classes: int) -> None:
        self.images = torch.randn(length, 3, 32, 32)
        self.labels = torch.randint(0, classes, (length,))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def measure(
    phase: str,
    batch: int,
    plan: TensorizePlan,
    *,
    width: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str | None,
    granularity: str = "block",
) -> dict[str, Any]:
    """Median seconds per training step and images/s of one phase (``slicewise`` or ``global``)."""
    torch.manual_seed(0)
    teacher = cifar_resnet34(num_classes=10, width=width).eval()
    student, report = tensorize(teacher, plan)
    if phase == "slicewise":
        slices = make_slices(student, granularity)
        module = SliceDistillation(teacher, student, slices, lr=1e-3)
    else:
        module = GlobalFinetune(student, task="classification", lr=5e-4)
    loader = DataLoader(
        _Images(batch * (steps + warmup), 10),
        batch_size=batch,
        shuffle=True,
        pin_memory=device == "gpu",
        drop_last=True,
    )
    quiet_lightning()  # no cloud-logger advert at every Trainer
    timer = OptimisationTimer()
    trainer = Trainer(
        max_epochs=1,
        accelerator=device,
        devices=1,
        precision=precision,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|LeafSpec|num_workers|logging interval).*")
        trainer.fit(module, train_dataloaders=loader)
    counted = timer.seconds[warmup:]
    step_s = statistics.median(counted)
    return {
        "phase": phase,
        "batch": batch,
        "cr": plan.rules[0].cr,
        "model_cr": round(report.compression_rate, 4),
        "width": width,
        "precision": precision or "32",
        "steps": len(counted),
        "step_ms": round(1000 * step_s, 3),
        "images_per_s": round(batch / step_s, 1),
    }


def table_rows(configs: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(<dataset>/<name>, config)`` of every compress config of the CIFAR table."""
    paths = [
        p for d in ("cifar10", "cifar100") for p in sorted((configs / d).glob("*.yaml")) if p.name != "teacher.yaml"
    ]
    return [(f"{p.parent.name}/{p.stem}", yaml.safe_load(p.read_text())) for p in paths]


def phases(config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The row's ``(phase, batch, epochs)`` in order."""
    batch = config["data"]["init_args"]["batch_size"]
    out = []
    if config["method"] in ("slicewise", "hybrid"):
        out.append(("slicewise", batch, config["slicewise"]["epochs"]))
    if config["method"] in ("global", "hybrid"):
        out.append(("global", config["finetune"].get("batch_size") or batch, config["finetune"]["epochs"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", type=Path, default=ROOT / "configs/resnet34", help="the table's configs")
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, gpu or cpu")
    parser.add_argument("--precision", default=None, help="Lightning precision (default float32, as the configs)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64: the real CIFAR ResNet-34)")
    parser.add_argument("--out", type=Path, help="results folder (default results; --quick: runs/bench_quick)")
    parser.add_argument("--quick", action="store_true", help="width 8, 3 steps after 1, on CPU: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.warmup, args.device = 8, 3, 1, "cpu"
    out = args.out or Path("runs/bench_quick" if args.quick else "results")
    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("warning: no GPU: these are CPU numbers, not the benchmark the table needs", file=sys.stderr)

    rows = table_rows(args.configs)
    needed = {}
    for _, config in rows:
        plan = TensorizePlan(**config["plan"])
        for phase, batch, _ in phases(config):
            needed.setdefault((phase, batch, plan.rules[0].cr), plan)
    measured = {}
    for i, ((phase, batch, cr), plan) in enumerate(sorted(needed.items(), key=lambda kv: kv[0]), 1):
        result = measure(
            phase,
            batch,
            plan,
            width=args.width,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
            precision=args.precision,
        )
        measured[(phase, batch, cr)] = result
        print(
            f"[{i}/{len(needed)}] {phase} batch {batch} CR {cr}: {result['images_per_s']} images/s "
            f"({result['step_ms']} ms/step)",
            flush=True,
        )

    paper = {r["config"]: r for r in csv.DictReader(PAPER.open())}
    implied = []
    for key, config in rows:
        cr = config["plan"]["rules"][0]["cr"]
        images = config["data"]["init_args"].get("train_size") or TRAIN_IMAGES
        parts = [(p, e * images / measured[(p, b, cr)]["images_per_s"]) for p, b, e in phases(config)]
        implied.append(
            {
                "config": key,
                "method": config["method"],
                "cr": cr,
                "train_images": images,
                "epochs": "+".join(str(e) for _, _, e in phases(config)),
                "implied_min": round(sum(s for _, s in parts) / 60, 2),
                "per_epoch_min": "+".join(f"{s / e / 60:.2f}" for (_, s), (_, _, e) in zip(parts, phases(config))),
                "paper_time_min": paper.get(key, {}).get("paper_time_min", ""),
            }
        )

    out.mkdir(parents=True, exist_ok=True)
    throughput = list(measured.values())
    atomic_csv(out / "bench_resnet34_gpu.csv", throughput, list(throughput[0]))
    atomic_csv(out / "bench_resnet34_gpu_rows.csv", implied, list(implied[0]))
    from tnlit.provenance import provenance

    facts = provenance()
    md = [
        "# CIFAR ResNet-34 training throughput and the implied time of each table row",
        "",
        f"Device: {facts['device']}; precision {args.precision or 'float32'}; width {args.width}; median of "
        f"{args.steps} steps after {args.warmup}. Written by `python reproduce/bench_resnet34_gpu.py"
        f"{' --quick' if args.quick else ''}`." + (" QUICK CHECK: not a benchmark." if args.quick else ""),
        "",
        *markdown_table(
            ("phase", "batch", "CR", "images/s", "ms/step"),
            ([r["phase"], r["batch"], r["cr"], r["images_per_s"], r["step_ms"]] for r in throughput),
        ),
        "",
        "Implied optimisation time of each row (epochs x images / images/s; evaluation excluded):",
        "",
        *markdown_table(
            ("config", "epochs", "implied (min)", "per epoch (min)", "paper (min, A10G)"),
            ([r["config"], r["epochs"], r["implied_min"], r["per_epoch_min"], r["paper_time_min"]] for r in implied),
            empty="-",
        ),
    ]
    atomic_text(out / "bench_resnet34_gpu.md", "\n".join(md) + "\n")
    write_provenance(
        out / "bench_resnet34_gpu.provenance.json",
        {"args": {k: str(v) for k, v in vars(args).items()}, "device": device},
    )
    print(f"wrote {out}/bench_resnet34_gpu.{{csv,md}}, _rows.csv, .provenance.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
