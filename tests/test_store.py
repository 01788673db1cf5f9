"""The activation store (cache mode, and serial from it): round trip, validation and repair, and the pipeline."""

import json

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors import safe_open
from safetensors.torch import load_file

import tnlit.activations.store
from tnlit import Rule, TensorizePlan, tensorize
from tnlit.activations.capture import capture
from tnlit.activations.datamodule import ActivationDataModule
from tnlit.activations.store import open_store, teacher_fingerprint
from tnlit.data.synthetic import RandomTokensDataModule
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.pipeline import SliceSettings, compress, load_teacher
from tnlit.slices import make_slices

PLAN = TensorizePlan([Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", "mpo", cr=0.5)])


TokenData = RandomTokensDataModule


def parts(**data_args):
    teacher = load_teacher("tiny-gpt2").eval()
    student, _ = tensorize(teacher, PLAN)
    data = TokenData(**data_args)
    data.setup("fit")
    return teacher, student, data, make_slices(student, "block")


def contents(root):
    """Every tensor of every shard, by file."""
    return {p.name: load_file(p) for p in sorted(root.glob("shard-*.safetensors"))}


def assert_same_store(a, b):
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        assert ca[name].keys() == cb[name].keys()
        for key in ca[name]:
            assert torch.equal(ca[name][key], cb[name][key]), (name, key)


def test_store_round_trips_what_capture_gives(tmp_path):
    teacher, _, data, slices = parts(shuffle=True)
    store = open_store(tmp_path / "cache", teacher, data, slices, seed=1, progress=False)
    assert store.built == len(store) == 4
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "float32" and manifest["format"] == 1
    assert manifest["teacher"] == teacher_fingerprint(teacher)
    assert manifest["data"]["class_path"].endswith("RandomTokensDataModule") and manifest["data"]["seed"] == 1
    assert manifest["slices"] == [{"name": s.name, "entry": s.entry, "exit": s.exit} for s in slices]
    assert manifest["shards"][0]["shapes"]["transformer.h.0.mlp/target"] == [8, 16, 64]

    cached = ActivationDataModule(tmp_path / "cache", shuffle=False)
    cached.setup("fit")
    torch.manual_seed(1)  # the loader's shuffled order of the pass that built the store (seed=1)
    batches = list(data.train_dataloader())
    for batch, got in zip(batches, cached.train_dataloader(), strict=True):
        want = capture(teacher, batch, slices)
        assert got.keys() == want.keys()
        for name, (x, y) in want.items():
            torch.testing.assert_close(got[name][0], x, rtol=0, atol=0)
            torch.testing.assert_close(got[name][1], y, rtol=0, atol=0)

    # A chosen slice reads only its tensors; shuffling reorders whole batches, per epoch, from seed + epoch.
    one = ActivationDataModule(tmp_path / "cache", slices=[slices[1].name], shuffle=True, seed=3)
    one.setup("fit")
    loader = one.train_dataloader()
    assert list(next(iter(loader))) == [slices[1].name]
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append(list(loader.sampler))
    assert sorted(orders[0]) == [0, 1, 2, 3] and orders[0] != orders[1] and orders[0] == orders[2]
    with pytest.raises(ValueError, match="holds no slice nope"):
        ActivationDataModule(tmp_path / "cache", slices=["nope"]).setup("fit")


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")
def test_training_from_the_store_lowers_every_slice_mse(tmp_path, monkeypatch):
    teacher, student, data, slices = parts()
    store = open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    # No teacher forward while training: the module has no teacher, and capture must not run.
    monkeypatch.setattr("tnlit.methods.slice_distill.capture", lambda *a: pytest.fail("the teacher ran"))
    module = SliceDistillation(None, student, slices, lr=1e-2)
    before = module.slice_losses(store.read(0))
    trainer = Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=ActivationDataModule(tmp_path / "cache"))
    after = module.slice_losses(store.read(0))
    assert all(after[k] < 0.7 * before[k] for k in before), (before, after)
    with pytest.raises(ValueError, match="needs the teacher"):
        module.slice_losses((torch.zeros(2, 4, dtype=torch.long),))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_or_missing_shard_is_said_and_recomputed(tmp_path, damage):
    teacher, _, data, slices = parts()
    open_store(tmp_path / "clean", teacher, data, slices, progress=False)
    open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    shard = tmp_path / "cache/shard-000002.safetensors"
    blob = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(blob[:-10] + bytes(b ^ 0xFF for b in blob[-10:]))
    elif damage == "truncate":
        shard.write_bytes(blob[: len(blob) // 2])
    else:
        shard.unlink()
    problem = "missing" if damage == "delete" else "damaged"
    with pytest.warns(UserWarning, match=rf"shard\(s\) shard-000002\.safetensors {problem}"):
        store = open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    assert store.built == 1
    assert_same_store(tmp_path / "clean", tmp_path / "cache")


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    teacher, _, data, slices = parts()
    open_store(tmp_path / "clean", teacher, data, slices, progress=False)
    monkeypatch.setattr(tnlit.activations.store, "_MANIFEST_EVERY_S", 0.0)
    calls = {"n": 0}

    def capture_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return capture(*args)

    monkeypatch.setattr(tnlit.activations.store, "capture", capture_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    monkeypatch.setattr(tnlit.activations.store, "capture", capture)
    assert open_store(tmp_path / "cache", teacher, data, slices, progress=False).built == 2
    assert_same_store(tmp_path / "clean", tmp_path / "cache")
    again = open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    assert again.built == 0, "a finished store is reused"


def test_another_teacher_dtype_or_data_is_said_and_rebuilt(tmp_path, monkeypatch):
    teacher, _, data, slices = parts()
    open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    with torch.no_grad():
        teacher.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    with pytest.warns(UserWarning, match=r"differs in: teacher\)"):
        store = open_store(tmp_path / "cache", teacher, data, slices, progress=False)
    assert store.built == 4
    batch = next(iter(data.train_dataloader()))
    x, y = capture(teacher, batch, slices)[slices[0].name]
    torch.testing.assert_close(store.read(0)[slices[0].name][1], y, rtol=0, atol=0)

    with pytest.warns(UserWarning, match=r"differs in: dtype\)"):
        open_store(tmp_path / "cache", teacher, data, slices, dtype="float16", progress=False)

    # The same DataModule and hyper-parameters giving other batches: the shards' input hashes catch it.
    monkeypatch.setattr(data, "tokens", data.tokens.flip(0))
    with pytest.warns(UserWarning, match=r"shard-000000\.safetensors, .*shard-000003\.safetensors were computed"):
        store = open_store(tmp_path / "cache", teacher, data, slices, dtype="float16", progress=False)
    assert store.built == 4


def test_bfloat16_storage(tmp_path):
    teacher, _, data, slices = parts()
    store = open_store(tmp_path / "cache", teacher, data, slices, dtype="bfloat16", progress=False)
    with safe_open(tmp_path / "cache/shard-000000.safetensors", framework="pt") as f:
        assert f.get_tensor(f"{slices[0].name}/target").dtype == torch.bfloat16
    got = store.read(0)
    want = capture(teacher, next(iter(data.train_dataloader())), slices)
    for name, (x, y) in want.items():
        assert got[name][1].dtype == torch.float32
        torch.testing.assert_close(got[name][0], x, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[name][1], y, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------ pipeline


def run(run_dir, **slicewise):
    settings = {"mode": "cache", "epochs": 2, "lr": 1e-2, "cache_shuffle": False, **slicewise}
    return compress(
        teacher="tiny-gpt2",
        data=TokenData(),
        plan=PLAN,
        task="causal_lm",
        run_dir=run_dir,
        accelerator="cpu",
        progress=False,
        slicewise=SliceSettings(**settings),
    )


@pytest.fixture(scope="module")
def stream_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    run(root, mode="stream")
    return load_file(root / "student.safetensors")


@pytest.mark.parametrize("mode", ["cache", "serial"])
def test_unshuffled_float32_store_gives_the_stream_weights(tmp_path, stream_weights, mode):
    state = run(tmp_path / mode, mode=mode)
    assert state["times"]["cache"]["shards_built"] == 4 and state["times"]["cache"]["optimisation_s"] == 0
    assert (tmp_path / mode / "cache/manifest.json").exists()
    weights = load_file(tmp_path / mode / "student.safetensors")
    assert weights.keys() == stream_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], stream_weights[key], rtol=0, atol=1e-6)


def test_runs_share_a_store_and_a_resumed_run_reuses_it(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    first = run(tmp_path / "a", cache_dir=shared, cache_dtype="bfloat16", cache_shuffle=True)
    assert first["times"]["cache"]["shards_built"] == 4 and not (tmp_path / "a/cache").exists()
    assert set(first["times"]) == {"cache", "slicewise"}

    step = SliceDistillation.training_step
    monkeypatch.setattr(SliceDistillation, "training_step", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "b", mode="serial", cache_dir=shared, cache_dtype="bfloat16")
    monkeypatch.setattr(SliceDistillation, "training_step", step)
    state = run(tmp_path / "b", mode="serial", cache_dir=shared, cache_dtype="bfloat16")
    assert state["done"] and state["times"]["cache"]["shards_built"] == 0


@pytest.mark.parametrize("settings", [{"mode": "cache"}, {"mode": "serial"}], ids=["cache", "serial"])
def test_student_inputs_from_a_store_are_refused_before_anything_runs(tmp_path, monkeypatch, settings):
    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *a, **k: pytest.fail("it trained"))
    with pytest.raises(ValueError, match="inputs=student .* serial_source=teacher"):
        run(tmp_path / "run", inputs="student", **settings)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="slicewise.mode must be one of"):
        run(tmp_path / "run", mode="cached")
