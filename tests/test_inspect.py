"""Bond spectra, canonical forms, the compressibility map, the budgeted plan, bond activations and `tnlit inspect`."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tnlit import Rule, TensorizePlan, estimate, tensorize
from tnlit.analysis.bond_activations import bond_activations, bond_vectors, describe_unit, top_activating
from tnlit.analysis.bonds import bond_spectra, bond_stats, canonical_factors, canonicalize_, model_bond_stats
from tnlit.analysis.compressibility import compressibility_map, every_layer_plan
from tnlit.cli import main
from tnlit.commands.inspect import load_run
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.formats import effective_rank, spectrum_entropy, truncation_errors
from tnlit.layers import LowRankLinear, MPOLinear, TuckerConv2d
from tnlit.pipeline import SliceSettings, compress
from tnlit.tensorize import budget_plan, layer_curves

MLP = r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"


# ------------------------------------------------------------------------------------------ helpers


def mpo3(bond_dim=5, dtype=torch.float64) -> MPOLinear:
    """A three-site MPO (in 2x3x4 -> out 3x2x2) of a random weight, every bond cut to ``bond_dim``."""
    linear = nn.Linear(24, 12).to(dtype)
    return MPOLinear.from_dense(linear, in_dims=(2, 3, 4), out_dims=(3, 2, 2), bond_dim=bond_dim)


def tucker(dtype=torch.float64) -> TuckerConv2d:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1).to(dtype)
    return TuckerConv2d.from_dense(conv, ranks=(5, 4))


def lowrank(dtype=torch.float64) -> LowRankLinear:
    return LowRankLinear.from_dense(nn.Linear(10, 7).to(dtype), rank=4)


def invertible(n: int) -> torch.Tensor:
    """A random well-conditioned invertible matrix (far from orthogonal: it really changes the gauge)."""
    return torch.eye(n, dtype=torch.float64) * 2 + torch.randn(n, n, dtype=torch.float64) * 0.5


def unfolding(w_io: torch.Tensor, in_dims, out_dims, k: int) -> torch.Tensor:
    """The ``(in, out)`` matrix unfolded at inner bond ``k``: sites ``0..k`` (in, out interleaved) against the rest."""
    n = len(in_dims)
    t = w_io.reshape(*in_dims, *out_dims).permute(*[a for s in range(n) for a in (s, n + s)])
    left = math.prod(in_dims[: k + 1]) * math.prod(out_dims[: k + 1])
    return t.reshape(left, -1)


def insert_gauge(layer: MPOLinear, k: int, g: torch.Tensor) -> None:
    """Insert ``G G^-1`` on inner bond ``k``: core k absorbs G on its right bond, core k+1 absorbs G^-1 on its left."""
    with torch.no_grad():
        layer.cores[k].copy_(torch.einsum("aiob,bc->aioc", layer.cores[k], g))
        layer.cores[k + 1].copy_(torch.einsum("cb,biod->ciod", torch.linalg.inv(g), layer.cores[k + 1]))


def assert_isometry(m: torch.Tensor) -> None:
    """``m (rows, cols)`` has orthonormal columns."""
    torch.testing.assert_close(m.t() @ m, torch.eye(m.shape[1], dtype=m.dtype), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ spectra


def test_mpo_spectra_do_not_change_when_g_and_its_inverse_are_inserted_on_a_bond():
    layer = mpo3()
    before = bond_spectra(layer)
    x = torch.randn(7, 24, dtype=torch.float64)
    y = layer(x)
    for k in range(2):
        insert_gauge(layer, k, invertible(5))
    assert not torch.allclose(canonical_factors(layer, "left")[0], layer.cores[0].double())  # the gauge moved
    torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=1e-10)  # the function did not
    after = bond_spectra(layer)
    assert [len(s) for s in after] == [5, 5]
    for s0, s1 in zip(before, after):
        torch.testing.assert_close(s1, s0, atol=1e-10, rtol=1e-10)
        assert torch.all(s1[:-1] >= s1[1:]), "descending"
    # They are the singular values of the layer's own matrix unfolded at each bond.
    w = layer.weight_io().detach()
    for k, s in enumerate(after):
        torch.testing.assert_close(
            s, torch.linalg.svdvals(unfolding(w, (2, 3, 4), (3, 2, 2), k))[:5], atol=1e-10, rtol=0
        )


def test_tucker_and_lowrank_spectra_do_not_depend_on_the_gauge():
    conv = tucker()
    before = bond_spectra(conv)
    g_out, g_in = invertible(5), invertible(4)
    with torch.no_grad():  # u_out G, G^-1 core; the same on the input mode
        conv.u_out.copy_(conv.u_out @ g_out)
        conv.u_in.copy_(conv.u_in @ g_in)
        conv.core.copy_(torch.einsum("ab...,ca,db->cd...", conv.core, torch.linalg.inv(g_out), torch.linalg.inv(g_in)))
    for s0, s1 in zip(before, bond_spectra(conv)):
        torch.testing.assert_close(s1, s0, atol=1e-10, rtol=1e-10)
    kernel = conv.to_dense_weight().detach()
    torch.testing.assert_close(
        bond_spectra(conv)[0], torch.linalg.svdvals(kernel.reshape(8, -1))[:5], atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        bond_spectra(conv)[1], torch.linalg.svdvals(kernel.transpose(0, 1).reshape(6, -1))[:4], atol=1e-10, rtol=0
    )

    low = lowrank()
    before = bond_spectra(low)[0]
    g = invertible(4)
    with torch.no_grad():
        low.a.copy_(low.a @ g)
        low.b.copy_(torch.linalg.inv(g) @ low.b)
    torch.testing.assert_close(bond_spectra(low)[0], before, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(before, torch.linalg.svdvals(low.weight_io().detach())[:4], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------ canonical forms


@pytest.mark.parametrize(("form", "center"), [("left", None), ("right", None), ("mixed", 1), ("schmidt", None)])
def test_mpo_canonical_form_keeps_the_output_and_is_canonical(form, center):
    layer = mpo3()
    for k in range(2):
        insert_gauge(layer, k, invertible(5))
    x = torch.randn(9, 24, dtype=torch.float64)
    y = layer(x)
    canonicalize_(layer, form, center)
    torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=1e-12)
    cores = [c.detach() for c in layer.cores]
    n = len(cores)
    left = {"left": range(n - 1), "right": range(0), "mixed": range(center or 0), "schmidt": range(0)}[form]
    right = {"left": range(0), "right": range(1, n), "mixed": range((center or 0) + 1, n), "schmidt": range(1, n)}[form]
    for k in left:
        assert_isometry(cores[k].reshape(-1, cores[k].shape[-1]))
    for k in right:
        assert_isometry(cores[k].reshape(cores[k].shape[0], -1).t())
    if form == "schmidt":
        # Every bond's basis is singular: the left block up to bond k has orthogonal columns of norms s (U S).
        spectra = bond_spectra(layer)
        block = cores[0].reshape(-1, cores[0].shape[-1])
        for k in range(n - 1):
            if k:
                block = torch.einsum("xa,aiob->xiob", block, cores[k]).reshape(-1, cores[k].shape[-1])
            torch.testing.assert_close(block.t() @ block, torch.diag(spectra[k] ** 2), atol=1e-12, rtol=0)


def test_canonical_form_of_a_bond_wider_than_its_neighbours_allow():
    # Bonds (1, 8): core 1 is (1, 3, 2, 8), whose 6 rows cannot span 8 directions: two come out as zeros.
    layer = MPOLinear((2, 3, 4), (3, 2, 2), [1, 8], dtype=torch.float64)  # TT-SVD would cut the bond to 6
    x = torch.randn(5, 24, dtype=torch.float64)
    y = layer(x)
    canonicalize_(layer, "left")
    torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=1e-12)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 2, 3, 1), (1, 3, 2, 8), (8, 4, 2, 1)]
    spectrum = bond_spectra(layer)[1]
    assert len(spectrum) == 8 and torch.all(spectrum[6:] == 0) and torch.all(spectrum[:6] > 0)


@pytest.mark.parametrize("form", ["orthonormal", "schmidt"])
def test_tucker_orthonormal_factors_keep_the_output(form):
    conv = tucker()
    with torch.no_grad():
        conv.u_out.mul_(3.0).add_(0.2)  # no longer orthonormal
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    y = conv(x)
    canonicalize_(conv, form)
    torch.testing.assert_close(conv(x), y, atol=1e-12, rtol=1e-12)
    assert_isometry(conv.u_out.detach())
    assert_isometry(conv.u_in.detach())
    if form == "schmidt":  # all-orthogonal core: its channel unfoldings have orthogonal rows of norms s
        s_out, s_in = bond_spectra(conv)
        core = conv.core.detach()
        rows_out, rows_in = core.reshape(5, -1), core.transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(rows_out @ rows_out.t(), torch.diag(s_out**2), atol=1e-12, rtol=0)
        torch.testing.assert_close(rows_in @ rows_in.t(), torch.diag(s_in**2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("form", ["left", "right", "schmidt"])
def test_lowrank_canonical_form_keeps_the_output(form):
    low = lowrank()
    x = torch.randn(3, 10, dtype=torch.float64)
    y = low(x)
    canonicalize_(low, form)
    torch.testing.assert_close(low(x), y, atol=1e-12, rtol=1e-12)
    if form == "left":
        assert_isometry(low.a.detach())
    else:
        assert_isometry(low.b.detach().t())


def test_canonical_form_of_a_float32_layer_changes_its_output_by_round_off_only():
    layer = MPOLinear.from_dense(nn.Linear(24, 12), in_dims=(2, 3, 4), out_dims=(3, 2, 2), bond_dim=5)
    x = torch.randn(4, 24)
    y = layer(x)
    canonicalize_(layer, "schmidt")
    assert layer.cores[0].dtype == torch.float32
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="canonical forms orthonormal, schmidt"):
        canonicalize_(tucker(), "left")
    with pytest.raises(ValueError, match="needs a center"):
        canonicalize_(mpo3(), "mixed")


# ------------------------------------------------------------------------------------------ entropy and errors


def test_entropy_of_a_bond_built_from_known_singular_values_is_the_closed_form():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    i1, i2, o1, o2 = 2, 3, 2, 2  # the unfolding is (i1 o1) x (i2 o2) = 4 x 6
    u = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))[0]
    m = u @ torch.diag(s) @ v.t()
    w_io = m.reshape(i1, o1, i2, o2).permute(0, 2, 1, 3).reshape(i1 * i2, o1 * o2)
    linear = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(w_io.t())
    layer = MPOLinear.from_dense(linear, in_dims=(i1, i2), out_dims=(o1, o2))
    insert_gauge(layer, 0, invertible(4))
    (row,) = bond_stats(layer, "l")
    p = s**2 / (s**2).sum()
    assert row.dim == 4
    assert row.entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    assert row.max_entropy == pytest.approx(math.log(4))
    assert row.top_weight == pytest.approx(9 / 14.25)
    assert row.trunc_err_half == pytest.approx(math.sqrt((1 + 0.25) / 14.25), abs=1e-12)
    assert row.eff_rank_99 == 4  # the last direction carries 0.25 / 14.25 = 1.75% of the energy
    torch.testing.assert_close(row.truncation[2], torch.tensor(math.sqrt(1.25 / 14.25), dtype=torch.float64))


def test_spectrum_measures_on_flat_and_one_hot_spectra():
    assert spectrum_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert spectrum_entropy(torch.tensor([2.0, 0.0, 0.0])) == 0.0
    assert effective_rank(torch.ones(10), 0.99) == 10
    assert effective_rank(torch.tensor([10.0, 1.0, 0.1]), 0.99) == 1  # 100 / 101.01 = 0.990001
    assert effective_rank(torch.tensor([10.0, 2.0, 0.1]), 0.99) == 2
    errors = truncation_errors(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(errors, torch.tensor([1.0, 0.75**0.5, 0.5**0.5, 0.25**0.5, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ map and budget


def separable(n: int) -> torch.Tensor:
    """A random vector of length ``n`` that is a Kronecker product of vectors of its prime factors' lengths: rank 1
    however its index is split into sites."""
    factors, k, d = [], n, 2
    while k > 1:
        while k % d == 0:
            factors.append(d)
            k //= d
        d += 1
    out = torch.ones(1)
    for f in factors:
        out = torch.kron(out, torch.randn(f))
    return out


class Mixed(nn.Module):
    """Layers that differ in compressibility: a nearly rank-3 one (also bond 3 as an MPO of any sites), a random one,
    a decaying spectrum, and two convs (one of low multilinear rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.easy = nn.Linear(48, 64)
        self.hard = nn.Linear(64, 48)
        self.mid = nn.Linear(48, 48)
        self.conv_easy = nn.Conv2d(16, 24, 3)
        self.conv_hard = nn.Conv2d(24, 16, 3)
        with torch.no_grad():
            easy = sum(torch.outer(separable(64), separable(48)) for _ in range(3))
            self.easy.weight.copy_(easy / easy.norm() * 5 + 1e-3 * torch.randn(64, 48))
            self.hard.weight.normal_()
            u, _, vh = torch.linalg.svd(torch.randn(48, 48))
            self.mid.weight.copy_(u @ torch.diag(0.8 ** torch.arange(48.0)) @ vh)
            core = torch.randn(4, 4, 3, 3)
            self.conv_easy.weight.copy_(
                torch.einsum("ab...,oa,ib->oi...", core, torch.randn(24, 4), torch.randn(16, 4))
                + 1e-3 * torch.randn(24, 16, 3, 3)
            )
            self.conv_hard.weight.normal_()


MIXED_PLAN = TensorizePlan([Rule("easy|hard|mid", "mpo"), Rule(r"conv_\w+", "tucker")])


@pytest.mark.parametrize(
    "plan",
    [MIXED_PLAN, TensorizePlan([Rule("easy|hard|mid", "lowrank")]), TensorizePlan([Rule("easy|mid", "mpo", sites=3)])],
    ids=["mpo+tucker", "lowrank", "mpo-3-sites"],
)
def test_compressibility_map_is_what_tensorize_reports(plan):
    model = Mixed()
    cmap = compressibility_map(model, plan, crs=[0.3, 0.6, 0.9])
    for cr in (0.3, 0.6, 0.9):
        rules = [Rule(r.pattern, r.format, cr=cr, sites=r.sites) for r in plan.rules]
        try:
            _, report = tensorize(model, TensorizePlan(rules))
        except ValueError:
            continue  # some layer out of reach at this CR: the map marks it, checked below
        for row in report.layers:
            cell = next(c for c in cmap.cells if c.layer == row.name and c.cr == cr)
            assert cell.ranks == row.ranks and cell.factor_params == row.factor_params
            assert cell.rel_error == pytest.approx(row.rel_error, abs=1e-5)
    grid = cmap.matrix()
    assert grid.shape == (len(cmap.layers), 3)
    # The nearly low-rank layer loses least at every CR where both are reachable.
    if "easy" in cmap.layers and "mid" in cmap.layers:
        assert torch.all(grid[cmap.layers.index("easy")] < grid[cmap.layers.index("mid")])


def test_budgeted_plan_meets_its_budget_with_no_higher_error_than_the_uniform_plan(tmp_path):
    model = Mixed()
    for cr in (0.3, 0.5, 0.7):
        result = budget_plan(model, MIXED_PLAN, cr=cr)
        assert result.uniform_plan is not None
        counted = estimate(model, result.plan)
        assert counted.params_after == result.params_after <= result.budget
        assert counted.compression_rate >= cr
        # The errors are those tensorize measures, for both plans.
        _, ours = tensorize(model, result.plan)
        _, uniform = tensorize(model, result.uniform_plan)
        assert uniform.params_after <= result.budget
        ours_error, uniform_error = (sum(r.rel_error for r in rep.layers) for rep in (ours, uniform))
        assert ours_error == pytest.approx(result.total_error, abs=1e-4)
        assert uniform_error == pytest.approx(result.uniform_error, abs=1e-4)
        assert ours_error <= uniform_error + 1e-6
        assert ours_error < 0.9 * uniform_error, "layers this different leave room to do better than uniform"
        # No layer loses more than the uniform plan's worst layer (the default cap).
        assert max(r.rel_error for r in ours.layers) <= max(r.rel_error for r in uniform.layers) + 1e-5
        spent = {row["name"]: row["cr"] for row in result.layers}
        assert spent["easy"] > spent["hard"], "the budget goes where it saves error"
    result.to_yaml(tmp_path / "plan.yaml")
    import yaml

    rules = yaml.safe_load((tmp_path / "plan.yaml").read_text())["plan"]["rules"]
    assert estimate(model, TensorizePlan(rules)).params_after == result.params_after  # the YAML is the plan


def test_budget_without_the_error_cap_still_meets_the_budget_and_beats_uniform():
    model = Mixed()
    capped, free = (budget_plan(model, MIXED_PLAN, cr=0.6, max_error=m) for m in (None, 1.0))
    assert free.max_error == 1.0 and capped.max_error == pytest.approx(
        max(r["uniform_rel_error"] for r in capped.layers)
    )
    assert estimate(model, free.plan).params_after == free.params_after <= free.budget
    assert free.total_error <= capped.total_error <= capped.uniform_error


def test_budget_out_of_reach_says_what_is_possible():
    with pytest.raises(ValueError, match="within relative error 0.001"):
        budget_plan(Mixed(), MIXED_PLAN, cr=0.3, max_error=0.001)
    with pytest.raises(ValueError, match="out of reach.*ask for at least"):
        budget_plan(Mixed(), MIXED_PLAN, cr=0.99)
    with pytest.raises(ValueError, match="either cr"):
        budget_plan(Mixed(), MIXED_PLAN)


def test_every_layer_plan_takes_linear_and_conv_layers():
    plan = every_layer_plan(Mixed())
    assert [c.name for c in layer_curves(Mixed(), plan)] == ["easy", "hard", "mid", "conv_easy", "conv_hard"]


# ------------------------------------------------------------------------------------------ activations


def test_bond_activation_hook_matches_a_manual_contraction():
    layer = mpo3()
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, 24, dtype=torch.float64)  # (batch, sequence, features): units are tokens
    with bond_activations(model, "0", bond=1, gauge="as_is") as cap:
        y = model(x)
    v = cap.vectors()
    assert v.shape == (2, 5, 5, 3 * 2 * 4) and cap.unit_ndim == 2
    c0, c1, c2 = (c.detach() for c in layer.cores)
    manual = torch.einsum("nabc,xaoy,ybpz->nzopc", x.reshape(10, 2, 3, 4), c0, c1).reshape(2, 5, 5, -1)
    torch.testing.assert_close(v, manual, atol=1e-12, rtol=0)
    # Schmidt gauge: other vectors, and contracting them with the rest of the (Schmidt) cores gives the output.
    with bond_activations(model, "0", bond=1) as cap:
        model(x)
    s = cap.vectors()
    schmidt = canonical_factors(layer, "schmidt")
    rest = torch.einsum("nzopc,zcqw->nopq", s.reshape(10, 5, 3, 2, 4), schmidt[2]).reshape(2, 5, 12)
    torch.testing.assert_close(rest + layer.bias, y, atol=1e-12, rtol=0)
    # Scores and top units.
    scores = cap.scores(0)
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores, s[:, :, 0].norm(dim=-1))
    (top_index, top_score), *_ = cap.top(0, k=3)
    assert scores[top_index] == top_score == scores.max()


