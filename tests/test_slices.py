"""Slices, teacher activations, slice-wise distillation and global finetuning on tiny models."""

import copy

import pytest
import torch
import torchvision
from conftest import tiny_gpt2
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from tnlit import Rule, TensorizePlan, tensorize
from tnlit.activations.capture import capture, capture_student
from tnlit.methods.global_finetune import GlobalFinetune
from tnlit.methods.slice_distill import SliceDistillation
from tnlit.slices import Slice, SliceModule, make_slices

GPT2_MLP = r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"


def fit(module, data, epochs=2, batch_size=8, callbacks=None):
    seed_everything(0)  # the same data order for every run
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)


def gpt2_pair(cr=0.6):
    teacher = tiny_gpt2()
    with torch.no_grad():  # weights of a trained scale, so that the distillation targets are not ~0
        for p in teacher.parameters():
            p.mul_(10) if p.ndim == 2 else None
    student, _ = tensorize(teacher, TensorizePlan([Rule(GPT2_MLP, "mpo", cr=cr)]))
    return teacher, student


def small_resnet():
    net = torchvision.models.resnet18(num_classes=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, which slice training must not touch
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return net


def test_granularities_on_resnet():
    plan = TensorizePlan([Rule(r"layer\d\.\d+\.conv[12]", "tucker", cr=0.5)], exclude=[r"layer1\.0\.conv[12]"])
    student, _ = tensorize(small_resnet(), plan)
    assert [s.name for s in make_slices(student, "layer")][:2] == ["layer1.1.conv1", "layer1.1.conv2"]
    assert [s.name for s in make_slices(student, "block")] == [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)][
        1:
    ]
    groups = make_slices(student, "group:2")
    # layer1.0 holds nothing to train but stays in its group, so that the group's modules chain.
    assert groups[0] == Slice("layer1.0..layer1.1", ("layer1.0", "layer1.1"))
    assert len(groups) == 4
    for bad in ("group:0", "group:x", "blocks"):
        with pytest.raises(ValueError, match="granularity"):
            make_slices(student, bad)
    with pytest.raises(ValueError, match="outside every block"):
        make_slices(student, "block", block_pattern=r"layer1\.\d+")


def test_capture_stops_after_the_last_slice_and_matches_the_modules():
    teacher, student = gpt2_pair()
    slices = make_slices(student, "block")
    ids = torch.randint(0, 101, (2, 8))
    seen = []
    handle = teacher.lm_head.register_forward_hook(lambda *a: seen.append(1))
    pairs = capture(teacher, ids, slices)
    handle.remove()
    assert not seen, "the LM head ran although no slice needs it"
    x, y = pairs["transformer.h.1.mlp"]
    assert torch.allclose(teacher.transformer.h[1].mlp(x), y)


@pytest.mark.parametrize("inputs", ["teacher", "student", "mix"])
def test_distillation_lowers_every_slice_mse(inputs):
    teacher, student = gpt2_pair()
    slices = make_slices(student, "block")
    data = torch.randint(0, 101, (48, 16))
    module = SliceDistillation(teacher, student, slices, lr=3e-3, inputs=inputs)
    before = module.slice_losses((data,))
    dense_before = {k: v.clone() for k, v in student.state_dict().items() if "ln" in k or "attn" in k}
    fit(module, (data,), epochs=3)
    after = module.slice_losses((data,))
    assert all(after[k] < 0.7 * before[k] for k in before), (before, after)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in dense_before.items()), "a frozen weight moved"


