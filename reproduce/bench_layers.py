"""Benchmark tnlit's tensorized layers against the dense layer they replace and against tensorly-torch.

For every case (a layer shape at a compression rate) and batch size it times, as medians:

- the forward under ``torch.no_grad``, and
- the forward + backward (``loss = y.float().square().mean()``, gradients w.r.t. the parameters and the input),

of five variants: the dense module (``nn.Linear`` / ``nn.Conv2d``), ours with ``contraction="auto"``, ours forced
to ``"factors"``, ours forced to ``"dense"`` (rebuild the weight, one GEMM / conv), and tensorly-torch's factorized
layer with the same factors (or the closest parameter count it allows).

It writes ``bench_layers.csv``, ``bench_layers.md`` (the same table, then the issue's three targets and whether each
is met) and ``bench_layers.provenance.json`` into ``--out``. The tables are rewritten after every case, so a run cut
short still leaves its finished rows. The per-case FLOP counts of the two strategies (``layer._costs``) are in the
table too: they are what each layer type's ``factor_overhead`` (``tnlit/layers/base.py``) is calibrated against.

    python reproduce/bench_layers.py --quick          # smoke run, ~20 s on CPU
    python reproduce/bench_layers.py                  # full run, ~11 minutes on 2 CPU cores
    python reproduce/bench_layers.py --device cuda --dtype bfloat16
    # map where the two strategies cross over, into a scratch folder:
    python reproduce/bench_layers.py --only "c_fc MPO" --tokens 2,4,8,12,16,24,32,48 --out /tmp/crossover
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import gc
import io
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlit.atomic import atomic_text
from tnlit.formats.ranks import balanced_factors, lowrank_rank_for_cr, mpo_bond_dims, tucker2_ranks
from tnlit.layers import LowRankLinear, MPOLinear, TensorizedLayer, TuckerConv2d
from tnlit.markdown import markdown_table
from tnlit.provenance import write_provenance

with warnings.catch_warnings():
    # tensorly-torch warns on import about optional backends; it is noise in a benchmark log.
    warnings.simplefilter("ignore")
    import tltorch

# The targets (see the Markdown footer written by `targets_markdown`).
TRAINING_TOKENS = 4096  # linear layers: a training step's tokens
TRAINING_IMAGES = 64  # convolutions: a training step's images
TARGET_TRAIN_VS_DENSE = 1.3  # (1) ours fwd+bwd within 1.3x of the dense layer at training batch sizes
TARGET_AUTO_VS_BEST = 1.10  # (2) auto within 10% of the better of the two strategies, at every batch size

VARIANTS = ("dense", "auto", "factors", "forced_dense", "tltorch")
MODES = ("fwd", "fwdbwd")


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One layer to tensorize, and the batch sizes to time it at.

    ``kind`` is ``"mpo"``, ``"lowrank"`` (linear layers, batch = tokens) or ``"tucker"`` (3x3 conv, batch = images).
    """

    name: str
    kind: str
    d_in: int  # in features, or in channels
    d_out: int  # out features, or out channels
    cr: float
    batches: tuple[int, ...]
    sites: int = 2  # MPO only
    hw: int = 0  # conv only: input height = width
    stride: int = 1  # conv only