def test_tucker_bond_activations_are_the_rank_space_channels():
    conv = tucker()
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    h_in = torch.einsum("nchw,cr->nrhw", x, conv.u_in.detach())
    torch.testing.assert_close(bond_vectors(conv, x, 1), h_in)
    h_out = F.conv2d(h_in, conv.core.detach(), stride=2, padding=1)
    torch.testing.assert_close(bond_vectors(conv, x, 0), h_out)
    with bond_activations(nn.Sequential(conv), "0", bond=0) as cap:
        conv(x)
    assert cap.vectors().shape == (3, 5, 5, 5) and cap.unit_ndim == 1
    assert [i for i, _ in cap.top(2, k=3)] == [(int(j),) for j in cap.scores(2).argsort(descending=True)]
    assert describe_unit((1,)) == "image 1"
    assert describe_unit((1,), labels=torch.tensor([7, 3])) == "image 1 (label 3)"


def test_top_activating_tokens_in_context():
    model = nn.Sequential(nn.Embedding(26, 24), mpo3(dtype=torch.float32))
    tokens = torch.randint(0, 26, (3, 12))
    with bond_activations(model, "1", bond=0) as cap:
        model(tokens)
    rows = top_activating(cap, direction=0, k=4, tokens=tokens, decode=lambda ids: "".join(chr(97 + i) for i in ids))
    seq, pos = map(int, rows[0]["index"].split())
    assert rows[0]["score"] == pytest.approx(float(cap.scores(0).max()))
    assert f"[[{chr(97 + int(tokens[seq, pos]))}]]" in rows[0]["input"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]


