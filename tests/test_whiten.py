"""Activation-aware initialisation: the whitened low rank is the exact optimum, ALS never gets worse, the
covariances are X^T X in the weight's column order, and a tensorized model's layers all improve."""

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.activations.calibration import activation_init_, input_covariances, layer_inputs
from tnlit.formats.canonical import mpo_mixed_canonical
from tnlit.formats.mpo import mpo_to_matrix
from tnlit.formats.tucker import tucker2_to_kernel
from tnlit.formats.whiten import (
    covariance_sqrt,
    fit_to_covariance_,
    output_error,
    tucker2_outer_fit,
    whitened_lowrank,
)
from tnlit.layers import LowRankLinear, MPOLinear, TuckerConv2d


def correlated(n: int, d: int) -> torch.Tensor:
    """``(n, d)`` rows whose columns are strongly correlated, with variances spread over four decades."""
    mix = torch.randn(d, d, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, dtype=torch.float64) @ mix.T


def svd_lowrank(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# --- whitened low rank ----------------------------------------------------------------------------------------


def brute_force_lowrank(w: np.ndarray, c: np.ndarray, rank: int, starts: int = 8) -> float:
    """The lowest ``tr(D C D^T) / tr(W C W^T)`` over ``A @ B`` found by BFGS from random starts."""
    out, d_in = w.shape
    norm = np.trace(w @ c @ w.T)
    rng = np.random.default_rng(0)

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[: out * rank].reshape(out, rank), theta[out * rank :].reshape(rank, d_in)
        d = a @ b - w
        g = 2 * d @ c / norm  # gradient in W' = A B
        return np.sum((d @ c) * d) / norm, np.concatenate([(g @ b.T).ravel(), (a.T @ g).ravel()])

    best = np.inf
    for _ in range(starts):
        theta = rng.standard_normal(rank * (out + d_in))
        res = scipy.optimize.minimize(f, theta, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 5000})
        best = min(best, res.fun)
    return float(np.sqrt(best))


def test_whitened_lowrank_is_the_exact_minimiser_and_beats_svd():
    w = torch.randn(6, 8, dtype=torch.float64)
    c = (x := correlated(50, 8)).T @ x
    a, b = whitened_lowrank(w, c, rank=2, damping=0.0)
    ours = output_error(a @ b, w, c)
    brute = brute_force_lowrank(w.numpy(), c.numpy(), rank=2)
    assert ours <= brute + 1e-10  # nothing does better ...
    assert brute <= ours + 1e-6  # ... and a generic optimiser finds the same optimum
    assert ours < 0.9 * output_error(svd_lowrank(w, 2), w, c)  # the weight-optimal SVD is worse on these inputs
    # The default damping moves the optimum by about its own size.
    a, b = whitened_lowrank(w, c, rank=2)
    assert output_error(a @ b, w, c) <= ours + 1e-5


def test_whitened_lowrank_factors_are_balanced():
    w = torch.randn(6, 8, dtype=torch.float64)
    c = (x := correlated(50, 8)).T @ x
    a, b = whitened_lowrank(w, c, rank=3)
    root, inv_root = covariance_sqrt(c)
    torch.testing.assert_close(root @ inv_root, torch.eye(8, dtype=torch.float64))
    half = torch.linalg.svdvals(w @ root)[:3].sqrt()
    torch.testing.assert_close(torch.linalg.svdvals(a), half)
    torch.testing.assert_close(torch.linalg.svdvals(b @ root), half)