def build_cases(quick: bool) -> list[Case]:
    """The issue's cases: GPT-2 XL / small MLP shapes as MPOs and low rank, ResNet-34's 3x3 convs as Tucker-2."""
    tokens = (1, 64, 512, TRAINING_TOKENS)
    # The bond-832 and bond-160 MPOs change strategy between 1 and 64 tokens; 16 lands in between.
    xl_tokens = (1, 16, 64, 512, TRAINING_TOKENS)
    images = (1, 8, TRAINING_IMAGES)
    if quick:
        # One case per layer type at small batches: checks that everything runs, not the numbers.
        return [
            Case("gpt2-xl c_fc MPO cr0.48", "mpo", 1600, 6400, 0.48, (1, 64)),
            Case("gpt2 c_fc MPO-3 cr0.48", "mpo", 768, 3072, 0.48, (64,), sites=3),
            Case("gpt2-xl c_fc lowrank cr0.9", "lowrank", 1600, 6400, 0.9, (64,)),
            Case("resnet34 conv2_x tucker cr0.5", "tucker", 64, 64, 0.5, (1, 8), hw=32),
        ]
    return [
        # The paper's setting: two-site MPO at CR 0.48 (bond 832), which costs more per token than the GEMM.
        Case("gpt2-xl c_fc MPO cr0.48", "mpo", 1600, 6400, 0.48, xl_tokens),
        Case("gpt2-xl c_proj MPO cr0.48", "mpo", 6400, 1600, 0.48, xl_tokens),
        # A low bond dimension (160), where contracting factor by factor should win at small batches.
        Case("gpt2-xl c_fc MPO cr0.9", "mpo", 1600, 6400, 0.9, xl_tokens),
        Case("gpt2 c_fc MPO-3 cr0.48", "mpo", 768, 3072, 0.48, tokens, sites=3),
        Case("gpt2 c_proj MPO-3 cr0.48", "mpo", 3072, 768, 0.48, tokens, sites=3),
        Case("gpt2-xl c_fc lowrank cr0.48", "lowrank", 1600, 6400, 0.48, tokens),
        Case("gpt2-xl c_fc lowrank cr0.9", "lowrank", 1600, 6400, 0.9, tokens),
        # ResNet-34 on CIFAR (32x32 inputs): one 3x3 conv per stage, plus the first stride-2 conv of stage 3.
        Case("resnet34 conv2_x tucker cr0.5", "tucker", 64, 64, 0.5, images, hw=32),
        Case("resnet34 conv3_x tucker cr0.5", "tucker", 128, 128, 0.5, images, hw=16),
        Case("resnet34 conv4_x tucker cr0.5", "tucker", 256, 256, 0.5, images, hw=8),
        Case("resnet34 conv5_x tucker cr0.5", "tucker", 512, 512, 0.5, images, hw=4),
        Case("resnet34 conv3_1 s2 tucker cr0.5", "tucker", 64, 128, 0.5, images, hw=32, stride=2),
    ]


def select_cases(args: argparse.Namespace) -> list[Case]:
    """The cases ``--only`` keeps, with the batch sizes ``--tokens`` / ``--images`` give, if given."""
    cases = [c for c in build_cases(args.quick) if not args.only or any(s in c.name for s in args.only)]
    if not cases:
        raise SystemExit(f"no case matches --only {args.only}")
    override = {"tucker": args.images}
    return [dataclasses.replace(c, batches=override.get(c.kind, args.tokens) or c.batches) for c in cases]


# --------------------------------------------------------------------------------------------- modules


@dataclass
class Modules:
    """The modules of one case: the dense one, ours (its ``contraction`` switched per variant) and tensorly-torch's."""

    dense: nn.Module
    ours: TensorizedLayer
    tltorch: nn.Module
    layer: str  # a one-line description of ours, for the table
    params_tltorch: int


def factor_params(module: nn.Module) -> int:
    """Parameters of a module without its bias (ours counts factors only; the bias stays dense in all variants)."""
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))


