"""Teacher activations at slice boundaries: forward hooks that record each slice's entry input and exit output.

One teacher forward records every slice's pair, and stops as soon as the last slice's output is recorded
(the rest of the network, a classifier or an LM head, is never run for distillation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tnlit.slices import Slice

__all__ = ["StopForward", "batch_input", "capture", "capture_student"]


class StopForward(Exception):
    """Raised from a hook to end a forward once every needed activation is recorded."""


def batch_input(batch: Any) -> torch.Tensor:
    """The model input of a batch: ``(x, y)`` -> x, ``{"input_ids": ...}`` -> input ids, a tensor -> itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}")


def _forward_to_last_exit(
    model: nn.Module, x: torch.Tensor, slices: Sequence[Slice], on_entry: Callable[[str, tuple], tuple | None]
) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` with ``on_entry(slice name, args)`` at every slice entry (it may return new args);
    record each slice's exit output and stop the forward once all are recorded."""
    exits: dict[str, torch.Tensor] = {}

    def entry_hook(name: str):
        return lambda _module, args: on_entry(name, args)

    def exit_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            exits[name] = output if isinstance(output, torch.Tensor) else output[0]
            if len(exits) == len(slices):
                raise StopForward

        return hook

    by_entry = {s.entry: s.name for s in slices}
    by_exit = {s.exit: s.name for s in slices}
    handles = []
    for module_name, module in model.named_modules():
        if module_name in by_entry:
            handles.append(module.register_forward_pre_hook(entry_hook(by_entry[module_name])))
        if module_name in by_exit:
            handles.append(module.register_forward_hook(exit_hook(by_exit[module_name])))
    try:
        model(x)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in slices if s.name not in exits]
    if missing:
        raise RuntimeError(f"the forward never reached slice(s) {', '.join(missing)}: are they used by the model?")
    return exits


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, slices: Sequence[Slice]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(x)`` and return ``{slice name: (entry input, exit output)}``, stopping after the last exit."""
    entries: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple) -> None:
        entries[name] = args[0]

    exits = _forward_to_last_exit(model, x, slices, record)
    return {s.name: (entries[s.name], exits[s.name]) for s in slices}


def capture_student(
    model: nn.Module,
    x: torch.Tensor,
    slices: Sequence[Slice],
    teacher_inputs: dict[str, torch.Tensor] | None = None,
    student_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Run the student with gradients, cut at every slice entry, and return each slice's exit output.

    The input of each slice is the (detached) output of the student's earlier slices: each slice learns
    to work on what the distilled network before it produces, while gradients stay inside the slice. With
    ``teacher_inputs`` (each slice's entry input in the teacher), a slice's input is the blend
    ``w * student + (1 - w) * teacher`` with ``w = student_weight``: a curriculum from the paper's teacher inputs
    (w = 0) to the student's own (w = 1).
    """

    def cut(name: str, args: tuple) -> tuple:
        x_in = args[0].detach()
        if teacher_inputs is not None and student_weight < 1.0:
            x_in = torch.lerp(teacher_inputs[name].to(x_in.dtype), x_in, student_weight)
        return (x_in, *args[1:])

    return _forward_to_last_exit(model, x, slices, cut)
