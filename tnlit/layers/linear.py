"""Factorized linear layers: ``MPOLinear`` (tensor-train matrix) and ``LowRankLinear`` (two-factor SVD).

Both compute ``y = x @ W + b`` with ``W`` of shape ``(in, out)`` held as factors, and accept
``nn.Linear`` or Hugging Face's ``Conv1D`` as the source of ``from_dense``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import opt_einsum as oe
import torch
from opt_einsum.contract import ContractExpression, PathInfo
from torch import nn

from tnlit.formats.lowrank import lowrank_from_matrix
from tnlit.formats.mpo import mpo_equation, mpo_from_matrix, mpo_to_matrix
from tnlit.formats.ranks import balanced_factors, mpo_bond_dims
from tnlit.layers.base import Contraction, TensorizedLayer, dense_weight_io
from tnlit.types import Layout

__all__ = ["FactorizedLinear", "LowRankLinear", "MPOLinear"]


class FactorizedLinear(TensorizedLayer):
    """The forward shared by the factorized linear layers; subclasses supply the factors' maths."""

    in_features: int
    out_features: int
    layout: Layout
    bias: nn.Parameter | None

    def _init_linear(self, in_features: int, out_features: int, bias: torch.Tensor | None, layout: str) -> None:
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"layout must be 'linear' (nn.Linear) or 'conv1d' (Hugging Face Conv1D), got {layout!r}")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def weight_io(self) -> torch.Tensor:
        """The dense ``(in, out)`` weight rebuilt from the factors (differentiable)."""
        raise NotImplementedError

    def _apply_factors(self, x: torch.Tensor) -> torch.Tensor:
        """``x (n, in) @ W`` contracted factor by factor, without forming ``W``."""
        raise NotImplementedError

    def to_dense_weight(self) -> torch.Tensor:
        w = self.weight_io()
        return w.t() if self.layout == "linear" else w

    def dense_shape(self) -> tuple[int, ...]:
        io = (self.in_features, self.out_features)
        return io[::-1] if self.layout == "linear" else io

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        how = self.strategy(x2.shape[0])
        if how == "cached":
            w = self.cached_dense_weight()
            y = x2 @ (w.t() if self.layout == "linear" else w).to(x2.dtype)
        elif how == "dense":
            y = x2 @ self.weight_io()
        else:
            y = self._apply_factors(x2)
        if self.bias is not None:
            # Under autocast y is bf16/fp16 while the bias stays fp32; keep y's dtype as nn.Linear does.
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class MPOLinear(FactorizedLinear):
    """A linear layer whose ``(in, out)`` weight is a matrix product operator (tensor-train matrix).

    ``cores[k]`` has shape ``(bond_{k-1}, in_dims[k], out_dims[k], bond_k)`` with ``bond_0 = bond_n = 1``;
    ``bond_dims`` lists the inner bonds.
    """

    # Measured on CPU (results/bench_layers.md): an MPO sweep runs at a third to a half of the GEMM's FLOP rate
    # once its intermediates are large (bond 832: the right pick needs 1.7-3.4 for forward+backward; bond
    # 160: 1.0-1.8). 1.8 gets training steps right for both; forward alone at bond 832 near 12 tokens is off.
    factor_overhead = 1.8

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dims: Sequence[int],
        bond_dims: Sequence[int] | None = None,
        *,
        bias: bool = True,
        layout: Layout = "linear",
        contraction: Contraction = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(contraction)
        in_dims, out_dims = tuple(int(d) for d in in_dims), tuple(int(d) for d in out_dims)
        bonds = mpo_bond_dims(in_dims, out_dims, bond_dim=None if bond_dims is None else list(bond_dims))
        self.in_dims, self.out_dims = in_dims, out_dims
        d_in, d_out = math.prod(in_dims), math.prod(out_dims)
        b = torch.zeros(d_out, device=device, dtype=dtype) if bias else None
        self._init_linear(d_in, d_out, b, layout)
        full = [1, *bonds, 1]
        # Random init whose product has nn.Linear's weight variance, 1 / (3 d_in), spread evenly over cores.
        n = len(in_dims)
        std = (1.0 / (3 * d_in) / math.prod(bonds)) ** (0.5 / n)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(full[k], i, o, full[k + 1], device=device, dtype=dtype) * std)
            for k, (i, o) in enumerate(zip(in_dims, out_dims))
        )

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        *,
        sites: int = 2,
        bond_dim: int | Sequence[int] | None = None,
        cr: float | None = None,
        in_dims: Sequence[int] | None = None,
        out_dims: Sequence[int] | None = None,
        contraction: Contraction = "auto",
    ) -> MPOLinear:
        """TT-SVD of an ``nn.Linear`` / ``Conv1D`` weight; exact when neither ``bond_dim`` nor ``cr`` is given.

        Site dims default to the most balanced split of each dimension into ``sites`` factors
        (1600 -> 40 x 40, 6400 -> 80 x 80).
        """
        w, b, layout = dense_weight_io(module)
        in_dims = tuple(in_dims) if in_dims is not None else balanced_factors(w.shape[0], sites)
        out_dims = tuple(out_dims) if out_dims is not None else balanced_factors(w.shape[1], sites)
        if math.prod(in_dims) != w.shape[0] or math.prod(out_dims) != w.shape[1] or len(in_dims) != len(out_dims):
            raise ValueError(
                f"site dims {in_dims} x {out_dims} do not fit a weight of {w.shape[0]} inputs x {w.shape[1]} outputs"
            )
        cores = mpo_from_matrix(w, in_dims, out_dims, bond_dim=bond_dim, cr=cr)
        layer = cls(
            in_dims,
            out_dims,
            [c.shape[-1] for c in cores[:-1]],
            bias=b is not None,
            layout=layout,
            contraction=contraction,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for p, c in zip(layer.cores, cores):
                p.copy_(c)
            if b is not None:
                layer.bias.copy_(b)
        return layer

    @property
    def bond_dims(self) -> list[int]:
        """The inner bond dimensions, left to right."""
        return [c.shape[-1] for c in self.cores[:-1]]

    def factors(self) -> Iterator[nn.Parameter]:
        return iter(self.cores)

    def weight_io(self) -> torch.Tensor:
        return mpo_to_matrix(list(self.cores))

    def _apply_factors(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        expr = _mpo_expression(n, self.in_dims, tuple(tuple(c.shape) for c in self.cores))
        return expr(x.reshape(n, *self.in_dims), *self.cores, backend="torch").reshape(n, self.out_features)

    def _costs(self, n: int) -> tuple[float, float]:
        shapes = tuple(tuple(c.shape) for c in self.cores)
        factor = _mpo_path(n, self.in_dims, shapes).opt_cost
        rebuild = _rebuild_path(shapes).opt_cost
        return float(factor), float(rebuild) + 2.0 * n * self.in_features * self.out_features

    def rebuild_flops(self) -> float:
        shapes = tuple(tuple(c.shape) for c in self.cores)
        return float(_rebuild_path(shapes).opt_cost)

    def extra_repr(self) -> str:
        return (
            f"in_dims={self.in_dims}, out_dims={self.out_dims}, bond_dims={self.bond_dims}, "
            f"bias={self.bias is not None}, layout={self.layout!r}, contraction={self.contraction!r}"
        )


@functools.lru_cache(maxsize=256)
def _rebuild_path(core_shapes: tuple[tuple[int, ...], ...]) -> PathInfo:
    """The cheapest contraction of the cores into the dense weight."""
    return oe.contract_path(mpo_equation(len(core_shapes), batched=False), *core_shapes, shapes=True)[1]


@functools.lru_cache(maxsize=256)
def _mpo_path(n: int, in_dims: tuple[int, ...], core_shapes: tuple[tuple[int, ...], ...]) -> PathInfo:
    """The cheaper of the two sweeps that feed the input through the cores one at a time.

    A free search (``optimize="optimal"``) would often contract the cores with each other first, which is
    the dense strategy in disguise; the factor strategy keeps the input in every step.
    """
    eq = mpo_equation(len(core_shapes), batched=True)
    shapes = [(n, *in_dims), *core_shapes]
    m = len(core_shapes)
    # Operands are [x, core_0, ..., core_{m-1}]; each contraction appends its result at the end.
    left_to_right = [(0, 1)] + [(0, m - 1 - k) for k in range(m - 1)]
    right_to_left = [(0, m)] + [(m - 2 - k, m - 1 - k) for k in range(m - 1)]
    infos = [oe.contract_path(eq, *shapes, shapes=True, optimize=path)[1] for path in (left_to_right, right_to_left)]
    return min(infos, key=lambda info: info.opt_cost)


@functools.lru_cache(maxsize=256)
def _mpo_expression(n: int, in_dims: tuple[int, ...], core_shapes: tuple[tuple[int, ...], ...]) -> ContractExpression:
    """The factor-by-factor contraction for one input shape, compiled once and reused (opt_einsum)."""
    path = _mpo_path(n, in_dims, core_shapes).path
    return oe.contract_expression(
        mpo_equation(len(core_shapes), batched=True), (n, *in_dims), *core_shapes, optimize=path
    )


class LowRankLinear(FactorizedLinear):
    """A linear layer whose ``(in, out)`` weight is ``A @ B``, ``A (in, rank)``, ``B (rank, out)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        layout: Layout = "linear",
        contraction: Contraction = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(contraction)
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self._init_linear(in_features, out_features, b, layout)
        std = (1.0 / (3 * in_features) / rank) ** 0.25
        self.a = nn.Parameter(torch.randn(in_features, rank, device=device, dtype=dtype) * std)
        self.b = nn.Parameter(torch.randn(rank, out_features, device=device, dtype=dtype) * std)

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, rank: int | None = None, cr: float | None = None, contraction: Contraction = "auto"
    ) -> LowRankLinear:
        """Truncated SVD of an ``nn.Linear`` / ``Conv1D`` weight; exact when neither ``rank`` nor ``cr`` is given."""
        w, b, layout = dense_weight_io(module)
        a, bb = lowrank_from_matrix(w, rank=rank, cr=cr)
        layer = cls(
            w.shape[0],
            w.shape[1],
            a.shape[1],
            bias=b is not None,
            layout=layout,
            contraction=contraction,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.a.copy_(a)
            layer.b.copy_(bb)
            if b is not None:
                layer.bias.copy_(b)
        return layer

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def factors(self) -> Iterator[nn.Parameter]:
        return iter((self.a, self.b))

    def weight_io(self) -> torch.Tensor:
        return self.a @ self.b

    def _apply_factors(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a) @ self.b

    def _costs(self, n: int) -> tuple[float, float]:
        d_in, d_out, r = self.in_features, self.out_features, self.rank
        return 2.0 * n * r * (d_in + d_out), 2.0 * d_in * r * d_out + 2.0 * n * d_in * d_out

    def rebuild_flops(self) -> float:
        return 2.0 * self.in_features * self.rank * self.out_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, layout={self.layout!r}, contraction={self.contraction!r}"
        )
