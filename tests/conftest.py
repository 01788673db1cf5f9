"""Test settings: offline, quiet, deterministic. Set before anything imports transformers or wandb.

Test files are named after the module they test (test_store: tnlit.activations.store, test_recipe: compress in
tnlit.pipeline.recipe, test_phases: its init phase, ...)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Where other processes share the cores, spinning OpenMP threads make torch many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32):
    """A GPT-2 built in memory: Conv1D MLPs, tied head, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=64, vocab_size=101, bos_token_id=100, eos_token_id=100
    )
    return GPT2LMHeadModel(cfg).eval()


def reproduce_script(name: str):
    """The script ``reproduce/<name>.py`` imported as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "reproduce" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
