"""Training curves of a run, drawn from its JSONL metric log (`vleraser plot RUN_DIR`).

The trainer writes one JSON object per logged step: `step`, `lr`, `examples_per_s`, `loss`, `grad_norm`
and the loss function's own metrics (VL-Eraser's `distill` / `ce`, the baselines' `forget_nll`, `kl`, ...).
A method run keeps it as `<run dir>/train.jsonl`, a training stage as `<stage dir>.train.jsonl` beside
its model.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ..io import write_bytes_atomic
from ..unlearn.trainer import LOG_NAME
from .report import ReportError

PANELS = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "examples_per_s": "throughput (examples / s; the first includes compiling)"}


def find_train_log(run) -> Path:
    """The metric log of `run`: a JSONL file itself, a method run directory, or a stage's model directory."""
    run = Path(run)
    candidates = [run] if run.is_file() else [run / LOG_NAME, run.with_name(f"{run.name}.{LOG_NAME}")]
    for path in candidates:
        if path.is_file():
            return path
    raise ReportError(f"{run}: no training log (looked for {' and '.join(str(p) for p in candidates)})")


def read_train_log(path) -> list[dict]:
    """The logged steps of `path`, in order. A step number that goes back (a resumed or restarted run appends
    to the same file) supersedes the records from that step on. A last line cut short (a killed writer) is
    dropped; any other unreadable line is an error naming the file and line."""
    path = Path(path)
    lines = path.read_text().split("\n")
    records: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if number == len(lines):  # no newline after it: a write cut short
                break
            raise ReportError(f"{path}:{number}: not a metric record ({type(e).__name__}: {e})") from None
        records = [r for r in records if r["step"] < step] + [{**record, "step": step}]
    if not records:
        raise ReportError(f"{path}: holds no logged step")
    return records


def plot_training_curves(log_path, out=None, title: str | None = None) -> Path:
    """Draw loss, learning rate, gradient norm, throughput and every other logged metric against the step, one
    panel each, to `out` (default: the log's name with .png). Written atomically; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    log_path = Path(log_path)
    records = read_train_log(log_path)
    extra = sorted({k for r in records for k in r} - set(PANELS) - {"step"})
    names = [k for k in PANELS if any(k in r for r in records)] + extra
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 7.0), 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, marker="." if len(points) < 30 else None, lw=1.2)
        ax.set_title(PANELS.get(name, name), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or f"{log_path.parent.name}/{log_path.name}: {len(records)} logged steps", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = Path(out) if out is not None else log_path.with_suffix(".png")
    return write_bytes_atomic(out, buf.getvalue())