def build_mpo(case: Case) -> Modules:
    """nn.Linear, MPOLinear at the CR's bond dims, and tltorch's block tensor-train matrix with the same cores.

    Ours is built from its constructor at the bond dimensions ``from_dense`` would pick for the CR (the same
    ``mpo_bond_dims`` rule): the timings do not depend on the weights' values, and this skips a TT-SVD per case.
    """
    in_dims, out_dims = balanced_factors(case.d_in, case.sites), balanced_factors(case.d_out, case.sites)
    bonds = mpo_bond_dims(in_dims, out_dims, cr=case.cr)
    ours = MPOLinear(in_dims, out_dims, bonds)
    # BlockTT with tensorized shape (out_dims, in_dims) has cores (bond, out_k, in_k, bond): our cores, transposed,
    # so the parameter count is identical.
    theirs = tltorch.FactorizedLinear(
        in_dims, out_dims, bias=True, factorization="blocktt", rank=(1, *bonds, 1), implementation="factorized"
    )
    layer = f"MPOLinear {in_dims}->{out_dims} bond={bonds}"
    return Modules(nn.Linear(case.d_in, case.d_out), ours, theirs, layer, factor_params(theirs))


def build_lowrank(case: Case) -> Modules:
    """nn.Linear, LowRankLinear at the CR's rank, and tltorch's CP matrix of the same rank.

    A rank-r CP of a matrix is ``A diag(w) B^T``, our two factors plus r weights: the closest tltorch layer.
    """
    rank = lowrank_rank_for_cr(case.d_in, case.d_out, cr=case.cr)
    ours = LowRankLinear(case.d_in, case.d_out, rank)
    theirs = tltorch.FactorizedLinear(
        (case.d_in,), (case.d_out,), bias=True, factorization="cp", rank=rank, implementation="factorized"
    )
    layer = f"LowRankLinear rank={rank}"
    return Modules(nn.Linear(case.d_in, case.d_out), ours, theirs, layer, factor_params(theirs))


def build_tucker(case: Case) -> Modules:
    """nn.Conv2d (3x3, padding 1, no bias as in ResNet), TuckerConv2d at the CR's ranks, tltorch's Tucker conv.

    tltorch's Tucker factorizes every mode; ranks (r_out, r_in, 3, 3) keep the spatial modes full, which adds two
    3x3 factor matrices (18 parameters) to ours: the closest match it allows.
    """
    r_out, r_in = tucker2_ranks(case.d_out, case.d_in, (3, 3), cr=case.cr)
    conv = {"stride": case.stride, "padding": 1, "bias": False}
    ours = TuckerConv2d(case.d_in, case.d_out, 3, (r_out, r_in), **conv)
    theirs = tltorch.FactorizedConv(
        case.d_in,
        case.d_out,
        3,
        order=2,
        factorization="tucker",
        rank=(r_out, r_in, 3, 3),
        implementation="factorized",
        **conv,
    )
    theirs.reset_parameters()  # tltorch leaves the factors uninitialised (torch.empty)
    layer = f"TuckerConv2d {case.d_in}->{case.d_out} s{case.stride} @{case.hw}x{case.hw} ranks={(r_out, r_in)}"
    return Modules(nn.Conv2d(case.d_in, case.d_out, 3, **conv), ours, theirs, layer, factor_params(theirs))


def build_modules(case: Case, device: torch.device) -> Modules:
    """The three modules of a case, in float32 on ``device`` (bf16 runs go through autocast)."""
    builders = {"mpo": build_mpo, "lowrank": build_lowrank, "tucker": build_tucker}
    mods = builders[case.kind](case)
    for m in (mods.dense, mods.ours, mods.tltorch):
        m.to(device)
    return mods


# --------------------------------------------------------------------------------------------- inputs


def make_input(case: Case, batch: int, device: torch.device) -> torch.Tensor:
    """A random input: ``(tokens, d_in)`` for linear layers, ``(images, c_in, hw, hw)`` for convolutions."""
    shape = (batch, case.d_in, case.hw, case.hw) if case.kind == "tucker" else (batch, case.d_in)
    return torch.randn(shape, device=device)


def strategy_key(case: Case, x: torch.Tensor) -> Hashable:
    """The key ours passes to ``strategy`` / ``_costs`` for this input (linear: rows; conv: the whole shape)."""
    return tuple(x.shape) if case.kind == "tucker" else math.prod(x.shape[:-1])