@pytest.mark.parametrize("shape", [(6, 8), (8, 6)])
def test_whitened_lowrank_full_rank_reproduces_the_weight(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    c = (x := correlated(40, shape[1])).T @ x
    a, b = whitened_lowrank(w, c, rank=min(shape))
    torch.testing.assert_close(a @ b, w, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="rank must be in 1..6"):
        whitened_lowrank(w, c, rank=7)


def test_whitened_lowrank_keeps_the_weight_dtype():
    a, b = whitened_lowrank(torch.randn(6, 8), torch.eye(8), rank=2)
    assert a.dtype == b.dtype == torch.float32 and a.shape == (6, 2) and b.shape == (2, 8)


@pytest.mark.parametrize("case", ["zero_column_few_samples", "all_zero"])
def test_singular_covariance_stays_finite(case):
    w = torch.randn(6, 8, dtype=torch.float64)
    x = correlated(3, 8)  # fewer samples than features
    x[:, 2] = 0  # and a dead input
    c = x.T @ x if case == "zero_column_few_samples" else torch.zeros(8, 8, dtype=torch.float64)
    root, inv_root = covariance_sqrt(c)
    assert torch.isfinite(root).all() and torch.isfinite(inv_root).all()
    a, b = whitened_lowrank(w, c, rank=2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert np.isfinite(output_error(a @ b, w, c))
    if case == "all_zero":  # nothing to whiten by: the plain SVD
        torch.testing.assert_close(a @ b, svd_lowrank(w, 2))
    layer = MPOLinear.from_dense(nn.Linear(8, 6).double(), bond_dim=2)
    before, after = fit_to_covariance_(list(layer.cores), lambda fs: mpo_to_matrix(fs).t(), w, c)
    assert all(torch.isfinite(core).all() for core in layer.cores)
    assert after <= before


# --- ALS for any multilinear format -----------------------------------------------------------------------------


def mpo_case():
    dense = nn.Linear(12, 8).double()
    layer = MPOLinear.from_dense(dense, bond_dim=2)
    x = correlated(200, 12)
    return dense, layer, list(layer.cores), lambda fs: mpo_to_matrix(fs).t(), x, x


def tucker_case():
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    layer = TuckerConv2d.from_dense(dense, ranks=(2, 2))
    x = correlated(20 * 25, 4).reshape(20, 5, 5, 4).permute(0, 3, 1, 2).contiguous()  # channels correlated
    x = F.avg_pool2d(x, 3, stride=1, padding=1)  # and neighbouring pixels too

    def reconstruct(fs):
        return tucker2_to_kernel(fs[1], fs[0], fs[2]).reshape(6, -1)

    return dense, layer, [layer.u_out, layer.core, layer.u_in], reconstruct, x, layer_inputs(dense, x)


@pytest.mark.parametrize("case", [mpo_case, tucker_case], ids=["mpo", "tucker"])
def test_fit_to_covariance_lowers_the_output_error_and_the_layer_computes_the_fit(case):
    dense, layer, factors, reconstruct, x, rows = case()
    w = dense.weight.detach().reshape(dense.weight.shape[0], -1)
    c = rows.T @ rows
    start = output_error(reconstruct(factors), w, c)
    before, after = fit_to_covariance_(factors, reconstruct, w, c, sweeps=3, damping=0.0)
    fitted = reconstruct(factors)
    assert before == pytest.approx(start, rel=1e-9)
    assert after == pytest.approx(output_error(fitted, w, c), rel=1e-9)
    assert after < 0.9 * before
    # The layer's forward is the fitted matrix's, whichever contraction it picks.
    if isinstance(dense, nn.Conv2d):
        ref = F.conv2d(x, fitted.reshape(dense.weight.shape), dense.bias, dense.stride, dense.padding)
    else:
        ref = x @ fitted.T + dense.bias
    for strategy in ("factors", "dense"):
        layer.contraction = strategy
        torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-9, atol=1e-9)


def test_fit_to_covariance_never_gets_worse():
    """From the optimum (a full-rank, exact MPO) and with one CG step per factor: never above the start."""
    dense, _, _, reconstruct, x, _ = mpo_case()
    w, c = dense.weight.detach(), x.T @ x
    exact = list(MPOLinear.from_dense(dense).cores)
    before, after = fit_to_covariance_(exact, reconstruct, w, c, damping=0.0)
    assert after <= before < 1e-12
    cores = list(MPOLinear.from_dense(dense, bond_dim=2).cores)
    before, after = fit_to_covariance_(cores, reconstruct, w, c, sweeps=1, max_cg_iter=1, gauge=mpo_mixed_canonical)
    assert after < before


# --- calibration ------------------------------------------------------------------------------------------------


def hf_conv1d(d_in: int, d_out: int) -> Conv1D:
    layer = Conv1D(d_out, d_in).double()  # weight stored (in, out)
    nn.init.normal_(layer.weight)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_input_covariances_of_linear_layers(kind):
    first = nn.Linear(5, 7).double() if kind == "linear" else hf_conv1d(5, 7)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(7, 3).double()).train()
    batches = [(torch.randn(2, 4, 5, dtype=torch.float64), torch.zeros(2)) for _ in range(3)]
    covs = input_covariances(model, batches, ["0", "2"], max_batches=2)
    x = torch.cat([b[0] for b in batches[:2]]).reshape(-1, 5)
    hidden = torch.relu(first(x))
    torch.testing.assert_close(covs["0"][0], x.T @ x)
    torch.testing.assert_close(covs["2"][0], hidden.T @ hidden)
    assert covs["0"][1] == covs["2"][1] == 16  # 2 batches x 2 sequences x 4 tokens
    assert model.training and not model[0]._forward_pre_hooks