def test_activation_choices_out_of_range_are_refused():
    model = nn.Sequential(mpo3())
    with pytest.raises(ValueError, match="bond 2 is out of range.*use 0 to 1"):
        with bond_activations(model, "0", bond=2):
            pass
    with pytest.raises(ValueError, match="layer 'nope': no module"):
        with bond_activations(model, "nope", bond=0):
            pass
    with bond_activations(model, "0", bond=0) as cap:
        model(torch.randn(2, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="direction 5 is out of range"):
        cap.scores(5)


# ------------------------------------------------------------------------------------------ tnlit inspect


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished compress run of tiny-gpt2 (MLPs as MPOs at CR 0.5, one epoch slice-wise)."""
    path = tmp_path_factory.mktemp("inspect") / "run"
    torch.manual_seed(0)
    compress(
        teacher="tiny-gpt2",
        data=RandomTokensDataModule(num_sequences=16, seq_len=12),
        task="causal_lm",
        plan=TensorizePlan([Rule(MLP, "mpo", cr=0.5)]),
        run_dir=path,
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(mode="stream", epochs=1, lr=1e-2),
    )
    return path


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_load_run_rebuilds_the_trained_student(run_dir):
    teacher, student, config = load_run(run_dir)
    saved = load_file(run_dir / "student.safetensors")
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert config["teacher"] == "tiny-gpt2"
    # Without teacher weights the teacher is the run's seeded initialisation: the student's dense parts are its copies.
    assert torch.equal(teacher.transformer.wte.weight, student.transformer.wte.weight)


def test_inspect_a_run_directory_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "results"
    main(
        [
            "inspect",
            "--run_dir",
            str(run_dir),
            "--out_dir",
            str(out),
            "--compressibility",
            "true",
            "--crs",
            "[0.3, 0.6]",
            "--budget_cr",
            "0.1",
            "--layer",
            "transformer.h.1.mlp.c_proj",
            "--bond",
            "0",
            "--direction",
            "0",
            "--top_k",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert "entropy" in printed and "transformer.h.0.mlp.c_fc" in printed and "uniform plan" in printed
    rows = read_csv(out / "run_bonds.csv")
    assert [r["layer"] for r in rows] == [f"transformer.h.{i}.mlp.c_{m}" for i in (0, 1) for m in ("fc", "proj")]
    assert list(rows[0]) == [
        "layer",
        "bond",
        "label",
        "dim",
        "entropy",
        "max_entropy",
        "eff_rank_99",
        "trunc_err_half",
        "trunc_err_quarter",
        "top_weight",
    ]
    _, student, _ = load_run(run_dir)
    stats = model_bond_stats(student)
    for row, s in zip(rows, stats):
        assert int(row["dim"]) == s.dim == 32  # 64 x 256 = 8x8 -> 16x16: 256 b <= 8192 at CR 0.5
        assert float(row["entropy"]) == pytest.approx(s.entropy, rel=1e-5)
        assert 0 < float(row["entropy"]) <= float(row["max_entropy"])
    assert len(read_csv(out / "run_spectra.csv")) == 4 * 32
    cmap = read_csv(out / "run_compressibility.csv")
    assert len(cmap) == 4 * 2 and {r["cr"] for r in cmap} == {"0.3", "0.6"}
    assert "bond_dim" in (out / "run_budget_plan.yaml").read_text()
    top = read_csv(out / "run_top_transformer.h.1.mlp.c_proj_b0_d0.csv")
    assert len(top) == 3 and "[[" in top[0]["input"] and float(top[0]["score"]) >= float(top[1]["score"])
    for png in ("run_spectra.png", "run_compressibility.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    prov = json.loads((out / "run_inspect.provenance.json").read_text())
    assert prov["git_commit"] and prov["config"]["options"]["budget_cr"] == 0.1
    assert prov["config"]["run_config"]["teacher"] == "tiny-gpt2"
    assert str(out / "run_bonds.csv") in prov["config"]["files"]


def test_inspect_a_model_and_a_plan(tmp_path, capsys):
    out = tmp_path / "results"
    main(
        [
            "inspect",
            "--model",
            "tiny-gpt2",
            "--plan.rules",
            f"[{{pattern: '{MLP}', format: mpo, cr: 0.5}}]",
            "--out_dir",
            str(out),
            "--layers",
            r"transformer\.h\.0\..*",
        ]
    )
    rows = read_csv(out / "tiny-gpt2_bonds.csv")
    assert [r["layer"] for r in rows] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert (out / "tiny-gpt2_inspect.provenance.json").exists()
    # Straight from TT-SVD: the bond's spectrum is the leading part of the dense weight's unfolding's.
    from tnlit.models import load_model

    torch.manual_seed(0)
    teacher = load_model("tiny-gpt2")
    student, _ = tensorize(teacher, TensorizePlan([Rule(MLP, "mpo", cr=0.5)]))
    dense = teacher.transformer.h[0].mlp.c_fc.weight.detach().double()  # Conv1D: (in, out) = (64, 256)
    expected = torch.linalg.svdvals(unfolding(dense, (8, 8), (16, 16), 0))[:32]
    torch.testing.assert_close(bond_spectra(student.transformer.h[0].mlp.c_fc)[0], expected, rtol=1e-4, atol=1e-5)


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--run_dir",
        "--model",
        "--plan",
        "--compressibility",
        "--budget_cr",
        "--layer",
        "--bond",
        "--direction",
        "--top_k",
        "--out_dir",
    ):
        assert option in out
    assert "Schmidt" in out  # docstrings become help


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "results"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run_dir / "config.json").read_text())
    assert "has no student.safetensors" in error_of(["inspect", "--run_dir", str(unfinished)], capsys)
    assert "does not exist" in error_of(["inspect", "--run_dir", str(tmp_path / "nowhere")], capsys)
    assert "no config.json" in error_of(["inspect", "--run_dir", str(tmp_path)], capsys)
    base = ["inspect", "--run_dir", str(run_dir), "--out_dir", str(out)]
    err = error_of([*base, "--layer", "transformer.h.0.mlp"], capsys)
    assert "not a tensorized layer" in err and "transformer.h.0.mlp.c_fc" in err
    assert "layer 'nope': no module" in error_of([*base, "--layer", "nope"], capsys)
    err = error_of([*base, "--layer", "transformer.h.0.mlp.c_fc", "--bond", "1"], capsys)
    assert "bond 1 is out of range" in err and "use 0 to 0" in err
    assert "direction 40 is out of range" in error_of(
        [*base, "--layer", "transformer.h.0.mlp.c_fc", "--direction", "40"], capsys
    )
    assert "no tensorized layer matches" in error_of([*base, "--layers", "lm_head"], capsys)
    assert "needs a plan" in error_of(["inspect", "--model", "tiny-gpt2"], capsys)
    assert "either run_dir" in error_of(["inspect"], capsys)
    assert not out.exists() or not any(out.glob("*.csv")), "a refused command writes nothing"