# --------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingPlan:
    """How long to time each call: enough repeats for a stable median, without the 12-minute CPU run growing.

    Warm-up runs ``warmup`` calls but stops once ``warmup_s`` is spent (a 3-second call needs no second warm-up);
    timing runs at least ``min_repeats`` and at most ``repeats`` calls, stopping once ``budget_s`` is spent. Calls
    shorter than ``rewarm_below_s`` are repeated untimed for ``rewarm_s`` before each timed one (see ``median_times``).
    """

    warmup: int
    warmup_s: float
    repeats: int
    min_repeats: int
    budget_s: float
    rewarm_below_s: float = 0.05
    rewarm_s: float = 0.02


@dataclass
class Timed:
    """One thing to time: ``run`` is timed, ``before`` (untimed) puts the shared module in the right state."""

    name: str
    run: Callable[[], None]
    before: Callable[[], None]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock time measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(call: Timed, device: torch.device) -> float:
    """Seconds one call takes, its queued kernels included."""
    call.before()
    synchronize(device)
    t0 = time.perf_counter()
    call.run()
    synchronize(device)
    return time.perf_counter() - t0


def warm_up(call: Timed, device: torch.device, plan: TimingPlan) -> float:
    """Untimed calls first: the allocator's pools, the opt_einsum path, autograd's and oneDNN's lazy setup.

    Returns the last warm-up call's seconds.
    """
    spent = last = 0.0
    for _ in range(plan.warmup):
        last = time_once(call, device)
        spent += last
        if spent >= plan.warmup_s:
            break
    return last


def rewarm(call: Timed, device: torch.device, seconds: float) -> None:
    """Untimed calls for ``seconds`` (at least one), to bring back the state a long call of another variant lost."""
    spent = 0.0
    while spent < seconds:
        spent += time_once(call, device)