@pytest.mark.parametrize(
    "conv",
    [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3), padding="same", dilation=(2, 1))],
    ids=["stride2_pad1", "same_even_dilated"],
)
def test_input_covariances_of_a_conv_match_its_weight_columns(conv):
    layer = nn.Conv2d(3, 4, bias=False, **conv).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    rows = layer_inputs(layer, x)
    # The patches times the flattened kernel are the convolution: the columns are in the weight's order.
    y = layer(x).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows @ layer.weight.reshape(4, -1).T, y)
    c, n = input_covariances(nn.Sequential(layer), [x[:1], x[1:]], ["0"])["0"]
    torch.testing.assert_close(c, rows.T @ rows)
    assert n == rows.shape[0]


def test_input_covariances_removes_its_hooks_on_error():
    model = nn.Sequential(nn.Linear(4, 4))

    def batches():
        yield torch.randn(2, 4)
        yield torch.randn(2, 5)  # the wrong width: the forward raises

    with pytest.raises(RuntimeError):
        input_covariances(model, batches(), ["0"])
    assert not model[0]._forward_pre_hooks


def test_activation_init_lowers_every_layers_output_error():
    teacher = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 10)
    ).eval()
    plan = TensorizePlan([Rule("0", "tucker", rank=[3, 2]), Rule("3", "mpo", bond_dim=3), Rule("5", "lowrank", rank=3)])
    student, _ = tensorize(teacher, plan)
    images = F.avg_pool2d(correlated(64 * 16, 3).float().reshape(64, 4, 4, 3).permute(0, 3, 1, 2), 3, 1, 1)
    batches = [(images[:32], None), (images[32:], None)]
    covs = input_covariances(teacher, batches, ["0", "3", "5"])
    stats = activation_init_(student, teacher, covs)
    assert set(stats) == {"0", "3", "5"}
    for name, s in stats.items():
        assert s["output_error_after"] < s["output_error_before"], name
        assert student.get_submodule(name).to_dense_weight().dtype == torch.float32
    # The reported error is what the layer really does on the calibration inputs (the bias cancels).
    with torch.no_grad():
        measured = torch.linalg.norm(student[0](images) - teacher[0](images)) / torch.linalg.norm(
            teacher[0](images) - teacher[0].bias[:, None, None]
        )
    assert measured.item() == pytest.approx(stats["0"]["output_error_after"], rel=1e-3)
    assert isinstance(student[5], LowRankLinear)


def test_tucker2_outer_fit_is_the_joint_optimum_given_the_input_factor():
    torch.manual_seed(3)
    c_out, c_in, k, r_out, r_in = 6, 5, 3, 3, 2
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    x = correlated(200, c_in * k * k)
    c = x.T @ x
    u_in = torch.linalg.qr(torch.randn(c_in, r_in, dtype=torch.float64))[0]
    u_out, core = tucker2_outer_fit(w, c, u_in, r_out)
    assert torch.allclose(u_out.T @ u_out, torch.eye(r_out, dtype=torch.float64), atol=1e-10), "u_out orthonormal"

    def reconstruct(fs):
        return tucker2_to_kernel(fs[1], fs[0], fs[2]).reshape(c_out, -1)

    exact = output_error(reconstruct([u_out, core, u_in]), w.reshape(c_out, -1), c)
    # Brute force: long alternating least squares over u_out and core alone, u_in fixed, from random starts.
    best = float("inf")
    for seed in range(2):
        torch.manual_seed(seed)
        fs = [torch.randn(c_out, r_out, dtype=torch.float64), torch.randn(r_out, r_in, k, k, dtype=torch.float64), u_in]
        fit_to_covariance_(fs, reconstruct, w, c, sweeps=25, max_cg_iter=60, tol=1e-12, only=[0, 1], damping=1e-6)
        best = min(best, output_error(reconstruct(fs), w.reshape(c_out, -1), c))
    assert exact <= best + 1e-9
    assert best - exact < 1e-4, (exact, best)
    assert tucker2_outer_fit(w, c, u_in, r_out=r_in * k * k + 1) is None, "a rank Z cannot have"


def test_input_covariances_stop_the_forward_after_the_last_needed_layer():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 3))
    ran = []
    model[3].register_forward_hook(lambda *a: ran.append(1))
    x = torch.randn(10, 4)
    covs = input_covariances(model, [x, x], ["0", "2"])
    assert not ran, "the head ran although no covariance needs it"
    assert covs["2"][1] == 20, "every batch still reached the last needed layer"
    h = torch.relu(model[0](x)).double()
    assert torch.allclose(covs["2"][0], 2 * h.T @ h)
