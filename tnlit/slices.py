"""Cut a (teacher, student) pair into slices that train alone.

A :class:`Slice` is a run of consecutive modules, named the same in the teacher and the student (tensorize
keeps module names). Its input is the first positional argument of its first module, its output the output
of its last module; slice-wise distillation trains the student's modules to map the teacher's input to
the teacher's output.

Granularity:

- ``layer``: every tensorized module alone;
- ``block``: every block that holds a tensorized module, blocks found by a name pattern (presets below for
  ResNets and Hugging Face causal LMs, or any regex);
- ``group:k``: ``k`` consecutive blocks, for models whose blocks feed each other directly (ResNet stages).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tnlit.layers.base import TensorizedLayer

__all__ = ["BLOCK_PRESETS", "Slice", "SliceModule", "find_block_pattern", "make_slices"]

# Blocks by model family: a ResNet BasicBlock / Bottleneck, a transformer block's MLP.
BLOCK_PRESETS: dict[str, str] = {
    "resnet": r"layer\d+\.\d+",
    "gpt2": r"transformer\.h\.\d+\.mlp",
    "llama": r"model\.layers\.\d+\.mlp",
}


@dataclass(frozen=True)
class Slice:
    """Consecutive modules trained together: input of ``modules[0]`` -> output of ``modules[-1]``."""

    name: str
    modules: tuple[str, ...]

    @property
    def entry(self) -> str:
        return self.modules[0]

    @property
    def exit(self) -> str:
        return self.modules[-1]


class SliceModule(nn.Module):
    """A slice's modules of one model, applied in order (shares, does not copy, the model's modules)."""

    def __init__(self, model: nn.Module, slice_: Slice) -> None:
        super().__init__()
        self.parts = nn.ModuleList(model.get_submodule(name) for name in slice_.modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


def tensorized_names(student: nn.Module) -> list[str]:
    """Names of the student's tensorized modules, in model order."""
    return [name for name, m in student.named_modules() if isinstance(m, TensorizedLayer)]


def find_block_pattern(student: nn.Module) -> str:
    """The preset whose blocks hold the student's tensorized modules; an error naming the presets if none does."""
    names = tensorized_names(student)
    for pattern in BLOCK_PRESETS.values():
        blocks = _blocks(student, pattern)
        if blocks and all(any(_inside(n, b) for b in blocks) for n in names):
            return pattern
    raise ValueError(
        f"no block preset ({', '.join(f'{k}: {v}' for k, v in BLOCK_PRESETS.items())}) holds every tensorized "
        f"module ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); give block_pattern"
    )


def make_slices(student: nn.Module, granularity: str = "block", block_pattern: str | None = None) -> list[Slice]:
    """The slices of a tensorized student, in model order.

    Args:
        student: A model returned by ``tensorize``.
        granularity: ``layer``, ``block`` or ``group:k``.
        block_pattern: Regex (full match) naming the blocks; found from the presets when omitted.
    """
    names = tensorized_names(student)
    if not names:
        raise ValueError("the student has no tensorized module: tensorize it first")
    if granularity == "layer":
        return [Slice(n, (n,)) for n in names]
    k = 1
    if granularity.startswith("group:"):
        try:
            k = int(granularity.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"granularity {granularity!r}: group size must be a positive integer, as in 'group:2'")
    elif granularity != "block":
        raise ValueError(f"granularity must be 'layer', 'block' or 'group:k', got {granularity!r}")
    pattern = block_pattern or find_block_pattern(student)
    blocks = _blocks(student, pattern)
    outside = [n for n in names if not any(_inside(n, b) for b in blocks)]
    if not blocks or outside:
        missed = ", ".join(outside[:3]) or names[0]
        raise ValueError(f"block pattern {pattern!r} leaves tensorized modules outside every block: {missed}")
    # Groups are cut from all blocks, so that a group never skips a block that holds nothing to train.
    groups = [tuple(blocks[i : i + k]) for i in range(0, len(blocks), k)]
    groups = [g for g in groups if any(_inside(n, b) for n in names for b in g)]
    return [Slice(g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}", g) for g in groups]


def _blocks(model: nn.Module, pattern: str) -> list[str]:
    return [name for name, _ in model.named_modules() if name and re.fullmatch(pattern, name)]


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")
