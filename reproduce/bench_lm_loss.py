"""Benchmark a causal LM's global-finetuning step with the full logits against the chunked losses, side by side.

One ``GlobalFinetune.training_step`` plus its backward pass (next-token loss + logit distillation over the whole
vocabulary, ``kd_weight`` 0.5) on a tensorized student (its MLPs low rank at per-matrix CR 0.5), the two paths
interleaved in one run, so that the ratio is fair on a shared machine: ``full`` (``chunked_logits: false``: the
batch's logits, teacher's and student's, whole) and ``chunked`` (``tnlit.methods.lm_loss``: from the final hidden
states a chunk of tokens at a time). Reports each step's median seconds, their ratio, the losses (they must agree)
and, on CUDA, the peak memory of each step.

    python reproduce/bench_lm_loss.py                              # SmolLM2-135M (49k vocabulary), CPU
    python reproduce/bench_lm_loss.py --device cuda --batch 8 --seq_len 1024
    python reproduce/bench_lm_loss.py --model tiny-gpt2-bytes --repeats 2   # a smoke run (tests)

Writes ``<out>/bench_lm_loss.{csv,md,provenance.json}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.atomic import atomic_csv, atomic_text
from tnlit.markdown import markdown_table
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.models.weights import load_teacher
from tnlit.provenance import write_provenance

MLP = r"(model\.layers\.\d+\.mlp\.(gate|up|down)_proj|transformer\.h\.\d+\.mlp\.c_(fc|proj))"
COLUMNS = ["model", "device", "tokens", "vocabulary", "path", "step_s", "ratio_to_full", "loss", "peak_mb"]


def timed_step(module: GlobalFinetune, ids: torch.Tensor, device: torch.device) -> tuple[float, float, float | None]:
    """``(seconds, loss, peak MB or None)`` of one training step and its backward pass."""
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loss = module.training_step(ids, 0)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return seconds, loss.item(), peak


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    teacher = load_teacher(args.model).to(device).eval()
    student, _ = tensorize(copy.deepcopy(teacher), TensorizePlan([Rule(MLP, "lowrank", cr=0.5)]))
    vocabulary = teacher.get_output_embeddings().out_features
    ids = torch.randint(0, vocabulary, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    modules = {
        path: GlobalFinetune(student, task="causal_lm", teacher=teacher, kd_weight=0.5, chunked_logits=chunked)
        for path, chunked in (("full", False), ("chunked", True))
    }
    samples: dict[str, list[tuple[float, float, float | None]]] = {path: [] for path in modules}
    for module in modules.values():
        module.log = lambda *a, **k: None  # no Trainer attached: the step's logging has nowhere to go
        module.train()
        timed_step(module, ids, device)  # warm-up (and the chunked path's one-off check of the model's head)
    for _ in range(args.repeats):
        for path, module in modules.items():  # interleaved: both paths see the same machine load
            samples[path].append(timed_step(module, ids, device))
    full = statistics.median(s for s, _, _ in samples["full"])
    rows = []
    for path, runs in samples.items():
        step = statistics.median(s for s, _, _ in runs)
        peaks = [p for _, _, p in runs if p is not None]
        rows.append(
            {
                "model": args.model,
                "device": str(device),
                "tokens": args.batch * args.seq_len,
                "vocabulary": vocabulary,
                "path": path,
                "step_s": round(step, 3),
                "ratio_to_full": round(step / full, 3),
                "loss": round(runs[-1][1], 5),
                "peak_mb": round(max(peaks), 1) if peaks else "",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model name or a Hugging Face directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default="results", help="where bench_lm_loss.* are written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_csv(out / "bench_lm_loss.csv", rows, COLUMNS)
    title = f"# Global-finetuning step of {args.model}: full logits vs chunked losses (`reproduce/bench_lm_loss.py`)"
    table = markdown_table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    atomic_text(out / "bench_lm_loss.md", "\n".join([title, "", *table, ""]))
    write_provenance(out / "bench_lm_loss.provenance.json", vars(args))
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main()
