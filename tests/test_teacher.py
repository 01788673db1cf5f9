"""Teachers: the CIFAR ResNet-34, the built-in quickstart models, evaluation, and the teacher LightningModules."""

import itertools
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_gpt2
from lightning.pytorch import Callback, Trainer
from torch import nn

from tnlit.cli import main
from tnlit.data import DigitsDataModule, PydocTextDataModule
from tnlit.evaluate import accuracy, perplexity
from tnlit.methods import CausalLM, ImageClassifier
from tnlit.models import load_model
from tnlit.models.resnet import cifar_resnet34

BLOCK_CONVS = r"layer\d\.\d+\.conv[12]"

# ---------------------------------------------------------------------------------------------- models


def test_cifar_resnet34_forward_shape_and_width():
    net = cifar_resnet34(num_classes=7, width=8).eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 7)  # global pooling: any size that survives 3 strides
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and not hasattr(net, "maxpool")
    stage_widths = [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3, 4)]
    assert stage_widths == [8, 16, 32, 64] and net.fc.in_features == 64
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]


def test_cifar_resnet34_has_torchvisions_names_so_the_same_patterns_apply():
    import torchvision

    ours = cifar_resnet34()
    with torch.device("meta"):
        theirs = torchvision.models.resnet34()
    convs = [name for name, _ in ours.named_modules() if re.fullmatch(BLOCK_CONVS, name)]
    assert len(convs) == 32
    assert convs == [name for name, _ in theirs.named_modules() if re.fullmatch(BLOCK_CONVS, name)]
    assert all(ours.get_submodule(name).kernel_size == (3, 3) for name in convs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    # Same topology: only the stem (7x7 -> 3x3) and the head (1000 -> 10 classes) differ in size.
    count = sum(p.numel() for p in ours.parameters())
    stem_and_head = 64 * 3 * (49 - 9) + 513 * (1000 - 10)
    assert count == sum(p.numel() for p in theirs.parameters()) - stem_and_head == 21_282_122


def test_quickstart_models_are_registered():
    narrow = load_model("cifar-resnet34-w16")
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128 and narrow.fc.out_features == 10
    assert sum(p.numel() for p in load_model("cifar-resnet34", meta=True).parameters()) == 21_282_122
    lm = load_model("tiny-gpt2-bytes")
    cfg = lm.config
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (256, 256, 128, 4, 4)
    assert cfg.bos_token_id == cfg.eos_token_id == ord("\n")
    assert lm(torch.randint(256, (1, 256))).logits.shape == (1, 256, 256)


# -------------------------------------------------------------------------------------------- evaluate


class _Logits(nn.Module):
    """Returns its input as the logits; records the mode it ran in. A BatchNorm that must keep its own mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.norm = nn.BatchNorm1d(3)
        self.ran_in_training_mode: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ran_in_training_mode.append(self.training)
        return x * self.scale


def test_accuracy_by_hand_and_mode_restored():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 0, 5], [1, 0, 0], [0, 1, 0]])
    labels = torch.tensor([0, 1, 1, 0, 2])  # predictions 0, 1, 2, 0, 1: three right of five
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    model = _Logits().train()
    model.norm.eval()
    assert accuracy(model, batches) == pytest.approx(60.0)
    assert model.ran_in_training_mode == [False, False]
    assert model.training and not model.norm.training  # each submodule back in its own mode
    assert model.scale.grad is None


class _Bigram(nn.Module):
    """A causal LM whose next-token log-probabilities are a fixed table: logits = log P[current token]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.logp = nn.Embedding.from_pretrained(table.log())

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logp(ids))


