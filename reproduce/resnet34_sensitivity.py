"""Which 3x3 convs of ResNet-34 to keep dense: the per-layer sensitivity sweep (PAPER.md: 4 layers, which UNKNOWN).

Each 3x3 conv of the residual blocks (``layer\\d\\.\\d+\\.conv[12]``, 32 of them) is tensorized alone at the target
CR (Tucker-2, HOSVD, no training) and the top-1 the model loses is measured on a held-out subset. Writes
``<out>/resnet34_<dataset>_sensitivity.csv`` and ``.png``, ``..._sensitivity_plan.yaml`` (the plan that keeps the
``k`` most sensitive layers dense, ready to paste into configs/resnet34/<dataset>/*.yaml) and a provenance JSON.

    python reproduce/resnet34_sensitivity.py --dataset cifar10        # teacher: runs/resnet34/cifar10/teacher.*
    python reproduce/resnet34_sensitivity.py --dataset cifar100 --cr 0.7 --k 4
    python reproduce/resnet34_sensitivity.py --dataset imagenet --data-root data/imagenet   # torchvision weights
    python reproduce/resnet34_sensitivity.py --smoke                  # made data, narrow random model, seconds

The held-out subset (``--split val``, the default) is ``--subset`` train images held out by the DataModule's seeded
split; the CIFAR teachers of configs/resnet34 train on all 50k, so these images are held out from the compression
runs, not from the teacher. ``--split test`` draws a seeded subset of the test set instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from tnlit.analysis.sensitivity import sensitivity_plan, sensitivity_sweep, write_sensitivity
from tnlit.pipeline import load_teacher
from tnlit.provenance import write_provenance
from tnlit.tensorize import Rule

PATTERN = r"layer\d\.\d+\.conv[12]"
TEACHERS = {"cifar10": "cifar-resnet34", "cifar100": "cifar100-resnet34", "imagenet": "resnet34-imagenet1k"}


def _loader(dataset: str, root: Path, split: str, subset: int, batch_size: int, workers: int) -> DataLoader:
    """The held-out images: ``subset`` train images held out by the DataModule, or a seeded test subset."""
    if dataset == "imagenet":
        from tnlit.data.imagenet import ImageNetDataModule

        data = ImageNetDataModule(root=root, val_size=subset if split == "val" else 0, num_workers=workers)
    else:
        from tnlit.data.cifar import CIFAR10DataModule, CIFAR100DataModule

        module = CIFAR10DataModule if dataset == "cifar10" else CIFAR100DataModule
        data = module(root=root, val_size=subset if split == "val" else 0, num_workers=workers)
    data.prepare_data()
    data.setup("validate")
    held = data.val_dataset
    if split == "test":
        pick = torch.randperm(len(data.test_dataset), generator=torch.Generator().manual_seed(0))[:subset]
        held = Subset(data.test_dataset, pick.tolist())
    return DataLoader(held, batch_size=batch_size, num_workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(TEACHERS), default="cifar10")
    parser.add_argument("--model", help="teacher model name (default: the dataset's ResNet-34)")
    weights_help = (
        "safetensors or tnlit fit checkpoint (default: runs/resnet34/<dataset>/teacher.safetensors for CIFAR; "
        "none for ImageNet, whose model name loads torchvision's)"
    )
    parser.add_argument("--teacher-weights", type=Path, help=weights_help)
    parser.add_argument("--data-root", type=Path, help="data folder (default: data, or data/imagenet)")
    parser.add_argument("--cr", type=float, default=0.5, help="per-layer CR of the Tucker-2 rule (default 0.5)")
    parser.add_argument("--k", type=int, default=4, help="layers to keep dense (the paper: 4)")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="where the held-out subset comes from")
    parser.add_argument("--subset", type=int, default=5000, help="held-out images (default 5000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder of the CSV, plot, plan")
    smoke_help = (
        "made CIFAR-layout data and a narrow random network (cifar-resnet34-w8): checks the script end to end in "
        "seconds; writes under runs/resnet34_smoke unless --out is given"
    )
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    args = parser.parse_args(argv)

    dataset = args.dataset
    if args.smoke:
        from tnlit.data.cifar import write_made_cifar

        dataset = "cifar10" if dataset == "imagenet" else dataset
        smoke = Path("runs/resnet34_smoke")
        args.data_root = args.data_root or smoke / "data"
        write_made_cifar(args.data_root, dataset, train=120, test=40)
        args.model = args.model or ("cifar-resnet34-w8" if dataset == "cifar10" else "cifar100-resnet34-w8")
        args.subset, args.workers, args.batch_size = min(args.subset, 40), 0, 64
        if args.out == Path("results"):
            args.out = smoke / "results"
    model_name = args.model or TEACHERS[dataset]
    weights = args.teacher_weights
    if weights is None and dataset != "imagenet" and not args.smoke:
        weights = Path(f"runs/resnet34/{dataset}/teacher.safetensors")
    root = args.data_root or Path("data/imagenet" if dataset == "imagenet" else "data")

    model = load_teacher(model_name, weights)
    loader = _loader(dataset, root, args.split, args.subset, args.batch_size, args.workers)
    rule = Rule(pattern=PATTERN, format="tucker", cr=args.cr)
    dense, rows = sensitivity_sweep(model, loader, rule, device=args.device, verbose=True)
    plan = sensitivity_plan(rows, rule, k=args.k)
    stem = args.out / f"resnet34_{dataset}_sensitivity"
    title = (
        f"ResNet-34 ({model_name}) on {dataset}: each 3x3 conv alone at CR {args.cr}, "
        f"{len(loader.dataset)} {args.split} images"
    )
    paths = write_sensitivity(rows, dense, plan, stem, title=title)
    write_provenance(
        Path(f"{stem}.provenance.json"),
        {
            "model": model_name,
            "teacher_weights": str(weights) if weights else None,
            "dataset": dataset,
            "data_root": str(root),
            "cr": args.cr,
            "k": args.k,
            "split": args.split,
            "held_out_images": len(loader.dataset),
            "smoke": args.smoke,
            "dense_top1": dense,
        },
    )
    print(f"dense top-1 {dense:.2f}; kept dense: {', '.join(plan.exclude)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
