"""``tnlit export``: a finished run's student as a directory that loads outside tnlit (Hugging Face
``from_pretrained`` with ``trust_remote_code``, or a plain dense model), or through :func:`tnlit.load_student`."""

from __future__ import annotations

from pathlib import Path

from tnlit.export import export_student, is_causal_lm, load_student

__all__ = ["export"]


def export(
    run_dir: Path,
    out: Path,
    dense: bool = False,
    tokenizer: str | None = None,
    cache: bool = True,
    max_cache_mb: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a compressed model: a directory for AutoModelForCausalLM.from_pretrained, the Hub, or load_student.

    Args:
        run_dir: A finished ``tnlit compress`` run directory (or an export directory, to export again).
        out: The directory to write (``push_to_hub``-ready for a causal LM).
        dense: Merge the factors back into dense weights and write a plain model of the teacher's class: loads
            anywhere without custom code, but is as large as the teacher (no memory saving).
        tokenizer: A Hugging Face directory or name to take the tokenizer from; default: the run's teacher.
        cache: Let the exported model cache a layer's rebuilt dense weight where that is the cheapest way to run it
            (tnlit.inference_mode); off: factors only, the least memory.
        max_cache_mb: At most this many MB of such cached weights (default: no limit).
        overwrite: Write into ``out`` even when it is not empty.
    """
    student = load_student(run_dir)
    inference = {"cache": cache, "max_cache_bytes": None if max_cache_mb is None else max_cache_mb * 2**20}
    export_student(
        student, out, dense=dense, tokenizer=tokenizer, inference=inference, overwrite=overwrite, source=Path(run_dir)
    )
    params = sum(p.numel() for p in student.parameters())
    files = sum(f.stat().st_size for f in Path(out).rglob("*.safetensors"))
    print(f"exported {run_dir} -> {out}: {params:,} parameters in the student, {files / 2**20:.1f} MB of weights")
    if dense:
        print("dense merge: a plain model of the teacher's class, no custom code, no memory saving (teacher's size)")
    if is_causal_lm(student):
        remote = "" if dense else ", trust_remote_code=True"
        print(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
        if not (Path(out) / "tokenizer_config.json").is_file():
            print("no tokenizer was found for the teacher (give --tokenizer DIR to add one)")
    else:
        print(f"load it: tnlit.load_student({str(out)!r})")
    return Path(out)
