"""Activation-aware (whitened) fitting of factorized weights, as pure tensor maths.

Plain SVD / TT-SVD / HOSVD minimise the weight error ``||W' - W||_F``. What the network feels is the output
error on the inputs the layer really sees, ``||(W' - W) X^T||_F`` (``X``: calibration inputs, one per row),
which with ``C = X^T X`` is ``tr((W' - W) C (W' - W)^T)``. Directions of input space that the data never
visit cost nothing there, and frequent ones cost a lot; spending the rank where the inputs live lowers the
output error at the same parameter count.

Every matrix here is in the ``y = W x`` layout, ``W (out, in)``, and ``C`` is ``(in, in)``; a conv kernel is
its ``(c_out, c_in * kh * kw)`` reshape, matching ``F.unfold`` patches. The maths runs in float64.

``damping`` adds ``damping * mean(diag C) * I`` to ``C``: it makes a singular ``C`` (fewer samples than
features, dead inputs) invertible, and in directions the calibration data barely visit it falls back to
keeping the weight itself (a small ridge towards ``W``), so the fit does not chase noise. The default
``1e-6`` changes the objective by about that relative amount.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "DEFAULT_DAMPING",
    "covariance_sqrt",
    "fit_to_covariance_",
    "output_error",
    "tucker2_outer_fit",
    "whitened_lowrank",
]

DEFAULT_DAMPING = 1e-6
"""Relative damping: ``damping * mean(diag C)`` is added to every eigenvalue of ``C``."""

Reconstruct = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""Factors -> the dense ``(out, in)`` matrix they represent, differentiable, linear in each factor alone."""


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` in float64; a conv kernel ``(c_out, c_in, kh, kw)`` becomes ``(c_out, c_in * kh * kw)``."""
    return w.detach().reshape(w.shape[0], -1).to(torch.float64)


def _damped(c: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping * mean(diag C) * I`` in float64, symmetrised (accumulated sums drift off symmetric)."""
    c = c.detach().to(torch.float64)
    c = (c + c.T) / 2
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def covariance_sqrt(c: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric ``L`` with ``L L^T = C + damping * mean(diag C) * I``, and ``L^-1`` (both float64).

    By eigendecomposition rather than Cholesky: Cholesky of the damped matrix still fails when ``damping`` is 0
    or below the round-off of a ``C`` with a wide dynamic range (activation covariances span many decades),
    while here the spectrum is clamped explicitly: round-off negatives to 0, then a floor at ``n * eps`` of the
    largest eigenvalue so that ``L^-1`` stays finite. An all-zero ``C`` (no signal) gives ``L = I``, which
    makes the whitened fits the plain ones.
    """
    c = _damped(c, 0.0)
    lam, q = torch.linalg.eigh(c)
    lam = lam.clamp(min=0) + damping * c.diagonal().mean().clamp(min=0)
    top = lam.max()
    if top <= 0:
        lam = torch.ones_like(lam)
    else:
        lam = lam.clamp(min=top.item() * lam.numel() * torch.finfo(lam.dtype).eps)
    root = lam.sqrt()
    return (q * root) @ q.T, (q / root) @ q.T


def whitened_lowrank(
    w: torch.Tensor, c: torch.Tensor, rank: int, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``W' = A @ B`` that minimises the output error ``||(W' - W) L||_F``, exactly.

    ``W (out, in)``, ``C (in, in)``; returns ``A (out, rank)``, ``B (rank, in)`` in ``W``'s dtype. Since ``L`` is
    invertible, ``W' L`` ranges over all rank-r matrices, so by Eckart-Young the optimum is the truncated SVD
    ``U_r S_r V_r^T`` of ``W L`` and ``W' = U_r S_r V_r^T L^-1``. The singular values are split evenly,
    ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T L^-1``: with ``U_r`` and ``S_r V_r^T L^-1`` Adam diverges when
    the layer is trained afterwards (measured), as with the plain SVD's factors.
    """
    w64 = _as_matrix(w)
    if not 1 <= rank <= min(w64.shape):
        raise ValueError(f"rank must be in 1..{min(w64.shape)} for a {tuple(w64.shape)} weight, got {rank}")
    root, inv_root = covariance_sqrt(c.to(w64.device), damping)
    u, s, vh = torch.linalg.svd(w64 @ root, full_matrices=False)
    half = s[:rank].sqrt()
    a = u[:, :rank] * half
    b = (half[:, None] * vh[:rank]) @ inv_root
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()


def tucker2_outer_fit(
    w: torch.Tensor, c: torch.Tensor, u_in: torch.Tensor, r_out: int, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact minimiser over ``(u_out, core)`` of a Tucker-2 kernel's output error, ``u_in`` fixed.

    With ``u_in`` fixed the kernel is ``Z P``: ``P = u_in^T (x) I`` maps the input patch to ``(r_in, kh, kw)``, and
    ``Z = u_out core`` is any ``(c_out, r_in * kh * kw)`` matrix of rank at most ``r_out``. Minimising
    ``tr((Z P - W) C (Z P - W)^T)`` over such ``Z`` is a reduced-rank regression: with ``A = P C P^T = R R`` and
    ``B = W C P^T``, it is the best rank-``r_out`` approximation of ``B R^-1`` (truncated SVD ``U S V^T``), and
    ``u_out = U``, ``core = S V^T R^-1``: orthonormal ``u_out``, in one solve instead of two alternating ones.

    Args:
        w: The dense kernel ``(c_out, c_in, kh, kw)``.
        c: The input covariance over ``F.unfold`` patches, ``(c_in * kh * kw)`` square.
        u_in: The input factor ``(c_in, r_in)``.
        r_out: The output rank.
        damping: As for :func:`covariance_sqrt`.

    Returns ``(u_out (c_out, r_out), core (r_out, r_in, kh, kw))`` in float64, or None when ``r_out`` exceeds the
    rank ``Z`` can have (``min(c_out, r_in * kh * kw)``).
    """
    c_out, c_in, kh, kw = w.shape
    r_in, k = u_in.shape[1], kh * kw
    if r_out > min(c_out, r_in * k):
        return None
    cd = _damped(c, damping).reshape(c_in, k, c_in, k)
    u = u_in.detach().to(torch.float64)
    a = torch.einsum("ib,ikjl,jc->bkcl", u, cd, u).reshape(r_in * k, r_in * k)
    wc = (w.detach().to(torch.float64).reshape(c_out, -1) @ cd.reshape(c_in * k, c_in * k)).reshape(c_out, c_in, k)
    b = torch.einsum("oik,ib->obk", wc, u).reshape(c_out, r_in * k)
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    # A is positive semi-definite: round-off negatives, and directions P C P^T never reaches, get a floor.
    evals = evals.clamp_min(max(evals.max().item(), 1e-300) * a.shape[0] * torch.finfo(torch.float64).eps)
    r_inv = (evecs / evals.sqrt()) @ evecs.T
    left, sing, right = torch.linalg.svd(b @ r_inv, full_matrices=False)
    core = (sing[:r_out, None] * right[:r_out]) @ r_inv
    return left[:, :r_out], core.reshape(r_out, r_in, kh, kw)


def output_error(w_hat: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(D C D^T) / tr(W C W^T))``, ``D = W_hat - W`` (0 when ``C`` carries nothing)."""
    w64, d = _as_matrix(w), _as_matrix(w_hat) - _as_matrix(w)
    c64 = c.detach().to(device=w64.device, dtype=torch.float64)
    num = ((d @ c64) * d).sum().clamp(min=0).item()
    den = ((w64 @ c64) * w64).sum().item()
    return math.sqrt(num / den) if den > 0 else 0.0


def _transpose_jacobian(reconstruct: Reconstruct, factors: list[torch.Tensor], k: int, m: torch.Tensor) -> torch.Tensor:
    """``J_k^T m``: the gradient of ``<reconstruct(factors), m>`` in factor ``k`` (the same for any value of it)."""
    g = factors[k].detach().requires_grad_()
    with torch.enable_grad():
        dense = reconstruct([*factors[:k], g, *factors[k + 1 :]])
        return torch.autograd.grad(dense, g, grad_outputs=m)[0]


def _solve_factor(
    reconstruct: Reconstruct,
    factors: list[torch.Tensor],
    k: int,
    wc: torch.Tensor,
    c: torch.Tensor,
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    """Minimise ``f(g) = tr((W'(g) - W) C (W'(g) - W)^T)`` over factor ``k`` by conjugate gradient.

    ``W'`` is linear in ``g``, so ``f`` is quadratic: gradient ``H g - b`` with ``H v = 2 J^T (W'(v) C)`` (the
    matrix rebuilt with ``v`` in place of the factor) and ``b = 2 J^T (W C)``. These products are exact for any
    ``v``, unlike finite differences of gradients. CG starts from the current factor, and every iterate lowers
    ``f`` (it minimises ``f`` over a growing Krylov space), so stopping early still improves.
    """

    def hessian(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            m = 2 * reconstruct([*factors[:k], v, *factors[k + 1 :]]) @ c
        return _transpose_jacobian(reconstruct, factors, k, m)

    b = _transpose_jacobian(reconstruct, factors, k, 2 * wc)
    x = factors[k].detach().clone()
    r = b - hessian(x)
    p, rr = r.clone(), (r * r).sum()
    stop = (tol * torch.linalg.norm(b)) ** 2
    for _ in range(max_iter):
        if rr <= stop:
            break
        hp = hessian(p)
        curvature = (p * hp).sum()
        if curvature <= 0:  # a direction the data do not constrain (round-off of a singular H): nothing to gain
            break
        alpha = rr / curvature
        x += alpha * p
        r -= alpha * hp
        rr, rr_old = (r * r).sum(), rr
        p = r + (rr / rr_old) * p
    return x


def fit_to_covariance_(
    factors: Sequence[torch.Tensor],
    reconstruct: Reconstruct,
    w: torch.Tensor,
    c: torch.Tensor,
    *,
    sweeps: int = 2,
    damping: float = DEFAULT_DAMPING,
    max_cg_iter: int = 100,
    tol: float = 1e-10,
    gauge: Callable[[list[torch.Tensor], int], list[torch.Tensor]] | None = None,
    only: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Alternating least squares on the output error, for any multilinear format; updates ``factors`` in place.

    ``reconstruct(factors)`` returns the dense ``(out, in)`` matrix (differentiably, linear in each factor alone:
    MPO cores, Tucker core and factor matrices). Each sweep minimises ``tr((W' - W) C_d (W' - W)^T)``, ``C_d``
    the damped ``C``, over one factor at a time, the others fixed (conjugate gradient from the current factor,
    to relative residual ``tol`` or ``max_cg_iter`` steps). A step that does not lower the objective is not
    taken, so the result is never worse than the start. ``gauge(factors, k)``, when given, returns factors
    representing the same matrix with factor ``k`` as the gauge center (``mpo_mixed_canonical``): the other
    factors are then isometries and factor ``k``'s problem as well conditioned as ``C`` allows. ``only`` lists the
    factors to solve for (default: all, in order); the others stay as they are.

    The work runs in float64 on ``factors[0]``'s device; the result is copied into ``factors`` (keeping their
    dtype). Returns the relative output error under ``C_d``, ``sqrt(f / tr(W C_d W^T))``, before and after.
    """
    device = factors[0].device
    w64 = _as_matrix(w).to(device)
    cd = _damped(c.to(device), damping)
    wc = w64 @ cd
    norm = ((wc * w64).sum()).item()
    work = [f.detach().to(torch.float64).clone() for f in factors]

    def objective(fs: list[torch.Tensor]) -> float:
        with torch.no_grad():
            d = reconstruct(fs) - w64
            return ((d @ cd) * d).sum().item()

    before = current = objective(work)
    for _ in range(sweeps):
        for k in range(len(work)) if only is None else only:
            if gauge is not None:
                work = [f.contiguous() for f in gauge(work, k)]
            trial = [*work[:k], _solve_factor(reconstruct, work, k, wc, cd, max_cg_iter, tol), *work[k + 1 :]]
            value = objective(trial)
            if value <= current:
                work, current = trial, value
    with torch.no_grad():
        for f, new in zip(factors, work):
            f.copy_(new)
    rel = (lambda v: math.sqrt(max(v, 0.0) / norm)) if norm > 0 else (lambda v: 0.0)
    return rel(before), rel(current)
