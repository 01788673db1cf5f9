"""The way out of tnlit: load a student anywhere, export it to Hugging Face, or merge it back into dense layers.

- :func:`load_student` builds the student from the architecture alone (the teacher's config or model name, and the
  compression report's factor shapes) and loads the saved factors: no teacher weights, no decomposition.
- :func:`export_student` writes a directory: for a Hugging Face causal LM, one that
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads with the tensorized layers (its
  ``config.json`` names the modeling code written beside it, ``auto_map``), with the tokenizer, the plan and the
  report; for other models (torchvision, built-ins), one that :func:`load_student` loads. ``dense=True`` writes the
  merged dense weights as a plain model of the teacher's class (no custom code, no memory saving).
- :func:`merge_dense` replaces every tensorized layer by the dense layer its factors represent.

An export directory::

    config.json            the teacher's config, model_type "tnlit", auto_map, and the tensorized layers' shapes
    modeling_tnlit.py      TnlitConfig / TnlitForCausalLM: the teacher's classes with tnlit's layers in place
    model.safetensors      the student's weights (the factors)
    tokenizer files        when the teacher had a tokenizer (a Hugging Face directory or name)
    tnlit_export.json      what load_student reads: the kind, the teacher, the layers
    tnlit_plan.json, report.json   the plan and the compression report of the run
    README.md              a model card: what it is, how to load it
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model
from torch import nn

from tnlit.atomic import atomic_text
from tnlit.checksums import verified_problem
from tnlit.layers.base import TensorizedLayer
from tnlit.layers.conv import TuckerConv2d
from tnlit.layers.linear import FactorizedLinear, LowRankLinear
from tnlit.models import load_model
from tnlit.pipeline.run_dir import RunDirError, read_json, read_run_config
from tnlit.tensorize.rebuild import layer_rows, tensorize_architecture

__all__ = [
    "EXPORT_FILE",
    "describe_layers",
    "export_student",
    "is_causal_lm",
    "load_student",
    "merge_dense",
    "save_architecture",
]

EXPORT_FILE = "tnlit_export.json"
TEACHER_CONFIG = "teacher_config.json"
"""Where a run directory keeps its Hugging Face teacher's config (so its student loads without the teacher)."""


# ------------------------------------------------------------------------------------------ describe, save


def describe_layers(model: nn.Module) -> list[dict[str, Any]]:
    """The rows (:data:`tnlit.tensorize.rebuild.LAYER_KEYS`) that rebuild the model's tensorized layers."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, TensorizedLayer):
            continue
        if isinstance(m, TuckerConv2d):
            fmt, kind, shape, sites, ranks = "tucker", "Conv2d", list(m.dense_shape()), "", list(m.ranks)
        elif isinstance(m, FactorizedLinear):
            kind, shape = ("Linear" if m.layout == "linear" else "Conv1D"), list(m.dense_shape())
            if isinstance(m, LowRankLinear):
                fmt, sites, ranks = "lowrank", "", [m.rank]
            else:
                fmt, ranks = "mpo", list(m.bond_dims)
                sites = f"{'x'.join(map(str, m.in_dims))} -> {'x'.join(map(str, m.out_dims))}"
        else:
            raise TypeError(f"{name}: no export for tensorized layer type {type(m).__name__}")
        rows.append(
            {"name": name, "format": fmt, "module_type": kind, "shape": shape, "site_dims": sites, "ranks": ranks}
        )
    return rows


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates (exported with its config and modeling code)."""
    return hasattr(model, "config") and hasattr(model, "generate") and hasattr(model.config, "to_json_file")


def save_architecture(model: nn.Module, run_dir: Path) -> None:
    """Keep a Hugging Face teacher's config in the run directory: the student then loads without the teacher."""
    if is_causal_lm(model):
        atomic_text(Path(run_dir) / TEACHER_CONFIG, model.config.to_json_string(use_diff=False))


# ------------------------------------------------------------------------------------------ load