def median_times(calls: Sequence[Timed], device: torch.device, plan: TimingPlan) -> dict[str, float]:
    """``{name: median ms}``. The calls are timed in rounds, one of each per round, so that a change of load on a
    shared machine (other jobs on the same cores) hits every variant alike instead of whichever ran then."""
    # A short call timed right after another variant's long one runs measurably slower (caches evicted by a
    # 40 MB weight gradient, worker threads gone to sleep): up to 1.5x at 0.2 ms. Before each timed run, a short
    # call is repeated untimed for `rewarm_s`, so that it is timed in the steady state a loop of it would reach.
    short = {call.name: warm_up(call, device, plan) < plan.rewarm_below_s for call in calls}
    samples: dict[str, list[float]] = {call.name: [] for call in calls}

    def finished(times: list[float]) -> bool:
        return len(times) >= plan.repeats or (len(times) >= plan.min_repeats and sum(times) >= plan.budget_s)

    active = list(calls)
    while active:
        for call in active:
            if short[call.name]:
                rewarm(call, device, plan.rewarm_s)
            samples[call.name].append(time_once(call, device))
        active = [call for call in active if not finished(samples[call.name])]
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def autocast_for(device: torch.device, dtype: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the autocast context: bf16 runs autocast the forward, float32 runs leave it disabled."""
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def forward_fn(module: nn.Module, x: torch.Tensor, autocast: Callable[[], AbstractContextManager[Any]]):
    """The inference call: forward only, no autograd graph."""

    def run() -> None:
        with torch.no_grad(), autocast():
            module(x)

    return run


def forward_backward_fn(module: nn.Module, x: torch.Tensor, autocast: Callable[[], AbstractContextManager[Any]]):
    """The training call: forward, a scalar loss in float32, gradients w.r.t. every parameter and the input.

    ``autograd.grad`` instead of ``backward`` so that no ``.grad`` accumulates across repeats.
    """
    x = x.detach().requires_grad_(True)
    wrt = [*(p for p in module.parameters() if p.requires_grad), x]

    def run() -> None:
        with autocast():
            loss = module(x).float().square().mean()
        torch.autograd.grad(loss, wrt)

    return run


def variants_to_skip(chosen: str, flops_factors: float, flops_dense: float, skip_ratio: float) -> dict[str, str]:
    """``{variant: why}`` for the strategies not worth timing: modelled at over ``skip_ratio`` times the other's FLOPs.

    The factor sweep of the bond-832 MPO at 4096 tokens would take minutes and a 44 GB intermediate, and at such
    a margin the measurement cannot change which strategy is better; auto is skipped only if it picked such a one.
    """
    if skip_ratio <= 0:
        return {}
    skip = {}
    if flops_factors > skip_ratio * flops_dense:
        skip["factors"] = f"factors ({flops_factors / flops_dense:.1f}x the FLOPs of dense)"
    if flops_dense > skip_ratio * flops_factors:
        skip["forced_dense"] = f"forced_dense ({flops_dense / flops_factors:.1f}x the FLOPs of factors)"
    picked = "factors" if chosen == "factors" else "forced_dense"
    if picked in skip:
        skip["auto"] = f"auto (picked {chosen})"
    return skip


def time_variants(
    mods: Modules, x: torch.Tensor, device: torch.device, dtype: str, plan: TimingPlan, skip: Sequence[str]
) -> dict[str, float]:
    """``{"<variant>_<mode>_ms": median}`` for the five variants and both modes; NaN for the skipped ones."""
    autocast = autocast_for(device, dtype)
    # auto, factors and forced_dense are one module whose `contraction` each call sets (untimed) before running.
    contraction = {"auto": "auto", "factors": "factors", "forced_dense": "dense"}
    modules = {"dense": mods.dense, "tltorch": mods.tltorch}
    calls = []
    for variant in VARIANTS:
        if variant in skip:
            continue
        module = modules.get(variant, mods.ours)
        before = functools.partial(setattr, mods.ours, "contraction", contraction.get(variant, "auto"))
        calls.append(Timed(f"{variant}_fwd_ms", forward_fn(module, x, autocast), before))
        calls.append(Timed(f"{variant}_fwdbwd_ms", forward_backward_fn(module, x, autocast), before))
    times = median_times(calls, device, plan)
    mods.ours.contraction = "auto"
    return {f"{v}_{m}_ms": times.get(f"{v}_{m}_ms", math.nan) for v in VARIANTS for m in MODES}


# ----------------------------------------------------------------------------------------------- rows

COLUMNS = (
    "case",
    "layer",
    "shape",
    "batch",
    "params_dense",
    "params_ours",
    "params_tltorch",
    "auto_strategy",
    "flops_factors",
    "flops_dense",
    "skipped",
    *(f"{v}_{m}_ms" for m in MODES for v in VARIANTS),
    "auto_vs_dense_fwd",
    "auto_vs_dense_fwdbwd",
    "auto_vs_best_fwd",
    "auto_vs_best_fwdbwd",
    "chosen_vs_best_fwd",
    "chosen_vs_best_fwdbwd",
    "auto_vs_tltorch_fwd",
    "auto_vs_tltorch_fwdbwd",
)


def ratios(times: dict[str, float], chosen: str) -> dict[str, float]:
    """The ratios the issue asks for, plus ``chosen_vs_best``: the forced time of the strategy auto picked over
    the better forced time. It separates a wrong pick (> 1.1) from auto's own overhead or timing noise."""
    out: dict[str, float] = {}
    for m in MODES:
        # A skipped strategy (NaN) is out of the running for the best.
        measured = [t for t in (times[f"factors_{m}_ms"], times[f"forced_dense_{m}_ms"]) if not math.isnan(t)]
        auto, best = times[f"auto_{m}_ms"], min(measured)
        chosen_ms = times[f"factors_{m}_ms"] if chosen == "factors" else times[f"forced_dense_{m}_ms"]
        out[f"auto_vs_dense_{m}"] = auto / times[f"dense_{m}_ms"]
        out[f"auto_vs_best_{m}"] = auto / best
        out[f"chosen_vs_best_{m}"] = chosen_ms / best
        out[f"auto_vs_tltorch_{m}"] = auto / times[f"tltorch_{m}_ms"]
    return out


def shape_of(case: Case) -> str:
    """The dense layer's shape, e.g. ``1600->6400`` or ``64->128 k3 s2 @32x32``."""
    if case.kind == "tucker":
        return f"{case.d_in}->{case.d_out} k3 s{case.stride} @{case.hw}x{case.hw}"
    return f"{case.d_in}->{case.d_out}"


def run_case(case: Case, device: torch.device, dtype: str, plan: TimingPlan, skip_ratio: float) -> list[dict[str, Any]]:
    """Every row of one case: build its modules once, then time each batch size."""
    mods = build_modules(case, device)
    rows = []
    for batch in case.batches:
        x = make_input(case, batch, device)
        key = strategy_key(case, x)
        chosen = mods.ours.strategy(key)
        flops_factors, flops_dense = mods.ours._costs(key)
        skip = variants_to_skip(chosen, flops_factors, flops_dense, skip_ratio)
        times = time_variants(mods, x, device, dtype, plan, tuple(skip))
        row = {
            "case": case.name,
            "layer": mods.layer,
            "shape": shape_of(case),
            "batch": batch,
            "params_dense": factor_params(mods.dense),
            "params_ours": mods.ours.num_params(),
            "params_tltorch": mods.params_tltorch,
            "auto_strategy": chosen,
            "flops_factors": flops_factors,
            "flops_dense": flops_dense,
            "skipped": "; ".join(skip.values()),
            **times,
            **ratios(times, chosen),
        }
        rows.append(row)
        log_row(row)
    del mods
    gc.collect()  # the GPT-2 XL modules are 40 MB each; free them before the next case builds its own
    return rows


def log_row(row: dict[str, Any]) -> None:
    """One progress line per row on stderr, so a long run can be followed with ``tail -f``."""
    print(
        f"{row['case']:<34} batch={row['batch']:<5} auto={row['auto_strategy']:<8} "
        f"dense {row['dense_fwd_ms']:9.3f}/{row['dense_fwdbwd_ms']:9.3f} ms  "
        f"auto {row['auto_fwd_ms']:9.3f}/{row['auto_fwdbwd_ms']:9.3f}  "
        f"factors {row['factors_fwd_ms']:9.3f}/{row['factors_fwdbwd_ms']:9.3f}  "
        f"forced_dense {row['forced_dense_fwd_ms']:9.3f}/{row['forced_dense_fwdbwd_ms']:9.3f}  "
        f"tltorch {row['tltorch_fwd_ms']:9.3f}/{row['tltorch_fwdbwd_ms']:9.3f}",
        file=sys.stderr,
        flush=True,
    )


# -------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One of the issue's targets, judged over the rows it applies to."""

    text: str
    checked: int
    failures: list[str]

    @property
    def met(self) -> bool:
        return not self.failures


def is_training_batch(row: dict[str, Any]) -> bool:
    """Training batch sizes: >= 4096 tokens for linear layers, >= 64 images for convolutions."""
    conv = row["layer"].startswith("TuckerConv2d")
    return row["batch"] >= (TRAINING_IMAGES if conv else TRAINING_TOKENS)


def where(row: dict[str, Any]) -> str:
    """A row's name in a target's list of failures."""
    return f"{row['case']} @ batch {row['batch']}"


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[Target]:
    """The issue's three targets, computed from the measured rows (a skipped, NaN, ratio fails no comparison)."""
    train = [r for r in rows if is_training_batch(r)]
    t1 = Target(
        f"(1) at training batch sizes (>= {TRAINING_TOKENS} tokens, >= {TRAINING_IMAGES} images), forward+backward "
        f"of ours (auto) within {TARGET_TRAIN_VS_DENSE}x of the dense layer",
        len(train),
        [
            f"{where(r)}: {r['auto_vs_dense_fwdbwd']:.2f}x"
            for r in train
            if r["auto_vs_dense_fwdbwd"] > TARGET_TRAIN_VS_DENSE
        ],
    )
    t2_fail = [
        f"{where(r)} {m}: auto {r[f'auto_vs_best_{m}']:.2f}x of best (picked {r['auto_strategy']}, which is "
        f"{r[f'chosen_vs_best_{m}']:.2f}x of best)"
        for r in rows
        for m in MODES
        if r[f"auto_vs_best_{m}"] > TARGET_AUTO_VS_BEST
    ]
    t2 = Target(
        f"(2) at every batch size, auto within {round(100 * (TARGET_AUTO_VS_BEST - 1))}% of the better of the two "
        "strategies (forward and forward+backward)",
        2 * len(rows),
        t2_fail,
    )
    t3_fail = [
        f"{where(r)} {m}: {r[f'auto_vs_tltorch_{m}']:.2f}x of tensorly-torch"
        for r in rows
        for m in MODES
        if r[f"auto_vs_tltorch_{m}"] >= 1.0
    ]
    t3 = Target("(3) ours (auto) faster than tensorly-torch (forward and forward+backward)", 2 * len(rows), t3_fail)
    return [t1, t2, t3]


# --------------------------------------------------------------------------------------------- output


def fmt(value: Any) -> str:
    """Numbers for humans: times and ratios to 3 decimals, FLOPs in scientific notation."""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3e}" if abs(value) >= 1e6 else f"{value:.3f}"
    return str(value)


