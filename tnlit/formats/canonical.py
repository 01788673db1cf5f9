"""Canonical forms (gauges) of MPOs, Tucker-2 and low-rank factors, as pure tensor maths.

The factors of a tensor network are not unique: inserting ``G G^-1`` on a bond changes two cores and not the
matrix they represent. A bond's basis is therefore arbitrary until a canonical form fixes it, and only then
do its singular values, entropies and per-direction activations mean something. The forms here:

- MPO **left-canonical**: every core but the last is a left isometry (its ``(bond_in in out) x bond_out``
  unfolding has orthonormal columns); the last core carries the norm. **Right-canonical** is the mirror image,
  **mixed-canonical** at ``center`` is left-canonical before it and right-canonical after it. All three come
  from QR sweeps.
- MPO **Schmidt** form: right-canonical, and every bond's basis is the one that diagonalises the matrix
  unfolded at that bond (its singular vectors, in descending order of singular value); the singular values
  come out of the same sweep (an SVD sweep after a left QR sweep).
- Tucker-2 **orthonormal** factors (QR, the triangular parts pushed into the core) and the **Schmidt**
  (HOSVD, all-orthogonal) form: orthonormal factors rotated onto the singular vectors of the core's channel
  unfoldings.
- Low rank: ``A`` orthonormal (left), ``B`` orthonormal (right), or ``A = Q_a U S``, ``B = V^T Q_b^T`` (Schmidt).

Every function keeps every shape, so the results can be copied into a layer's parameters. Where a bond is
wider than the rank the tensors around it allow (a truncated bond followed by a wider one), the extra
directions come out as zero columns / rows: the bond keeps its dimension, the redundant directions carry
nothing, and their singular values are 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "lowrank_canonical",
    "mpo_left_canonical",
    "mpo_mixed_canonical",
    "mpo_right_canonical",
    "mpo_schmidt",
    "tucker2_orthonormal",
    "tucker2_schmidt",
]


def _qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of an ``(m, n)`` matrix, padded so that ``Q`` is ``(m, n)`` and ``R`` is ``(n, n)`` for any shape.

    Where ``m < n`` the matrix has rank at most ``m``: the extra columns of ``Q`` and rows of ``R`` are zero.
    """
    q, r = torch.linalg.qr(matrix)
    n = matrix.shape[1]
    if q.shape[1] < n:
        q = F.pad(q, (0, n - q.shape[1]))
        r = F.pad(r, (0, 0, 0, n - r.shape[0]))
    return q, r


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of an ``(m, n)`` matrix as ``U (m, m)``, ``S (m,)``, ``Vh (m, n)``, zero-padded where ``n < m``.

    ``U`` is a full rotation of the row space, so that rotating a bond by it never changes the bond's dimension.
    """
    m, n = matrix.shape
    u, s, vh = torch.linalg.svd(matrix, full_matrices=n < m)
    if n < m:
        s = F.pad(s, (0, m - n))
        vh = F.pad(vh[:n], (0, 0, 0, m - n))  # full_matrices gave Vh (n, n): pad its rows to m
    return u, s, vh


def _absorb_right(core: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``r (b, b') @ core (b', ...)``: push a matrix into a core's left bond."""
    return torch.tensordot(r, core, dims=1)