def test_mixed_inputs_move_from_the_teacher_to_the_student():
    teacher, student = gpt2_pair()
    slices = make_slices(student, "block")
    ids = torch.randint(0, 101, (4, 8))
    pairs = capture(teacher, ids, slices)
    teacher_inputs = {name: x for name, (x, _) in pairs.items()}
    parts = {s.name: SliceModule(student, s) for s in slices}
    with torch.no_grad():
        at_teacher = capture_student(student, ids, slices, teacher_inputs, student_weight=0.0)
        at_student = capture_student(student, ids, slices, teacher_inputs, student_weight=1.0)
        alone = capture_student(student, ids, slices)
        halfway = capture_student(student, ids, slices[1:], teacher_inputs, student_weight=0.5)
    for name, (x, _) in pairs.items():
        assert torch.allclose(at_teacher[name], parts[name](x), atol=1e-6), name
        assert torch.allclose(at_student[name], alone[name]), name
    # The second slice's input halfway: the mean of its teacher input and the student's first slice's output.
    second = slices[1].name
    student_entry = {}
    hook = student.get_submodule(slices[1].entry).register_forward_pre_hook(
        lambda _m, args: student_entry.setdefault("x", args[0])
    )
    with torch.no_grad():
        capture_student(student, ids, slices[1:])
    hook.remove()
    blend = 0.5 * teacher_inputs[second] + 0.5 * student_entry["x"]
    assert torch.allclose(halfway[second], parts[second](blend), atol=1e-5)
    assert not torch.allclose(at_teacher[second], alone[second]), "teacher and student inputs should differ"

    module = SliceDistillation(teacher, student, slices, inputs="mix")
    weights = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights.append(pl_module.student_weight())

    fit(module, (torch.randint(0, 101, (24, 8)),), epochs=2, callbacks=[Record()])
    assert weights[0] == 0.0 and weights[-1] == 1.0
    assert all(a < b for a, b in zip(weights, weights[1:])), weights


def test_relative_loss_is_the_mse_over_the_target_energy():
    teacher, student = gpt2_pair()
    slices = make_slices(student, "block")
    ids = torch.randint(0, 101, (8, 8))
    mse = SliceDistillation(teacher, student, slices).slice_losses((ids,))
    relative = SliceDistillation(teacher, student, slices, loss="relative").slice_losses((ids,))
    pairs = capture(teacher, ids, slices)
    for name, (_, y) in pairs.items():
        assert torch.allclose(relative[name], mse[name] / y.pow(2).mean(), rtol=1e-5), name
        assert 0 < relative[name] < 10
    with pytest.raises(ValueError, match="loss must be"):
        SliceDistillation(teacher, student, slices, loss="l1")


def test_stream_and_serial_give_the_same_weights():
    teacher, student = gpt2_pair()
    data = torch.randint(0, 101, (32, 16))
    stream, serial = copy.deepcopy(student), copy.deepcopy(student)
    fit(SliceDistillation(teacher, stream, make_slices(stream, "block"), lr=3e-3), (data,))
    for s in make_slices(serial, "block"):
        fit(SliceDistillation(teacher, serial, [s], lr=3e-3), (data,))
    for (k, a), b in zip(stream.state_dict().items(), serial.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_resnet_block_distillation_keeps_batchnorm_statistics():
    teacher = small_resnet()
    student, _ = tensorize(teacher, TensorizePlan([Rule(r"layer\d\.\d+\.conv[12]", "tucker", cr=0.6)]))
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    images = torch.randn(32, 3, 16, 16)
    module = SliceDistillation(teacher, student, make_slices(student, "block"), lr=1e-3)
    before = module.slice_losses((images,))
    fit(module, (images, torch.zeros(32, dtype=torch.long)))
    after = module.slice_losses((images,))
    assert sum(after.values()) < sum(before.values())
    assert all(torch.equal(student.state_dict()[k], v) for k, v in stats.items())


def test_non_finite_loss_names_the_slice():
    teacher, student = gpt2_pair()
    with torch.no_grad():
        student.transformer.h[1].mlp.c_proj.cores[0].fill_(float("nan"))
    module = SliceDistillation(teacher, student, make_slices(student, "block"))
    with pytest.raises(FloatingPointError, match="transformer.h.1.mlp"):
        fit(module, (torch.randint(0, 101, (8, 8)),), epochs=1)


def test_global_finetune_lowers_the_task_loss_and_only_factors_move():
    teacher, student = gpt2_pair(cr=0.8)
    data = torch.randint(0, 101, (32, 16))
    data[:, 1::2] = data[:, ::2]  # a pattern worth learning: every odd token repeats the one before
    module = GlobalFinetune(student, task="causal_lm", teacher=teacher, lr=3e-3, kd_weight=0.3)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "cores" not in k}

    def loss() -> float:
        from tnlit.methods.global_finetune import logits_of, task_loss

        with torch.no_grad():
            return task_loss("causal_lm", logits_of(student, data), (data,)).item()

    before = loss()
    fit(module, (data,), epochs=3)
    assert loss() < before
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items())


def test_global_finetune_refuses_bad_settings():
    _, student = gpt2_pair()
    with pytest.raises(ValueError, match="task must be"):
        GlobalFinetune(student, task="regression")
    with pytest.raises(ValueError, match="needs the teacher"):
        GlobalFinetune(student, task="causal_lm", kd_weight=0.5)
