"""``TuckerConv2d``: a 2-D convolution whose kernel is a Tucker-2 decomposition on its channel modes.

Factor by factor it runs as three convolutions, 1x1 (c_in -> r_in), kxk core (r_in -> r_out, with the
source's stride, padding and dilation) and 1x1 (r_out -> c_out, with the bias). Zero padding commutes with
a bias-free 1x1 convolution, so this equals the dense convolution with the rebuilt kernel exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from tnlit.formats.ranks import tucker2_ranks
from tnlit.formats.tucker import tucker2_from_kernel, tucker2_to_kernel
from tnlit.layers.base import Contraction, TensorizedLayer

__all__ = ["TuckerConv2d"]


class TuckerConv2d(TensorizedLayer):
    """Tucker-2 convolution: ``kernel = core x_0 u_out x_1 u_in``; ``ranks`` is ``(r_out, r_in)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        ranks: Sequence[int] | None = None,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        contraction: Contraction = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(contraction)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        r_out, r_in = tucker2_ranks(out_channels, in_channels, self.kernel_size, ranks=ranks)
        kw = {"device": device, "dtype": dtype}
        # Orthonormal factors and a core with nn.Conv2d's weight variance (1 / (3 fan_in)) give the rebuilt
        # kernel roughly the scale nn.Conv2d would have.
        self.u_out = nn.Parameter(torch.linalg.qr(torch.randn(out_channels, r_out, **kw))[0])
        self.u_in = nn.Parameter(torch.linalg.qr(torch.randn(in_channels, r_in, **kw))[0])
        fan_in = in_channels * math.prod(self.kernel_size)
        self.core = nn.Parameter(torch.randn(r_out, r_in, *self.kernel_size, **kw) / math.sqrt(3 * fan_in))
        self.bias = nn.Parameter(torch.zeros(out_channels, **kw)) if bias else None

    @classmethod
    def from_dense(
        cls,
        conv: nn.Module,
        *,
        ranks: Sequence[int] | None = None,
        cr: float | None = None,
        n_iter: int = 0,
        contraction: Contraction = "auto",
    ) -> TuckerConv2d:
        """Tucker-2 (HOSVD, or HOOI with ``n_iter > 0``) of an ``nn.Conv2d``; exact when neither ``ranks`` nor
        ``cr`` is given. Stride, padding, dilation and bias are kept; grouped convolutions are refused."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"TuckerConv2d takes an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"grouped convolution (groups={conv.groups}) is not supported by Tucker-2: its kernel has no full "
                "input-channel mode; exclude this layer from the plan"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; only 'zeros' is")
        w = conv.weight.detach()
        core, u_out, u_in = tucker2_from_kernel(w, ranks=ranks, cr=cr, n_iter=n_iter)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            (core.shape[0], core.shape[1]),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            contraction=contraction,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.core.copy_(core)
            layer.u_out.copy_(u_out)
            layer.u_in.copy_(u_in)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return self.core.shape[0], self.core.shape[1]

    def factors(self) -> Iterator[nn.Parameter]:
        return iter((self.u_out, self.core, self.u_in))

    def to_dense_weight(self) -> torch.Tensor:
        return tucker2_to_kernel(self.core, self.u_out, self.u_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        bias = self.bias  # under autocast F.conv2d casts it with the weights
        how = self.strategy(tuple(x.shape))
        if how == "cached":
            return F.conv2d(x, self.cached_dense_weight(), bias, **conv)
        if how == "dense":
            return F.conv2d(x, self.to_dense_weight(), bias, **conv)
        h = F.conv2d(x, self.u_in.t()[:, :, None, None])
        h = F.conv2d(h, self.core, None, **conv)
        return F.conv2d(h, self.u_out[:, :, None, None], bias)

    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def rebuild_flops(self) -> float:
        (r_out, r_in), k = self.ranks, math.prod(self.kernel_size)
        return 2.0 * k * (r_out * r_in * self.out_channels + self.out_channels * r_in * self.in_channels)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.padding == "same":
            return h, w
        pad = (0, 0) if self.padding == "valid" else self.padding
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), pad, self.dilation, self.kernel_size, self.stride)
        )

    def _costs(self, shape: tuple[int, ...]) -> tuple[float, float]:
        *batch, _, h, w = shape
        n = math.prod(batch)
        ho, wo = self._out_hw(h, w)
        c_out, c_in, (r_out, r_in), k = self.out_channels, self.in_channels, self.ranks, math.prod(self.kernel_size)
        factor = 2.0 * n * (h * w * c_in * r_in + ho * wo * (r_in * r_out * k + r_out * c_out))
        rebuild = 2.0 * k * (r_out * r_in * c_out + c_out * r_in * c_in)
        return factor, rebuild + 2.0 * n * ho * wo * c_out * c_in * k

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"contraction={self.contraction!r}"
        )