def csv_cell(value: Any) -> Any:
    """Floats to 6 significant digits; a skipped measurement (NaN) as an empty cell."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV under the fixed header ``COLUMNS``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def targets_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The issue's targets under the table: met or not, with each failing row."""
    lines = ["## Targets", ""]
    for t in evaluate_targets(rows):
        if t.checked == 0:
            verdict = "not checked (no row in this run applies)"
        elif t.met:
            verdict = f"**met** ({t.checked} checks)"
        else:
            verdict = f"**not met** ({len(t.failures)} of {t.checked} checks fail)"
        lines.append(f"- {t.text}: {verdict}")
        lines.extend(f"  - {f}" for f in t.failures)
    return "\n".join(lines) + "\n"


def run_kind(args: argparse.Namespace) -> str:
    """``quick``, ``full``, or ``selected`` (cases or batch sizes narrowed by --only / --tokens / --images)."""
    if args.only or args.tokens or args.images:
        return ("quick, " if args.quick else "") + "selected"
    return "quick" if args.quick else "full"


def markdown_text(rows: Sequence[dict[str, Any]], args: argparse.Namespace, elapsed_s: float, done: bool) -> str:
    """The rows as a Markdown table, then the targets."""
    status = f"complete, {elapsed_s:.0f} s" if done else f"partial ({elapsed_s:.0f} s so far)"
    head = [
        "# Tensorized layers: time against the dense layer and tensorly-torch",
        "",
        f"Device `{args.device}`, dtype `{args.dtype}`, {torch.get_num_threads()} CPU threads, "
        f"{run_kind(args)} run, {status}. Times are medians in ms; `fwd` is the forward under "
        "no_grad, `fwdbwd` forward + backward w.r.t. parameters and input. `forced_dense` is ours rebuilding the "
        "weight; `chosen_vs_best` is the forced time of the strategy auto picked over the better forced time. "
        f"`–` is a measurement not taken (column `skipped`): a strategy modelled at over {args.skip_ratio:g}x the "
        "other's FLOPs, left out of `best`.",
        "",
    ]
    body = markdown_table(COLUMNS, ([fmt(r[c]) for c in COLUMNS] for r in rows))
    return "\n".join(head + body) + "\n\n" + targets_markdown(rows)


