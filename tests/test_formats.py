"""The pure maths: site dims, closed-form counts, rank rules, TT-SVD and Tucker-2 against oracles."""

import math

import pytest
import torch

from tnlit.formats import (
    RankError,
    balanced_factors,
    lowrank_from_matrix,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_from_matrix,
    mpo_max_bond_dims,
    mpo_params,
    mpo_to_matrix,
    tucker2_from_kernel,
    tucker2_params,
    tucker2_ranks,
    tucker2_to_kernel,
)


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (1600, 2, (40, 40)),
        (6400, 2, (80, 80)),
        (768, 2, (24, 32)),
        (3072, 2, (48, 64)),
        (1000, 3, (10, 10, 10)),
        (13, 2, (1, 13)),
        (7, 1, (7,)),
    ],
)
def test_balanced_factors(n, k, expected):
    assert balanced_factors(n, k) == expected


def test_gpt2_xl_mlp_bond_dim_832_at_cr_048():
    # PAPER.md: 1600 = 40x40, 6400 = 80x80; a two-site MPO keeping 52% of the parameters has bond 832.
    for d_in, d_out in [(1600, 6400), (6400, 1600)]:
        in_dims, out_dims = balanced_factors(d_in, 2), balanced_factors(d_out, 2)
        bonds = mpo_bond_dims(in_dims, out_dims, cr=0.48)
        assert bonds == [832]
        assert 1 - mpo_params(in_dims, out_dims, bonds) / (d_in * d_out) == pytest.approx(0.48)


def test_cr_rank_is_largest_within_budget():
    in_dims, out_dims = (4, 6, 5), (3, 8, 7)
    dense = math.prod(in_dims) * math.prod(out_dims)
    for cr in (0.3, 0.5, 0.8, 0.95):
        bonds = mpo_bond_dims(in_dims, out_dims, cr=cr)
        assert mpo_params(in_dims, out_dims, bonds) <= (1 - cr) * dense
        bigger = [min(max(bonds) + 1, e) for e in mpo_max_bond_dims(in_dims, out_dims)]
        assert bigger == bonds or mpo_params(in_dims, out_dims, bigger) > (1 - cr) * dense
    for cr in (0.3, 0.7):
        r_out, r_in = tucker2_ranks(128, 64, (3, 3), cr=cr)
        assert tucker2_params(128, 64, (3, 3), (r_out, r_in)) <= (1 - cr) * 128 * 64 * 9
        assert r_out == pytest.approx(2 * r_in, abs=1)  # ranks proportional to the channels
        assert tucker2_params(128, 64, (3, 3), (r_out + 2, r_in + 1)) > (1 - cr) * 128 * 64 * 9
    r = lowrank_rank_for_cr(100, 300, cr=0.5)
    assert r * 400 <= 15000 < (r + 1) * 400


def test_square_conv_rule_documented_example():
    assert tucker2_ranks(64, 64, (3, 3), cr=0.5) == (38, 38)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: mpo_bond_dims((4, 4), (4, 4), cr=0.99), "CR 0.99 is out of reach"),
        (lambda: mpo_bond_dims((4, 4), (4, 4), bond_dim=17), "use 1 to 16"),
        (lambda: mpo_bond_dims((2, 3, 4), (2, 3, 4), bond_dim=[4, 17]), "inner bond 1"),
        (lambda: mpo_bond_dims((2, 3), (2, 3), bond_dim=[2, 2]), "1 inner bonds"),
        (lambda: mpo_bond_dims((4, 4), (4, 4), cr=1.2), "strictly between 0 and 1"),
        (lambda: tucker2_ranks(8, 4, (3, 3), ranks=(9, 2)), "r_out in 1..8"),
        (lambda: tucker2_ranks(4, 4, (1, 1), cr=0.9), "even ranks (1, 1)"),
        (lambda: lowrank_rank_for_cr(4, 4, rank=5), "use 1 to 4"),
        (lambda: lowrank_rank_for_cr(4, 4, cr=0.95), "even rank 1"),
    ],
)
def test_impossible_requests_say_what_is_possible(call, needle):
    with pytest.raises(RankError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("sites", [1, 2, 3])
def test_tt_svd_exact_at_full_bond(sites):
    w = torch.randn(24, 60, dtype=torch.float64)
    in_dims, out_dims = balanced_factors(24, sites), balanced_factors(60, sites)
    cores = mpo_from_matrix(w, in_dims, out_dims)
    assert [c.shape[1:3] for c in cores] == list(zip(in_dims, out_dims))
    assert sum(c.numel() for c in cores) == mpo_params(in_dims, out_dims, mpo_max_bond_dims(in_dims, out_dims))
    assert torch.linalg.norm(mpo_to_matrix(cores) - w) / torch.linalg.norm(w) < 1e-12


def test_two_site_truncation_is_eckart_young():
    # Two sites: the MPO is the SVD of W regrouped as (i1 o1) x (i2 o2), so truncating to bond k leaves exactly
    # the error of the best rank-k approximation of that matrix.
    w = torch.randn(6 * 5, 4 * 7, dtype=torch.float64)
    in_dims, out_dims = (6, 5), (4, 7)
    regrouped = w.reshape(6, 5, 4, 7).permute(0, 2, 1, 3).reshape(24, 35)
    s = torch.linalg.svdvals(regrouped)
    for k in (1, 5, 12, 23):
        cores = mpo_from_matrix(w, in_dims, out_dims, bond_dim=k)
        err = torch.linalg.norm(mpo_to_matrix(cores) - w)
        assert err.item() == pytest.approx(s[k:].square().sum().sqrt().item(), rel=1e-9)


def test_lowrank_factors_are_balanced_and_optimal():
    w = torch.randn(30, 20, dtype=torch.float64)
    a, b = lowrank_from_matrix(w, rank=7)
    s = torch.linalg.svdvals(w)
    assert torch.linalg.norm(a @ b - w).item() == pytest.approx(s[7:].square().sum().sqrt().item(), rel=1e-9)
    # sqrt(S) on each side: the two factors carry the same singular values.
    assert torch.allclose(torch.linalg.svdvals(a), torch.linalg.svdvals(b), rtol=1e-9)


def test_tucker2_exact_at_full_rank_and_counts():
    k = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    core, u_out, u_in = tucker2_from_kernel(k)
    assert torch.linalg.norm(tucker2_to_kernel(core, u_out, u_in) - k) / torch.linalg.norm(k) < 1e-12
    core, u_out, u_in = tucker2_from_kernel(k, ranks=(5, 3))
    assert (core.shape, u_out.shape, u_in.shape) == ((5, 3, 3, 3), (12, 5), (8, 3))
    assert core.numel() + u_out.numel() + u_in.numel() == tucker2_params(12, 8, (3, 3), (5, 3))
    # Orthonormal factors (HOSVD), the input for canonical forms and spectra later.
    assert torch.allclose(u_out.T @ u_out, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_hooi_is_no_worse_than_hosvd():
    k = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    errs = [
        torch.linalg.norm(tucker2_to_kernel(*tucker2_from_kernel(k, ranks=(6, 6), n_iter=n)) - k).item()
        for n in (0, 20)
    ]
    assert errs[1] <= errs[0] + 1e-12


def test_half_precision_weights_decompose_in_float32():
    w = torch.randn(16, 32).to(torch.bfloat16)
    cores = mpo_from_matrix(w, (4, 4), (4, 8), cr=0.5)
    assert all(c.dtype == torch.bfloat16 for c in cores)