def test_perplexity_by_hand():
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]], dtype=torch.float64)
    sequences = [[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 2]]
    pairs = [(a, b) for seq in sequences for a, b in zip(seq, seq[1:])]
    expected = math.exp(-sum(math.log(table[a, b].item()) for a, b in pairs) / len(pairs))  # 9 predictions
    batches = [torch.tensor(sequences[:2]), {"input_ids": torch.tensor(sequences[2:])}]  # uneven batches
    assert perplexity(_Bigram(table), batches) == pytest.approx(expected, rel=1e-6)  # float32 log-softmax
    uniform = _Bigram(torch.full((3, 3), 1 / 3, dtype=torch.float64))
    assert perplexity(uniform, batches) == pytest.approx(3.0, rel=1e-6)


def test_perplexity_matches_hf_loss_on_a_causal_lm():
    model = tiny_gpt2()
    ids = torch.randint(101, (4, 16))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert perplexity(model, [ids[:1], ids[1:]]) == pytest.approx(loss.exp().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- methods


class _TrainLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def _trainer(epochs: int, callbacks: tuple[Callback, ...] = (), **options) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **options,
    )


def test_image_classifier_learns_digits():
    data = DigitsDataModule(batch_size=32, image_size=8, train_size=256)
    module = ImageClassifier(cifar_resnet34(width=8), lr=0.05)
    record = _TrainLosses()
    trainer = _trainer(2, (record,))
    trainer.fit(module, data)
    assert len(record.losses) == 16
    first, last = record.losses[:3], record.losses[-8:]
    assert sum(last) / len(last) < 0.75 * sum(first) / len(first), record.losses
    # The logged accuracy is a fraction; evaluate.accuracy gives percent of the same val set.
    logged = trainer.callback_metrics
    assert logged["val/acc"].item() * 100 == pytest.approx(accuracy(module.model, data.val_dataloader()), abs=1e-3)
    assert "val/loss" in logged and "train/loss" in logged


def test_image_classifier_builds_by_name_and_fits_the_head():
    by_name = ImageClassifier("cifar-resnet34-w16")
    assert by_name.hparams.model == "cifar-resnet34-w16" and by_name.model.conv1.out_channels == 16
    refit = ImageClassifier(cifar_resnet34(width=4), num_classes=3)
    assert refit.model.fc.out_features == 3 and "model" not in refit.hparams


def test_causal_lm_learns_bytes_and_logs_token_perplexity():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=256, bos_token_id=10, eos_token_id=10
    )
    data = PydocTextDataModule(seq_len=32, batch_size=16, train_sequences=320)
    data.setup()
    module = CausalLM(GPT2LMHeadModel(config), lr=1e-2, warmup_steps=5)
    before = perplexity(module.model, itertools.islice(data.val_dataloader(), 4))
    trainer = _trainer(2, check_val_every_n_epoch=2)  # one validation pass, at the end
    trainer.fit(module, data)
    after = perplexity(module.model, data.val_dataloader())
    assert before > 150 and after < before / 4  # random guessing over 256 bytes, then the byte statistics
    logged = trainer.callback_metrics
    assert logged["val/ppl"].item() == pytest.approx(after, rel=1e-4)
    assert logged["val/ppl"].item() == pytest.approx(logged["val/loss"].exp().item(), rel=1e-6)


def test_tnlit_fit_trains_both_teachers_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LightningCLI writes its config and logs under the working directory
    common = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    main(
        [
            "fit",
            "--model",
            "tnlit.methods.teacher.ImageClassifier",
            "--model.model",
            "cifar-resnet34-w16",
            "--data",
            "tnlit.data.offline.DigitsDataModule",
            "--data.image_size",
            "8",
            *common,
        ]
    )
    main(
        [
            "fit",
            "--model",
            "tnlit.methods.teacher.CausalLM",
            "--data",
            "tnlit.data.offline.PydocTextDataModule",
            "--data.seq_len",
            "32",
            *common,
        ]
    )


def test_teacher_options_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "tnlit.methods.teacher.CausalLM"])
    out = capsys.readouterr().out
    for option in ("--model.model", "--model.lr", "--model.weight_decay", "--model.warmup_steps"):
        assert option in out
    assert "Optimizer steps of linear warm-up" in " ".join(out.split())  # the docstring became the help
