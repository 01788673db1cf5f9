"""Calibration: the input covariances of a model's layers, and the activation-aware initialisation they allow.

``input_covariances`` runs the dense teacher on a few batches and sums ``X^T X`` of each named layer's
inputs; ``activation_init_`` then re-fits a tensorized student's factors to minimise the output error on
those inputs (``tnlit.formats.whiten``) instead of the weight error of the plain SVD / TT-SVD / HOSVD::

    covs = input_covariances(teacher, calibration_batches, names=[r.name for r in report.layers])
    stats = activation_init_(student, teacher, covs)

The covariances of the teacher's inputs are the right target when each student layer is meant to copy its
teacher layer; the calls take any model, so passing the student (its layers take ``TensorizedLayer`` inputs
too) gives sequential calibration on the student's own activations instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from tnlit.activations.capture import StopForward, batch_input
from tnlit.formats.canonical import mpo_mixed_canonical, tucker2_orthonormal
from tnlit.formats.mpo import mpo_to_matrix
from tnlit.formats.tucker import tucker2_to_kernel
from tnlit.formats.whiten import (
    DEFAULT_DAMPING,
    fit_to_covariance_,
    output_error,
    tucker2_outer_fit,
    whitened_lowrank,
)
from tnlit.layers.base import TensorizedLayer, dense_weight_io, is_hf_conv1d
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import FactorizedLinear, LowRankLinear, MPOLinear

__all__ = ["activation_init_", "input_covariances", "layer_inputs"]

# Rows of float64 patches formed at once: bounds the memory of unfolding a large conv input (ImageNet stems).
_CHUNK_ELEMENTS = 1 << 24


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``F.pad`` widths of ``padding="same"`` (the extra one, for an even kernel, goes right / bottom as in torch)."""
    (kh, kw), (dh, dw) = kernel, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return tw // 2, tw - tw // 2, th // 2, th - th // 2


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X (samples, in)`` that ``module`` multiplies by its ``(out, in)`` matrix when called on ``x``.

    Linear layers (``nn.Linear``, Hugging Face ``Conv1D``, the factorized linears): ``x`` flattened to
    ``(-1, in_features)``. Convolutions (``nn.Conv2d`` with ``groups=1``, ``TuckerConv2d``): the ``F.unfold``
    patches, columns in ``(c_in, kh, kw)`` order, i.e. the order of ``weight.reshape(c_out, -1)``.
    """
    if isinstance(module, (nn.Linear, FactorizedLinear)):
        return x.reshape(-1, module.in_features)
    if is_hf_conv1d(module):
        return x.reshape(-1, module.weight.shape[0])
    if isinstance(module, (nn.Conv2d, TuckerConv2d)):
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"grouped convolution (groups={module.groups}) has no single (out, in) matrix")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"padding_mode={module.padding_mode!r} is not supported; only 'zeros' is")
        kernel, dilation, stride = _pair(module.kernel_size), _pair(module.dilation), _pair(module.stride)
        padding = module.padding
        if padding == "same":
            x, padding = F.pad(x, _same_padding(kernel, dilation)), 0
        elif padding == "valid":
            padding = 0
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, c_in*kh*kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise TypeError(f"no input covariance for a {type(module).__name__}: expected a linear or Conv2d layer")


def _accumulate(module: nn.Module, x: torch.Tensor, into: list, device: torch.device | None) -> None:
    """Add ``X^T X`` (float64) and the row count of ``module``'s input ``x`` to ``into = [C, n]``."""
    # Split the batch so that the float64 rows (for a conv, up to kh*kw times its input) stay near
    # _CHUNK_ELEMENTS: a large conv input is unfolded piece by piece, never all at once.
    growth = math.prod(_pair(module.kernel_size)) if hasattr(module, "kernel_size") else 1
    for part in x.split(max(1, _CHUNK_ELEMENTS // max(1, x[:1].numel() * growth))):
        rows = layer_inputs(module, part).to(torch.float64)
        xtx = (rows.T @ rows).to(device or rows.device)
        into[0] = xtx if into[0] is None else into[0] + xtx
        into[1] += rows.shape[0]


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    max_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (C, n)}``: ``C = X^T X`` (float64, ``(in, in)``) of each named layer's inputs over the batches.

    ``model`` runs in eval mode under ``no_grad`` (its mode is restored after) on each batch's input (a tensor,
    an ``(x, y)`` pair or an ``{"input_ids": ...}`` dict, moved to the model's device); ``X`` is as in
    :func:`layer_inputs` and ``n`` counts its rows (tokens, or conv output positions). ``device`` is where the
    sums are kept (default: where the inputs are); CPU spares accelerator memory for wide layers.
    """
    modules = {name: model.get_submodule(name) for name in names}
    sums: dict[str, list] = {name: [None, 0] for name in names}
    where = None if device is None else torch.device(device)
    param = next(model.parameters(), None)
    seen: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            _accumulate(module, args[0], sums[name], where)
            seen.add(name)
            if len(seen) == len(modules):
                # The rest of the network (an LM head, a classifier) computes nothing needed. (A layer called again
                # later in the same forward, weights shared, would miss that call: none of tnlit's models does.)
                raise StopForward

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in islice(batches, max_batches):
            x = batch_input(batch)
            seen.clear()
            try:
                model(x if param is None else x.to(param.device))
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name, (c, _) in sums.items() if c is None]
    if missing:
        raise RuntimeError(f"no input reached {', '.join(missing)}: no batches, or layers the model does not use")
    return {name: (c, n) for name, (c, n) in sums.items()}


def _dense_matrix(module: nn.Module) -> torch.Tensor:
    """A teacher layer's weight as the ``(out, in)`` matrix of ``y = W x`` (a conv kernel flattened per output)."""
    if isinstance(module, nn.Conv2d):
        return module.weight.detach().reshape(module.out_channels, -1)
    return dense_weight_io(module)[0].t()  # the one adapter between nn.Linear's and Conv1D's layouts


def _student_matrix(layer: TensorizedLayer) -> torch.Tensor:
    """The ``(out, in)`` matrix a tensorized layer applies (``weight_io`` is ``(in, out)`` whatever the layout)."""
    if isinstance(layer, FactorizedLinear):
        return layer.weight_io().detach().t()
    return layer.to_dense_weight().detach().reshape(layer.out_channels, -1)


def _fit(layer: TensorizedLayer, w: torch.Tensor, c: torch.Tensor, damping: float, sweeps: int, cg: int) -> None:
    """Re-fit ``layer``'s factors in place to the output error of ``w (out, in)`` under ``c``."""
    if isinstance(layer, LowRankLinear):
        a, b = whitened_lowrank(w, c, layer.rank, damping)
        # The layer holds the (in, out) weight as layer.a @ layer.b = (A B)^T = B^T A^T.
        layer.a.copy_(b.t())
        layer.b.copy_(a.t())
        return
    if isinstance(layer, MPOLinear):
        params = list(layer.cores)
        cores = [p.detach().to(torch.float64, copy=True) for p in params]
        # Each core is solved with the others as isometries; the last center leaves the MPO left-canonical,
        # the gauge TT-SVD gives it.
        fit_to_covariance_(
            cores,
            lambda fs: mpo_to_matrix(fs).t(),
            w,
            c,
            sweeps=sweeps,
            damping=damping,
            max_cg_iter=cg,
            gauge=mpo_mixed_canonical,
        )
        new = cores
    elif isinstance(layer, TuckerConv2d):
        params = [layer.u_out, layer.core, layer.u_in]
        factors = [p.detach().to(torch.float64, copy=True) for p in params]
        c_out = layer.out_channels

        def reconstruct(fs: Sequence[torch.Tensor]) -> torch.Tensor:
            return tucker2_to_kernel(fs[1], fs[0], fs[2]).reshape(c_out, -1)

        def orthonormal(fs: list[torch.Tensor], _k: int) -> list[torch.Tensor]:
            # Orthonormal factor matrices, as HOSVD leaves them: the core's problem is then C's alone.
            core, u_out, u_in = tucker2_orthonormal(fs[1], fs[0], fs[2])
            return [u_out, core, u_in]

        kernel = w.reshape(c_out, layer.in_channels, *layer.kernel_size)

        def exact_outer() -> bool:
            """(u_out, core) jointly and exactly for the current u_in (a reduced-rank regression), when it exists."""
            outer = tucker2_outer_fit(kernel, c, factors[2], layer.ranks[0], damping)
            if outer is None:
                return False
            if output_error(reconstruct([*outer, factors[2]]), w, c) <= output_error(reconstruct(factors), w, c):
                factors[0], factors[1] = outer
            return True

        for _ in range(sweeps):
            exact = exact_outer()
            # u_in by conjugate gradient (all three factors so, where the exact step does not exist).
            fit_to_covariance_(
                factors,
                reconstruct,
                w,
                c,
                sweeps=1,
                damping=damping,
                max_cg_iter=cg,
                gauge=orthonormal,
                only=[2] if exact else None,
            )
        exact_outer()
        new = orthonormal(factors, 0)
    else:
        raise TypeError(f"no activation-aware fit for {type(layer).__name__}")
    for p, value in zip(params, new):
        p.copy_(value)


@torch.no_grad()
def activation_init_(
    student: nn.Module,
    teacher: nn.Module,
    covariances: dict[str, tuple[torch.Tensor, int] | torch.Tensor],
    *,
    damping: float = DEFAULT_DAMPING,
    sweeps: int = 4,
    max_cg_iter: int = 100,
) -> dict[str, dict[str, float]]:
    """Re-fit, in place, every tensorized layer of ``student`` named in ``covariances`` to its teacher layer's
    output error on the calibration inputs; returns ``{name: errors}`` for the layers it fitted.

    ``teacher.get_submodule(name)`` is the dense source of ``student``'s layer ``name`` (``tensorize`` keeps
    names). ``LowRankLinear`` gets the exact optimum (:func:`whitened_lowrank`); ``MPOLinear`` and
    ``TuckerConv2d`` start from their current factors and run ``sweeps`` of :func:`fit_to_covariance_`, each factor's
    problem solved by at most ``max_cg_iter`` conjugate-gradient steps (every step lowers the error: fewer trade
    accuracy for time, about linearly). The
    factors keep their shapes, dtype and device and the bias is untouched (it cancels in the output error).
    The errors, relative, measured on the layer's own weight as it now is: ``output_error_before`` /
    ``_after`` (:func:`output_error`, undamped ``C``) and ``weight_error_before`` / ``_after``
    (``||W' - W||_F / ||W||_F``).
    """
    stats: dict[str, dict[str, float]] = {}
    for name, layer in student.named_modules():
        if not isinstance(layer, TensorizedLayer) or name not in covariances:
            continue
        entry = covariances[name]
        c = entry[0] if isinstance(entry, tuple) else entry
        before = _student_matrix(layer)
        w = _dense_matrix(teacher.get_submodule(name)).to(device=before.device, dtype=torch.float64)
        if before.shape != w.shape:
            raise ValueError(f"{name}: student layer is {tuple(before.shape)} but the teacher's is {tuple(w.shape)}")
        c = c.to(before.device)
        _fit(layer, w, c, damping, sweeps, max_cg_iter)
        after = _student_matrix(layer)
        w_norm = torch.linalg.norm(w).item()
        stats[name] = {
            "output_error_before": output_error(before, w, c),
            "output_error_after": output_error(after, w, c),
            "weight_error_before": torch.linalg.norm(before.double() - w).item() / w_norm,
            "weight_error_after": torch.linalg.norm(after.double() - w).item() / w_norm,
        }
    return stats