def load_student(path: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """The student of a ``tnlit compress`` run directory or a ``tnlit export`` directory, in eval mode.

    Built from the architecture alone (the teacher's config or model name; the factor shapes from the compression
    report) and the saved weights: the teacher's weights are not read, nothing is decomposed.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: give a tnlit compress run directory or an export directory")
    if (path / EXPORT_FILE).is_file():
        model = _load_export(path)
    elif (path / "config.json").is_file() and (path / "report.json").is_file():
        model = _load_run(path)
    else:
        raise FileNotFoundError(
            f"{path} is neither a tnlit compress run directory (config.json, report.json, student.safetensors) nor a "
            f"tnlit export directory ({EXPORT_FILE})"
        )
    return model.to(device).eval() if device is not None else model.eval()


def _load_run(run_dir: Path) -> nn.Module:
    weights = run_dir / "student.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no student.safetensors: its run has not finished; rerun the same tnlit compress command "
            "to finish it (it resumes)"
        )
    if (problem := verified_problem(weights)) is not None:
        raise RunDirError(f"{weights} is {problem}: rerun the run's tnlit compress command to write it again")
    config = read_run_config(run_dir)
    rows = read_json(run_dir / "report.json", "rerun the run's tnlit compress command to write it again")["layers"]
    hf = run_dir / TEACHER_CONFIG
    model = (
        _from_hf_config(read_json(hf, "rerun the run's tnlit compress command"))
        if hf.is_file()
        else _architecture(config["teacher"])
    )
    return _filled(tensorize_architecture(model, rows), weights)


def _load_export(out: Path) -> nn.Module:
    info = json.loads((out / EXPORT_FILE).read_text())
    if info["kind"] == "hf":
        config = json.loads((out / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("tnlit_") and k != "auto_map"}
        config["model_type"] = info["base_model_type"]
        config["architectures"] = [info["base_class"]]
        model = _from_hf_config(config)
    else:
        model = _architecture(info["teacher"])
    return _filled(tensorize_architecture(model, info["layers"]), out / "model.safetensors")


def _architecture(teacher: str) -> nn.Module:
    """The teacher's architecture by name (built-in, torchvision), with random weights that are overwritten."""
    if not isinstance(teacher, str):
        raise ValueError(f"the run's teacher {teacher!r} is not a model name; load its student with the teacher")
    try:
        return load_model(teacher)
    except ValueError as err:
        raise FileNotFoundError(
            f"cannot rebuild the architecture of teacher {teacher!r} ({err}); a run directory written by this version "
            f"keeps a Hugging Face teacher's config in {TEACHER_CONFIG}"
        ) from err


def _from_hf_config(config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(cfg)


def _filled(model: nn.Module, weights: Path) -> nn.Module:
    try:
        load_safetensors(model, str(weights), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the student its report describes: {err}") from err
    return model


# ------------------------------------------------------------------------------------------ merge


@torch.no_grad()
def merge_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every tensorized layer replaced by the dense layer (nn.Linear, Hugging Face Conv1D,
    nn.Conv2d) whose weight is the layer's ``to_dense_weight()``: as fast and as large as the teacher."""
    merged = copy.deepcopy(model)
    for name, m in list(merged.named_modules()):
        if not isinstance(m, TensorizedLayer):
            continue
        w = m.to_dense_weight().detach().clone()
        if isinstance(m, TuckerConv2d):
            dense = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                bias=m.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
        elif m.layout == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(m.out_features, m.in_features).to(device=w.device, dtype=w.dtype)
        else:
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        dense.weight.copy_(w)
        if m.bias is not None:
            dense.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, dense)
    return merged


# ------------------------------------------------------------------------------------------ export


_MODELING = '''"""A {base_class} whose layers named in config.tnlit_layers are tnlit's tensorized layers (MPO, low rank,
Tucker). Written by tnlit export; needs the tnlit package (pip install tnlit) and trust_remote_code=True."""

from tnlit.inference import inference_mode
from tnlit.tensorize.rebuild import tensorize_architecture
from transformers import {base_config}, {base_class}


class TnlitConfig({base_config}):
    model_type = "tnlit"

    def __init__(self, tnlit_layers=None, tnlit_inference=None, tnlit_base_model_type=None, **kwargs):
        self.tnlit_layers = list(tnlit_layers or [])
        self.tnlit_inference = tnlit_inference
        self.tnlit_base_model_type = tnlit_base_model_type
        super().__init__(**kwargs)


class TnlitForCausalLM({base_class}):
    config_class = TnlitConfig

    def __init__(self, config):
        super().__init__(config)
        tensorize_architecture(self, config.tnlit_layers)
        if config.tnlit_inference is not None:  # the cheapest contraction per input shape (tnlit.inference)
            inference_mode(self, **config.tnlit_inference)
'''


def export_student(
    student: nn.Module | str | Path,
    out: str | Path,
    *,
    dense: bool = False,
    tokenizer: str | Path | None = None,
    inference: dict[str, Any] | None = None,
    overwrite: bool = False,
    source: Path | None = None,
    teacher: str | None = None,
) -> Path:
    """Write ``student`` (a model, or a run / export directory for :func:`load_student`) to the directory ``out``.

    Args:
        student: The student, or the directory it loads from (a run directory also gives the plan, the report and,
            for a Hugging Face teacher, the teacher's name to find its tokenizer).
        out: The directory to write (refused when it exists and is not empty, unless ``overwrite``).
        dense: Write the merged dense weights as a plain model of the teacher's class (loads anywhere; no saving).
        tokenizer: Where to take the tokenizer from (a Hugging Face directory or name); None: the run's teacher.
        inference: The options of :func:`tnlit.inference.inference_mode` the exported model starts with (Hugging
            Face export); None: ``{"cache": True}``.
        overwrite: Write into ``out`` even when it is not empty.
        source: The run directory ``student`` (a model) comes from, for its plan, report and teacher's tokenizer.
        teacher: The teacher's model name (built-in, torchvision) that rebuilds the architecture of a model that is not
            a Hugging Face causal LM; default: the run's.
    """
    if isinstance(student, (str, Path)):
        source, model = Path(student), load_student(student)
    else:
        model = student
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: give another --out, or overwrite")
    out.mkdir(parents=True, exist_ok=True)
    run_config = _run_config(source)
    if dense:
        model = merge_dense(model)
    if is_causal_lm(model):
        _write_hf(model, out, dense, {"cache": True} if inference is None else inference)
        _copy_tokenizer(tokenizer or run_config.get("teacher"), out)
    else:
        save_model(model, str(out / "model.safetensors"))
        name = teacher or run_config.get("teacher")
        if not isinstance(name, str):
            raise ValueError("exporting a model that is not a Hugging Face causal LM needs its teacher's model name")
        info = {"kind": "module", "teacher": name, "layers": describe_layers(model)}
        atomic_text(out / EXPORT_FILE, json.dumps(info, indent=2) + "\n")
    if source is not None:
        for name in ("report.json", "report.csv", "choices.csv"):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    if "plan" in run_config:
        atomic_text(out / "tnlit_plan.json", json.dumps(run_config["plan"], indent=2) + "\n")
    _model_card(model, out, dense)
    return out


def _run_config(source: Path | None) -> dict[str, Any]:
    if source is None:
        return {}
    for name in ("config.json", EXPORT_FILE):
        if (source / name).is_file():
            return json.loads((source / name).read_text())
    return {}


def _write_hf(model: nn.Module, out: Path, dense: bool, inference: dict[str, Any]) -> None:
    model.save_pretrained(out)
    if dense:
        return
    config = json.loads((out / "config.json").read_text())
    base_type, base_class = config["model_type"], type(model).__name__
    rows = describe_layers(model)
    config.update(
        model_type="tnlit",
        architectures=["TnlitForCausalLM"],
        tnlit_base_model_type=base_type,
        tnlit_layers=rows,
        tnlit_inference=inference,
        auto_map={
            "AutoConfig": "modeling_tnlit.TnlitConfig",
            "AutoModelForCausalLM": "modeling_tnlit.TnlitForCausalLM",
        },
    )
    atomic_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    code = _MODELING.format(base_class=base_class, base_config=type(model.config).__name__)
    atomic_text(out / "modeling_tnlit.py", code)
    info = {"kind": "hf", "base_model_type": base_type, "base_class": base_class, "layers": layer_rows(rows)}
    atomic_text(out / EXPORT_FILE, json.dumps(info, indent=2) + "\n")


def _copy_tokenizer(source: Any, out: Path) -> bool:
    if not isinstance(source, (str, Path)) or not str(source):
        return False
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
        return True
    except Exception:  # noqa: BLE001 - a built-in teacher has no tokenizer (byte-level models need none)
        return False


def _model_card(model: nn.Module, out: Path, dense: bool) -> None:
    params = sum(p.numel() for p in model.parameters())
    layers = sum(isinstance(m, TensorizedLayer) for m in model.modules())
    if dense:
        how = (
            "The tensorized layers are merged back into dense weights: this is a plain model of the teacher's "
            "class (no custom code), as large and as fast as the teacher."
        )
        load = "AutoModelForCausalLM.from_pretrained(path)" if is_causal_lm(model) else "tnlit.load_student(path)"
    else:
        how = f"{layers} layers are tensorized (tnlit's MPO / low-rank / Tucker layers)."
        load = (
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # needs pip install tnlit"
            if is_causal_lm(model)
            else "tnlit.load_student(path)"
        )
    text = (
        f"---\nlibrary_name: transformers\ntags: [tnlit, tensor-network, compressed]\n---\n\n# tnlit student\n\n"
        f"Compressed by tensorization with tnlit: {params:,} parameters. {how}\n\n```python\n{load}\n```\n\n"
        "The compression report is in report.json, the plan in tnlit_plan.json.\n"
    )
    atomic_text(out / "README.md", text)
