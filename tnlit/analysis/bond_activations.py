"""Bond activations: the vectors a batch puts on one bond of one tensorized layer, and the inputs that excite a
bond direction most.

A bond is a latent space a dense layer does not have (PAPER.md section 2). For an input ``x`` of an
:class:`MPOLinear`, contracting ``x`` with cores ``0..k`` leaves a tensor with bond ``k`` open beside the outputs
already produced (sites ``0..k``) and the inputs not yet consumed (sites ``k+1..``): the bond's activation is that
tensor, one vector of the bond's dimension for each combination of those other indices. For a
:class:`TuckerConv2d` the rank spaces are channels: bond 1 (``in``) is ``x`` projected by ``u_in``, bond 0
(``out``) that after the core's convolution, one vector per pixel. For a :class:`LowRankLinear`, ``x @ A``.

The vectors are read in the Schmidt gauge by default (:mod:`tnlit.formats.canonical`): direction ``j`` of a bond
is its ``j``-th singular direction, ordered by how much of the weight it carries, and the same whatever gauge
training left the factors in. A direction's sign is arbitrary, so a unit's *score* for a direction is the norm of
the direction's component over the unit's other indices (for a token of a transformer: over the bond's other open
indices; for an image: over the bond's other indices and every pixel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import opt_einsum as oe
import torch
import torch.nn.functional as F
from torch import nn

from tnlit.analysis.bonds import bond_dims, bond_labels, canonical_factors
from tnlit.layers.base import TensorizedLayer
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import LowRankLinear, MPOLinear
from tnlit.types import Gauge

__all__ = ["BondCapture", "Gauge", "bond_activations", "bond_vectors", "describe_unit", "find_layer", "top_activating"]


def find_layer(model: nn.Module, name: str, bond: int | None = None) -> TensorizedLayer:
    """The tensorized layer called ``name``, checking that it has bond ``bond``; clear errors otherwise."""
    tensorized = [n for n, m in model.named_modules() if isinstance(m, (MPOLinear, TuckerConv2d, LowRankLinear))]
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if layer is None or name not in tensorized:
        known = ", ".join(tensorized[:4]) + (", ..." if len(tensorized) > 4 else "")
        what = "no module" if layer is None else f"{type(layer).__name__}, not a tensorized layer"
        raise ValueError(f"layer {name!r}: {what}; give one of the tensorized layers ({known or 'none'})")
    if bond is not None:
        labels = bond_labels(layer)
        if not 0 <= bond < len(labels):
            raise ValueError(
                f"bond {bond} is out of range for layer {name!r} ({type(layer).__name__}), which has {len(labels)} "
                f"bond(s): use 0 to {len(labels) - 1} ({', '.join(labels)})"
            )
    return layer


def bond_vectors(
    layer: TensorizedLayer, x: torch.Tensor, bond: int, factors: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """The activation of ``bond`` for the layer's input ``x``, bond axis right after the unit axes.

    Layouts: MPOLinear, ``x (*lead, d_in)`` -> ``(*lead, dim, rest)`` with ``rest`` the outputs of sites ``0..bond``
    then the inputs of sites ``bond+1..``, flattened in that order; LowRankLinear -> ``(*lead, rank, 1)``;
    TuckerConv2d, ``x (n, c_in, h, w)`` -> ``(n, r, h', w')``. ``factors`` (in ``layer.factors()`` order) replace
    the layer's own, e.g. a canonical form of them.
    """
    factors = [f.to(x.dtype) for f in (factors if factors is not None else layer.factors())]
    if isinstance(layer, TuckerConv2d):
        u_out, core, u_in = factors
        h = F.conv2d(x, u_in.t()[:, :, None, None])
        if bond == 1:
            return h
        return F.conv2d(h, core, None, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(layer, LowRankLinear):
        return (x2 @ factors[0]).reshape(*lead, -1, 1)
    if not isinstance(layer, MPOLinear):
        raise TypeError(f"expected MPOLinear, TuckerConv2d or LowRankLinear, got {type(layer).__name__}")
    n = len(layer.in_dims)
    sym = oe.get_symbol
    ins, outs, bonds = (
        [sym(k) for k in range(n)],
        [sym(n + k) for k in range(n)],
        [sym(2 * n + k) for k in range(n + 1)],
    )
    batch = sym(3 * n + 1)
    left = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(bond + 1)]
    out = batch + bonds[bond + 1] + "".join(outs[: bond + 1]) + "".join(ins[bond + 1 :])
    eq = f"{batch}{''.join(ins)},{','.join(left)}->{out}"
    h = oe.contract(eq, x2.reshape(-1, *layer.in_dims), *factors[: bond + 1], backend="torch")
    return h.reshape(*lead, h.shape[1], -1)


@dataclass
class BondCapture:
    """The activations of one bond, one tensor per forward, filled while :func:`bond_activations` is open."""

    layer: str
    bond: int
    dim: int
    unit_ndim: int | None = None
    """How many leading axes index the units (1 for images, 2 for ``(sequence, position)``); set by the first batch."""
    batches: list[torch.Tensor] = field(default_factory=list)

    def vectors(self) -> torch.Tensor:
        """All batches' activations, concatenated along the first axis."""
        if not self.batches:
            raise ValueError(f"no activation captured on bond {self.bond} of {self.layer!r}: run a forward first")
        return torch.cat(self.batches)

    def scores(self, direction: int) -> torch.Tensor:
        """Per unit, the norm of its component along ``direction`` (over the unit's other indices)."""
        if not 0 <= direction < self.dim:
            raise ValueError(
                f"direction {direction} is out of range for a bond of dimension {self.dim}: use 0 to {self.dim - 1}"
            )
        v = self.vectors().select(self.unit_ndim, direction)
        return v.reshape(*v.shape[: self.unit_ndim], -1).norm(dim=-1)

    def top(self, direction: int, k: int = 5) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` units with the highest score for ``direction``, as ``(index, score)``, highest first."""
        scores = self.scores(direction)
        values, flat = scores.flatten().topk(min(k, scores.numel()))
        index = torch.unravel_index(flat, scores.shape)
        return [(tuple(int(i[j]) for i in index), float(values[j])) for j in range(len(values))]


@contextlib.contextmanager
def bond_activations(model: nn.Module, layer: str, bond: int, *, gauge: Gauge = "schmidt") -> Iterator[BondCapture]:
    """Capture, for every forward run inside the block, the vectors on ``bond`` of the tensorized ``layer``.

    ``gauge="schmidt"`` reads the bond in its singular basis (computed once, on entry; the layer is not changed);
    ``"as_is"`` in the basis the layer's factors happen to have. The layer's forward itself is untouched: a hook
    on its input recomputes the contraction up to the bond (under ``torch.no_grad``).

    >>> with bond_activations(student, "transformer.h.0.mlp.c_fc", bond=0) as cap:
    ...     student(tokens)
    >>> cap.top(direction=0, k=5)
    """
    if gauge not in ("schmidt", "as_is"):
        raise ValueError(f"gauge must be 'schmidt' or 'as_is', got {gauge!r}")
    module = find_layer(model, layer, bond)
    factors = canonical_factors(module, "schmidt") if gauge == "schmidt" else None
    capture = BondCapture(layer, bond, bond_dims(module)[bond])

    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        with torch.no_grad():
            capture.batches.append(bond_vectors(module, x.detach(), bond, factors).cpu())
        capture.unit_ndim = 1 if isinstance(module, TuckerConv2d) else x.ndim - 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


def describe_unit(
    index: tuple[int, ...],
    tokens: torch.Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    context: int = 8,
    labels: torch.Tensor | None = None,
) -> str:
    """A readable name for a unit: ``image 17 (label 3)``, or for text the token in its context, ``...lef[[t]] rig...``.

    ``tokens`` are the model's input ids ``(sequences, positions)`` in the order the batches ran; ``decode`` turns a
    list of ids into text (default: the ids, space separated); ``labels`` are the inputs' labels, when known.
    """
    if tokens is None or len(index) < 2:
        name = f"{'image' if len(index) == 1 else 'input'} {', '.join(map(str, index))}"
        return name if labels is None else f"{name} (label {labels[index[0]].item()})"
    seq, pos = index[0], index[1]
    row = tokens[seq].tolist()

    def text(ids: list[int]) -> str:
        raw = decode(ids) if decode is not None else " ".join(map(str, ids))
        return raw.replace("\n", "\\n")

    left, right = row[max(0, pos - context) : pos], row[pos + 1 : pos + 1 + context]
    return f"seq {seq} pos {pos}: {text(left)}[[{text([row[pos]])}]]{text(right)}"


def top_activating(
    capture: BondCapture,
    direction: int,
    k: int = 5,
    tokens: torch.Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    context: int = 8,
    labels: torch.Tensor | None = None,
) -> list[dict[str, object]]:
    """The ``k`` inputs that excite ``direction`` of the captured bond most: rank, unit index, score, description."""
    return [
        {
            "rank": r,
            "index": " ".join(map(str, index)),
            "score": score,
            "input": describe_unit(index, tokens, decode, context, labels),
        }
        for r, (index, score) in enumerate(capture.top(direction, k))
    ]
