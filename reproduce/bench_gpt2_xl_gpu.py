"""GPT-2 XL slice-wise training speed on one GPU: what the paper's 25.6M-token run would take at that rate.

On GPT-2 XL's architecture (random weights: speed does not depend on them), its 96 MLP matrices as two-site MPOs at
per-matrix CR 0.48 (bond dimension 832), batches of 8 x 1024 tokens, bf16 autocast, Adam on the factors:

- ``slice``: one MLP slice's training step (forward + backward + step) on a teacher activation (the serial and
  cache modes' unit of work), tokens/s; ``serial_min`` is 48 slices one after another over 25.6M tokens each, with
  the teacher forward each slice's batches need in serial mode (``teacher_prefix``: the mean prefix, half the net);
- ``teacher``: the teacher forward alone (bf16 weights, stopped after the last MLP), tokens/s;
- ``stream``: stream mode: one teacher forward feeds a training step of all 48 slices, tokens/s of the whole step;
  ``stream_min`` is the 25.6M-token run at that rate;
- peak GPU memory of each.

The paper: about 40k tokens/s per slice, 531 min serially for 48 slices on one GPU, 13.4 min on 48 GPUs. The
issue's target: at least 10x the paper's single-GPU rate, i.e. stream mode under 53 min.

Writes ``bench_gpt2_xl_gpu.csv``, ``.md`` and ``.provenance.json`` into ``--out`` (``results/``; ``--quick`` runs a
4-layer, width-256 GPT-2 on CPU or GPU in seconds, to check the script, and writes to ``runs/bench_gpt2_xl_quick``).

    python reproduce/bench_gpt2_xl_gpu.py            # on a GPU: a few minutes (the TT-SVD of 96 matrices included)
    python reproduce/bench_gpt2_xl_gpu.py --quick    # anywhere, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.activations.capture import capture
from tnlit.atomic import atomic_csv, atomic_text
from tnlit.markdown import markdown_table
from tnlit.methods.common import factor_parameters
from tnlit.provenance import write_provenance
from tnlit.slices import SliceModule, make_slices

ROOT = Path(__file__).resolve().parents[1]
PAPER_TOKENS = 25_000 * 1024  # the paper's OpenWebText subset: 25k sequences of 1024 tokens
PAPER_SLICE_TOKENS_S = 40_000  # about 40k tokens/s per slice (531 min / 48 slices over 25.6M tokens)
PAPER_SERIAL_MIN, PAPER_48GPU_MIN = 531.35, 13.4
PLAN = TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", sites=2, cr=0.48)])
FIELDS = ["measure", "tokens_per_s", "step_ms", "peak_mem_gib", "implied_min", "paper_min", "speedup_vs_paper"]


def build(quick: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, int, int]:
    """Teacher (bf16 on a GPU), student (fp32 factors, the rest frozen), batch size and sequence length."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tnlit.models import load_model

    if quick:
        config = GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=1024)
        teacher, batch, seq = GPT2LMHeadModel(config), 2, 128
    else:
        teacher, batch, seq = load_model("gpt2-xl-arch"), 8, 1024
    teacher = teacher.to(device).eval()
    started = time.perf_counter()
    student, report = tensorize(teacher, PLAN)  # TT-SVD on the device the weights are on
    print(f"tensorized in {time.perf_counter() - started:.1f} s: whole-model CR {report.compression_rate:.3f}")
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)  # frozen: half the memory and the bf16 tensor cores
    return teacher, student.to(device), batch, seq


def timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of ``step`` and the peak memory (GiB) it reached."""
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    """Time the three measures and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer, width-256 GPT-2: checks the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measure (after 3 warm-up steps)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the tables")
    args = parser.parse_args(argv)
    out = args.out or (ROOT / ("runs/bench_gpt2_xl_quick" if args.quick else "results"))
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher, student, batch, seq = build(args.quick, device)
    slices = make_slices(student)
    tokens = batch * seq
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    parts = [SliceModule(student, s) for s in slices]
    params = factor_parameters(parts)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=5e-5)

    # One slice, on the teacher's activation at its entry (the middle block: a typical one).
    middle = slices[len(slices) // 2]
    with autocast:
        x, y = capture(teacher, ids, [middle])[middle.name]
    part = SliceModule(student, middle)

    def slice_step() -> None:
        with autocast:
            loss = F.mse_loss(part(x).float(), y.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_step() -> None:
        with torch.no_grad(), autocast:
            capture(teacher, ids, slices)

    def stream_step() -> None:
        with autocast:
            pairs = capture(teacher, ids, slices)
            loss = sum(F.mse_loss(p(pairs[s.name][0]).float(), pairs[s.name][1].float()) for s, p in zip(slices, parts))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = {}
    for name, step in (("slice", slice_step), ("teacher", teacher_step), ("stream", stream_step)):
        seconds, peak = timed(step, device, warmup=3, steps=args.steps)
        measured[name] = (seconds, peak)
        print(f"{name}: {tokens / seconds:,.0f} tokens/s ({seconds * 1e3:.1f} ms a step), peak {peak:.2f} GiB")

    n = len(slices)
    slice_s, teacher_s, stream_s = (measured[k][0] for k in ("slice", "teacher", "stream"))
    # Serial: each slice trains over all tokens, and its batches need the teacher up to that slice (half on average).
    serial_min = n * PAPER_TOKENS / tokens * (slice_s + teacher_s / 2) / 60
    stream_min = PAPER_TOKENS / tokens * stream_s / 60
    rows = [
        {
            "measure": "slice (one MPO MLP step)",
            "tokens_per_s": round(tokens / slice_s),
            "step_ms": slice_s * 1e3,
            "peak_mem_gib": measured["slice"][1],
            "implied_min": serial_min,
            "paper_min": PAPER_SERIAL_MIN,
            "speedup_vs_paper": (tokens / slice_s) / PAPER_SLICE_TOKENS_S,
        },
        {
            "measure": "teacher forward (to the last MLP)",
            "tokens_per_s": round(tokens / teacher_s),
            "step_ms": teacher_s * 1e3,
            "peak_mem_gib": measured["teacher"][1],
        },
        {
            "measure": f"stream ({n} slices a step)",
            "tokens_per_s": round(tokens / stream_s),
            "step_ms": stream_s * 1e3,
            "peak_mem_gib": measured["stream"][1],
            "implied_min": stream_min,
            "paper_min": PAPER_SERIAL_MIN,
            "speedup_vs_paper": PAPER_SERIAL_MIN / stream_min,
        },
    ]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = round(value, 2)
    out.mkdir(parents=True, exist_ok=True)
    atomic_csv(out / "bench_gpt2_xl_gpu.csv", rows, FIELDS)
    name = "GPT-2 XL" if not args.quick else "a 4-layer width-256 GPT-2 (--quick)"
    lines = [
        f"# Slice-wise training speed: {name}, MLPs as two-site MPOs at CR 0.48, {batch} x {seq} tokens a batch",
        "",
        f"Written by reproduce/bench_gpt2_xl_gpu.py on {device}; implied minutes are for the paper's "
        f"{PAPER_TOKENS / 1e6:.1f}M tokens (serial: {n} slices one after another; stream: one pass). The "
        f"paper: about {PAPER_SLICE_TOKENS_S // 1000}k tokens/s per slice, {PAPER_SERIAL_MIN} min serially, "
        f"{PAPER_48GPU_MIN} min on 48 GPUs.",
        "",
    ]
    lines += markdown_table(FIELDS, ([r.get(f, "") for f in FIELDS] for r in rows))
    atomic_text(out / "bench_gpt2_xl_gpu.md", "\n".join(lines) + "\n")
    write_provenance(
        out / "bench_gpt2_xl_gpu.provenance.json", {"argv": argv, "quick": args.quick, "steps": args.steps}
    )
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