def write_tables(rows: Sequence[dict[str, Any]], args: argparse.Namespace, elapsed_s: float, done: bool) -> None:
    """(Re)write the CSV and the Markdown in ``--out``."""
    out = Path(args.out)
    atomic_text(out / "bench_layers.csv", csv_text(rows))
    atomic_text(out / "bench_layers.md", markdown_text(rows, args, elapsed_s, done))


# ----------------------------------------------------------------------------------------------- main


def batch_list(text: str) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``, for argparse."""
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Time tnlit's tensorized layers (MPOLinear, LowRankLinear, TuckerConv2d) against nn.Linear / nn.Conv2d "
            "and tensorly-torch, forward and forward+backward, at GPT-2 and ResNet-34 shapes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run the layers")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype; bfloat16 runs the forward under torch.autocast (parameters stay float32). Meant for "
        "CUDA: a CPU without native bf16 matmul (AVX512-BF16 / AMX) runs it some 100x slower than float32",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a few cases at small batches, at most 3 repeats, 1 warm-up call",
    )
    p.add_argument("--repeats", type=int, default=11, help="most timed calls per measurement (the median is kept)")
    p.add_argument(
        "--min-repeats",
        type=int,
        default=3,
        help="fewest timed calls per measurement, even when one call exceeds --budget-s",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=1.5,
        help="seconds per measurement after which timing stops (once --min-repeats calls are done)",
    )
    p.add_argument("--warmup", type=int, default=3, help="most untimed warm-up calls before each measurement")
    p.add_argument(
        "--warmup-s", type=float, default=0.5, help="seconds after which warm-up stops (at least one call is made)"
    )
    p.add_argument(
        "--skip-ratio",
        type=float,
        default=4.0,
        help="skip timing a forced strategy whose modelled FLOPs (layer._costs) exceed this many times the other's; "
        "0 times everything",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="SUBSTRING",
        help="time only the cases whose name contains SUBSTRING (repeatable; e.g. 'lowrank', 'conv3_x')",
    )
    p.add_argument(
        "--tokens",
        type=batch_list,
        metavar="N,N,...",
        help="batch sizes (tokens) for every linear case instead of the built-in ones, e.g. 4,8,16,32",
    )
    p.add_argument(
        "--images",
        type=batch_list,
        metavar="N,N,...",
        help="batch sizes (images) for every convolution case instead of the built-in ones",
    )
    p.add_argument("--out", default="results", help="folder for bench_layers.{csv,md,provenance.json}")
    args = p.parse_args(argv)
    if args.quick:
        # A smoke run checks that every variant runs; its numbers are not for reading.
        args.repeats, args.min_repeats, args.budget_s, args.warmup = min(args.repeats, 3), 1, 0.2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    if args.device == "cpu" and args.dtype == "bfloat16":
        print("warning: bf16 matmuls on a CPU without AVX512-BF16 / AMX are emulated and very slow", file=sys.stderr)
    if not 1 <= args.min_repeats <= args.repeats:
        p.error("need 1 <= --min-repeats <= --repeats")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    plan = TimingPlan(args.warmup, args.warmup_s, args.repeats, args.min_repeats, args.budget_s)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in select_cases(args):
        rows.extend(run_case(case, device, args.dtype, plan, args.skip_ratio))
        write_tables(rows, args, time.perf_counter() - start, done=False)
    elapsed = time.perf_counter() - start
    write_tables(rows, args, elapsed, done=True)
    write_provenance(Path(args.out) / "bench_layers.provenance.json", vars(args))
    print(f"done in {elapsed:.0f} s; wrote {args.out}/bench_layers.{{csv,md,provenance.json}}", file=sys.stderr)


if __name__ == "__main__":
    main()
