"""The layers: exact at full rank (float64 oracles), both contractions agree, counts, layouts, bad input."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tnlit.formats import lowrank_params, mpo_params, tucker2_params
from tnlit.layers import LowRankLinear, MPOLinear, TuckerConv2d

STRATEGIES = ["factors", "dense", "auto"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def hf_conv1d(d_in: int, d_out: int) -> Conv1D:
    layer = Conv1D(d_out, d_in).double()  # Conv1D(nf=out, nx=in), weight stored (in, out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


SOURCES = {
    "linear": lambda: nn.Linear(24, 40).double(),
    "linear_nobias": lambda: nn.Linear(24, 40, bias=False).double(),
    "conv1d": lambda: hf_conv1d(24, 40),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "make",
    [lambda m: MPOLinear.from_dense(m), lambda m: MPOLinear.from_dense(m, sites=3), LowRankLinear.from_dense],
    ids=["mpo2", "mpo3", "lowrank"],
)
def test_linear_full_rank_reproduces_dense(source, strategy, make):
    dense = SOURCES[source]()
    layer = make(dense)
    layer.contraction = strategy
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    assert rel(layer(x), dense(x)) < 1e-10
    assert layer.to_dense_weight().shape == dense.weight.shape  # the source's own layout
    assert rel(layer.to_dense_weight(), dense.weight) < 1e-10


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1),
        dict(in_channels=8, out_channels=4, kernel_size=(3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
        dict(in_channels=5, out_channels=7, kernel_size=3, padding="same", bias=False),
        dict(in_channels=6, out_channels=6, kernel_size=1),
    ],
    ids=["stride2_pad1", "rect_dilated", "same_nobias", "pointwise"],
)
def test_tucker_conv_full_rank_reproduces_dense(strategy, conv):
    dense = nn.Conv2d(**conv).double()
    layer = TuckerConv2d.from_dense(dense, contraction=strategy)
    x = torch.randn(2, conv["in_channels"], 9, 11, dtype=torch.float64)
    assert rel(layer(x), dense(x)) < 1e-10
    assert rel(layer.to_dense_weight(), dense.weight) < 1e-10
    assert layer.ranks == (conv["out_channels"], conv["in_channels"])


def test_truncated_strategies_agree_and_counts_are_closed_form():
    x = torch.randn(7, 1600 // 25, dtype=torch.float64)
    lin = nn.Linear(64, 96).double()
    mpo = MPOLinear.from_dense(lin, sites=2, cr=0.5)
    assert mpo.num_params() == mpo_params(mpo.in_dims, mpo.out_dims, mpo.bond_dims)
    assert len(mpo.cores) == 2 and mpo.cores[0].shape[0] == 1 and mpo.cores[-1].shape[-1] == 1
    assert mpo.cores[0].shape[-1] == mpo.cores[1].shape[0] == mpo.bond_dims[0]
    low = LowRankLinear.from_dense(lin, cr=0.5)
    assert low.num_params() == lowrank_params(64, 96, low.rank)
    for layer in (mpo, low):
        layer.contraction = "factors"
        a = layer(x)
        layer.contraction = "dense"
        assert rel(a, layer(x)) < 1e-12
    conv = TuckerConv2d.from_dense(nn.Conv2d(16, 32, 3, padding=1).double(), cr=0.5)
    assert conv.num_params() == tucker2_params(32, 16, (3, 3), conv.ranks)
    xi = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    conv.contraction = "factors"
    a = conv(xi)
    conv.contraction = "dense"
    assert rel(a, conv(xi)) < 1e-12


def test_bond_dim_and_explicit_site_dims():
    lin = nn.Linear(60, 36)
    layer = MPOLinear.from_dense(lin, in_dims=(3, 4, 5), out_dims=(2, 3, 6), bond_dim=[4, 10])
    assert layer.bond_dims == [4, 10] and layer.in_dims == (3, 4, 5) and layer.out_dims == (2, 3, 6)
    with pytest.raises(ValueError, match="do not fit"):
        MPOLinear.from_dense(lin, in_dims=(3, 4), out_dims=(6, 6))


def test_auto_picks_rebuild_for_big_batches_and_factors_for_small():
    # The paper's MPO keeps 52% of a 1600x6400 matrix at bond 832: per token it costs far more than the dense
    # GEMM, so a training batch must rebuild W; a low-bond MPO on a single token must not.
    big = MPOLinear(in_dims=(40, 40), out_dims=(80, 80), bond_dims=[832], device="meta")
    assert big.strategy(4096) == "dense"
    small = MPOLinear(in_dims=(40, 40), out_dims=(80, 80), bond_dims=[16], device="meta")
    assert small.strategy(1) == "factors"
    factor_cost, dense_cost = small._costs(1)
    assert factor_cost < dense_cost


def test_gradients_reach_only_factors_and_bias():
    layer = MPOLinear.from_dense(nn.Linear(16, 12), cr=0.3)
    layer(torch.randn(4, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} == {"cores.0", "cores.1", "bias"}


def test_state_dict_round_trip():
    a = TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3), ranks=(4, 3))
    b = TuckerConv2d(8, 8, 3, ranks=(4, 3))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: MPOLinear.from_dense(nn.Linear(32, 48), cr=0.5),
        lambda: LowRankLinear.from_dense(nn.Linear(32, 48), cr=0.5),
        lambda: TuckerConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1), cr=0.5),
    ],
    ids=["mpo", "lowrank", "tucker"],
)
@pytest.mark.parametrize("strategy", ["factors", "dense"])
def test_autocast_bf16(layer, strategy):
    layer = layer()
    layer.contraction = strategy
    x = torch.randn(2, 8, 5, 5) if isinstance(layer, TuckerConv2d) else torch.randn(4, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), ref) < 3e-2


def test_bad_sources_and_settings_are_refused():
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        TuckerConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="tucker"):
        MPOLinear.from_dense(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="contraction must be one of"):
        MPOLinear.from_dense(nn.Linear(4, 4), contraction="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast():
    for strategy in ("factors", "dense"):
        lin = MPOLinear.from_dense(nn.Linear(256, 512).cuda(), cr=0.5, contraction=strategy)
        conv = TuckerConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1).cuda(), cr=0.5, contraction=strategy)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert lin(torch.randn(8, 256, device="cuda")).dtype == torch.bfloat16
            assert conv(torch.randn(2, 32, 8, 8, device="cuda")).dtype == torch.bfloat16