def _absorb_left(core: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``core (..., b) @ m (b, b')``: push a matrix into a core's right bond."""
    return torch.tensordot(core, m, dims=1)


def _left_sweep(cores: list[torch.Tensor], stop: int) -> None:
    """Make cores ``0 .. stop-1`` left isometries, in place on the list, by QR; ``R`` moves one core right."""
    for k in range(stop):
        a, i, o, b = cores[k].shape
        q, r = _qr(cores[k].reshape(a * i * o, b))
        cores[k] = q.reshape(a, i, o, b)
        cores[k + 1] = _absorb_right(cores[k + 1], r)


def _right_sweep(cores: list[torch.Tensor], stop: int) -> None:
    """Make cores ``n-1 .. stop+1`` right isometries, in place on the list, by QR of their transposed unfoldings."""
    for k in range(len(cores) - 1, stop, -1):
        a, i, o, b = cores[k].shape
        q, r = _qr(cores[k].reshape(a, i * o * b).t())  # core = r^T q^T
        cores[k] = q.t().reshape(a, i, o, b)
        cores[k - 1] = _absorb_left(cores[k - 1], r.t())


def mpo_left_canonical(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Left-canonical MPO: cores ``0 .. n-2`` are left isometries, the last core carries the norm."""
    out = list(cores)
    _left_sweep(out, len(out) - 1)
    return out


def mpo_right_canonical(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Right-canonical MPO: cores ``1 .. n-1`` are right isometries, the first core carries the norm."""
    out = list(cores)
    _right_sweep(out, 0)
    return out


def mpo_mixed_canonical(cores: Sequence[torch.Tensor], center: int) -> list[torch.Tensor]:
    """Mixed-canonical MPO: left isometries before ``center``, right isometries after it; the center carries the norm.

    The norm of the whole matrix is then the norm of the center core alone, and a change to that core changes the
    matrix by exactly as much (in Frobenius norm): the form in which one core is updated or truncated optimally.
    """
    if not 0 <= center < len(cores):
        raise ValueError(f"center {center} is not a core of this {len(cores)}-core MPO: use 0 to {len(cores) - 1}")
    out = list(cores)
    _left_sweep(out, center)
    _right_sweep(out, center)
    return out


def mpo_schmidt(cores: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The MPO in Schmidt form, and the singular values of every inner bond, left to right, descending.

    A left QR sweep, then a right-to-left SVD sweep: at core ``k`` everything to its left is a left isometry and
    everything to its right a right isometry, so the singular values of core ``k``'s ``bond x (in out bond)``
    unfolding are those of the whole matrix unfolded at bond ``k-1`` (sites ``1..k`` against the rest). They do not
    depend on the gauge the cores came in. The result is right-canonical, and the basis of every bond is ordered by
    singular value: direction 0 of a bond is the one that carries the most of the matrix.
    """
    out = mpo_left_canonical(cores)
    spectra: list[torch.Tensor] = [torch.empty(0)] * (len(out) - 1)
    for k in range(len(out) - 1, 0, -1):
        a, i, o, b = out[k].shape
        u, s, vh = _svd(out[k].reshape(a, i * o * b))
        out[k] = vh.reshape(a, i, o, b)
        out[k - 1] = _absorb_left(out[k - 1], u * s)
        spectra[k - 1] = s
    return out, spectra


def tucker2_orthonormal(
    core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 with orthonormal factors: ``u = Q R`` by QR, each ``R`` pushed into the core; same kernel."""
    q_out, r_out = _qr(u_out)
    q_in, r_in = _qr(u_in)
    return torch.einsum("ab...,oa,ib->oi...", core, r_out, r_in), q_out, q_in


def tucker2_schmidt(
    core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Tucker-2 in HOSVD (all-orthogonal) form, and the singular values of its two channel modes ``(out, in)``.

    Orthonormal factors, rotated onto the left singular vectors of the core's mode-0 (output channels) and mode-1
    (input channels) unfoldings. Each mode's singular values are then those of the whole kernel unfolded on that
    channel mode, in descending order, whatever basis the factors came in; direction 0 of a rank space is the one
    that carries the most of the kernel.
    """
    core, q_out, q_in = tucker2_orthonormal(core, u_out, u_in)
    r_out, r_in = core.shape[:2]
    u0, s_out, _ = _svd(core.reshape(r_out, -1))
    u1, s_in, _ = _svd(core.transpose(0, 1).reshape(r_in, -1))
    # Rotating one mode is orthogonal on the other's unfolding, so each mode keeps its singular values.
    core = torch.einsum("ab...,ac,bd->cd...", core, u0, u1)
    return core, q_out @ u0, q_in @ u1, (s_out, s_in)


def lowrank_canonical(
    a: torch.Tensor, b: torch.Tensor, form: str = "schmidt"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A (d_in, r) @ B (r, d_out)`` in a canonical form, and the singular values of the product (descending).

    ``left``: ``A`` has orthonormal columns; ``right``: ``B`` has orthonormal rows; ``schmidt``: ``A = Q_a U S`` and
    ``B = V^T Q_b^T`` (right-canonical, the rank space ordered by singular value).
    """
    q_a, r_a = _qr(a)
    q_b, r_b = _qr(b.t())
    u, s, vh = _svd(r_a @ r_b.t())
    if form == "left":
        return q_a, r_a @ b, s
    if form == "right":
        return a @ r_b.t(), q_b.t(), s
    if form == "schmidt":
        return q_a @ (u * s), vh @ q_b.t(), s
    raise ValueError(f"low-rank canonical form must be 'left', 'right' or 'schmidt', got {form!r}")
