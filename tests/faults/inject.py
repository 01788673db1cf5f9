"""Inject each fault of issue #15 into a tiny run (tiny-gpt2, made tokens, MPO at CR 0.5), run the same ``tnlit
compress`` command again, and write the table fault | outcome to ``results/faults.md`` (+ provenance).

    python tests/faults/inject.py [results]

Each command goes through the CLI as a user types it (``tnlit.cli.main``, in this process: exit status and the
message it prints); SIGTERM and the concurrent runs use child processes. About two minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tnlit.cli import main  # noqa: E402
from tnlit.models import load_model  # noqa: E402
from tnlit.provenance import write_provenance  # noqa: E402

CONFIG = """teacher: tiny-gpt2
task: causal_lm
method: hybrid
data:
  class_path: tnlit.data.synthetic.RandomTokensDataModule
  init_args: {{seq_len: {seq_len}, batch_size: {batch_size}}}
plan:
  rules:
  - {{pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)', format: mpo, cr: 0.5}}
slicewise: {{mode: stream, epochs: 1, lr: 0.01}}
finetune: {{epochs: {ft_epochs}, lr: 0.001}}
accelerator: cpu
progress: false
{extra}"""


def config(path: Path, seq_len: int = 16, batch_size: int = 8, ft_epochs: int = 1, extra: str = "") -> Path:
    path.write_text(CONFIG.format(seq_len=seq_len, batch_size=batch_size, ft_epochs=ft_epochs, extra=extra))
    return path


def tnlit(*argv: str) -> tuple[int, str]:
    """Exit status and the first line that tells what happened (error, or warning, or the metrics)."""
    err, out = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
    ):
        warnings.simplefilter("always")
        try:
            main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    ours = [
        str(w.message)
        for w in caught
        if "tnlit" in w.filename or "checksum" in str(w.message) or "lock" in str(w.message)
    ]
    errors = [line for line in err.getvalue().splitlines() if "error" in line or "tnlit:" in line]
    return code, (errors or ours or ["(no message)"])[0]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 30):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def student_equal(a: Path, b: Path) -> str:
    x, y = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    return "student bit-identical to the sound run's" if worst == 0 else f"student off by {worst:.3g}"


def child(cfg: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    code = "import sys; from tnlit.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, "compress", "--config", str(cfg), "--run_dir", str(run_dir)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def faults(tmp: Path) -> list[tuple[str, str]]:
    cfg = config(tmp / "run.yaml")
    sound = tmp / "sound"
    tnlit("compress", "--config", str(cfg), "--run_dir", str(sound))
    rows = []

    def again(name: str, fault, *argv: str, compare: bool = True) -> None:
        run_dir = tmp / name.replace(" ", "_").replace("/", "_")
        shutil.copytree(sound, run_dir)
        fault(run_dir)
        code, message = tnlit("compress", "--config", str(cfg), "--run_dir", str(run_dir), *argv)
        outcome = f"exit {code}: {message[:220]}"
        if compare and code == 0:
            outcome += f"; {student_equal(run_dir, sound)}"
        rows.append((name, outcome))

    for file in ("slices/transformer.h.0.mlp.safetensors", "global.safetensors", "student.safetensors"):
        again(f"flip 10 bytes of {file}", lambda d, f=file: flip(d / f))
    again(
        "state.json edited (metric changed)",
        lambda d: (d / "state.json").write_text(
            (d / "state.json").read_text().replace('"perplexity": ', '"perplexity": 1', 1)
        ),
    )
    again("state.json truncated", lambda d: (d / "state.json").write_text("{"))
    again("config.json truncated", lambda d: (d / "config.json").write_text("{"))
    again("run directory moved (copied elsewhere)", lambda d: None)
    again(
        "lock held by a live process",
        lambda d: (d / ".lock").write_text(
            json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "since": "earlier"})
        ),
    )
    again(
        "stale lock (dead PID)",
        lambda d: (d / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename})),
    )
    rows += teacher_faults(tmp)
    rows += bad_inputs(tmp)
    rows += class_path(tmp, sound)
    rows += [*sigterm(tmp), concurrent(tmp)]
    return rows


def teacher_faults(tmp: Path) -> list[tuple[str, str]]:
    weights = tmp / "teacher.safetensors"
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_model(load_model("tiny-gpt2"), str(tmp / f"teacher{seed}.safetensors"))
    shutil.copy(tmp / "teacher1.safetensors", weights)
    cfg = config(tmp / "teacher.yaml", extra=f"teacher_weights: {weights}\n")
    tnlit("compress", "--config", str(cfg), "--run_dir", str(tmp / "teacher_run"))
    shutil.copy(tmp / "teacher2.safetensors", weights)
    code, message = tnlit("compress", "--config", str(cfg), "--run_dir", str(tmp / "teacher_run"))
    rows = [("teacher weights replaced by another teacher at the same path", f"exit {code}: {message[:220]}")]
    code, message = tnlit(
        "compress", "--config", str(cfg), "--run_dir", str(tmp / "teacher_run"), "--overwrite", "true"
    )
    rows.append(
        (
            "... the same with --overwrite true",
            f"exit {code}: run started afresh" if code == 0 else f"exit {code}: {message[:200]}",
        )
    )
    nan = load_model("tiny-gpt2")
    with torch.no_grad():
        nan.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    save_model(nan, str(tmp / "nan.safetensors"))
    cfg = config(tmp / "nan.yaml", extra=f"teacher_weights: {tmp / 'nan.safetensors'}\n")
    code, message = tnlit("compress", "--config", str(cfg), "--run_dir", str(tmp / "nan_run"))
    rows.append(
        ("NaN in the teacher's weights", f"exit {code}: {message[:200]}; run_dir written: {(tmp / 'nan_run').exists()}")
    )
    return rows


def bad_inputs(tmp: Path) -> list[tuple[str, str]]:
    rows = []
    cases = {
        "seq_len 200 > the model's 128 positions": config(tmp / "a.yaml", seq_len=200),
        "data batch_size 0": config(tmp / "b.yaml", batch_size=0),
        "--slicewise.epochs -1": (config(tmp / "c.yaml"), "--slicewise.epochs", "-1"),
        "--finetune.epochs -1": (config(tmp / "d.yaml"), "--finetune.epochs", "-1"),
        "--finetune.batch_size 0": (config(tmp / "e.yaml"), "--finetune.batch_size", "0"),
    }
    for name, case in cases.items():
        cfg, *extra = case if isinstance(case, tuple) else (case,)
        run_dir = tmp / f"bad_{len(rows)}"
        code, message = tnlit("compress", "--config", str(cfg), "--run_dir", str(run_dir), *extra)
        rows.append((name, f"exit {code}: {message[:200]}; run_dir written: {run_dir.exists()}"))
    return rows


def class_path(tmp: Path, sound: Path) -> list[tuple[str, str]]:
    run_dir = tmp / "evil"
    shutil.copytree(sound, run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["data"] = {"class_path": "os.system", "init_args": {"command": f"touch {tmp / 'pwned'}"}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    code, message = tnlit(
        "inspect", "--run_dir", str(run_dir), "--out_dir", str(tmp / "out"), "--layer", "transformer.h.0.mlp.c_fc"
    )
    return [
        (
            "inspect a run dir whose config names data class_path os.system",
            f"exit {code}: {message[:200]}; command ran: {(tmp / 'pwned').exists()}",
        )
    ]


def sigterm(tmp: Path) -> list[tuple[str, str]]:
    """SIGTERM in the global phase, then: the rerun resumes to the uninterrupted run's student; with the epoch
    checkpoint flipped, the phase starts again, to the same student."""
    cfg = config(tmp / "long.yaml", ft_epochs=40)
    run_dir, log = tmp / "sigterm", tmp / "sigterm.log"
    proc = child(cfg, run_dir, log)
    deadline = time.monotonic() + 300
    while not (run_dir / "ckpt" / "global" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    state = json.loads((run_dir / "state.json").read_text())
    said = [line for line in log.read_text().splitlines() if "stopped on" in line]
    rows = [
        (
            "kill -TERM during global finetuning",
            f"exit {code}; done in state.json: {bool(state.get('done'))}; {said[0][:200] if said else 'no message'}",
        )
    ]
    shutil.copytree(run_dir, tmp / "sigterm_flipped")
    tnlit("compress", "--config", str(cfg), "--run_dir", str(tmp / "uninterrupted"))
    code, _ = tnlit("compress", "--config", str(cfg), "--run_dir", str(run_dir))
    rows.append(
        (
            "... then the same command again",
            f"exit {code}; {student_equal(run_dir, tmp / 'uninterrupted')} of an uninterrupted run",
        )
    )
    flip(tmp / "sigterm_flipped" / "ckpt" / "global" / "last.ckpt")
    code, message = tnlit("compress", "--config", str(cfg), "--run_dir", str(tmp / "sigterm_flipped"))
    rows.append(
        (
            "flip 10 bytes of ckpt/global/last.ckpt of that stopped run, then rerun",
            f"exit {code}: "
            f"{message[:200]}; {student_equal(tmp / 'sigterm_flipped', tmp / 'uninterrupted')} of an "
            "uninterrupted run",
        )
    )
    return rows


def concurrent(tmp: Path) -> tuple[str, str]:
    cfg = config(tmp / "twice.yaml", ft_epochs=100_000)
    run_dir = tmp / "twice"
    first = child(cfg, run_dir, tmp / "first.log")
    while not (run_dir / ".lock").exists() and first.poll() is None:
        time.sleep(0.01)
    second = child(cfg, run_dir, tmp / "second.log")
    code = second.wait(timeout=300)
    running = first.poll() is None
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    said = [line for line in (tmp / "second.log").read_text().splitlines() if "in use by" in line]
    return (
        "two identical tnlit compress on one run_dir",
        f"second exit {code}: {said[0][:200] if said else '?'}; the first still running then: {running}",
    )


def write(rows: list[tuple[str, str]], results: Path) -> None:
    lines = [
        "# Faults injected into a run directory (issue #15)",
        "",
        "Written by `python tests/faults/inject.py`: each fault on a tiny run (tiny-gpt2, made tokens, MPO at CR "
        "0.5, hybrid), then the same `tnlit compress` command again.",
        "",
        "| fault | outcome |",
        "|---|---|",
    ]
    lines += [f"| {fault} | {outcome.replace('|', '/')} |" for fault, outcome in rows]
    lines = [re.sub(r"/tmp/tmp[\w]+/", "<tmp>/", line) for line in lines]
    results.mkdir(parents=True, exist_ok=True)
    (results / "faults.md").write_text("\n".join(lines) + "\n")
    write_provenance(
        results / "faults.provenance.json",
        {"script": "tests/faults/inject.py", "rows": [{"fault": f, "outcome": o} for f, o in rows]},
    )


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = faults(Path(tmp))
    write(rows, Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results")
    print((ROOT / "results" / "faults.md").read_text() if len(sys.argv) == 1 else "")
