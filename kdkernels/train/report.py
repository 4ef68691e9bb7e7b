"""What a trainer run leaves behind: the printed table, results.json and the validation-curve PNG."""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence

COLUMNS = (
    # (header, key in a run's record, format)
    ("run", "name", "{}"),
    ("student", "student", "{}"),
    ("loss", "objective", "{}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("ppl", "perplexity", "{:.3f}"),
    ("top-1 agree", "top1_agreement", "{:.1%}"),
    ("time s", "wall_time_s", "{:.1f}"),
    ("peak MiB", "peak_rss_mib", "{:.1f}"),
)


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(runs: Sequence[dict], title: Optional[str] = None) -> str:
    """A plain-text table, one row per run, aligned for a terminal or a README code block."""
    rows = [[header for header, _, _ in COLUMNS]]
    rows += [[_cell(run, key, fmt) for _, key, fmt in COLUMNS] for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    # Text columns align left, numbers right.
    left = {0, 1, 2}

    def line(row: List[str]) -> str:
        cells = zip(row, widths)
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    out = [] if title is None else [title]
    out += [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows[1:]]
    return "\n".join(out)


def verdict(runs: Sequence[dict]) -> str:
    """One line per distilled run of the baseline's student: its validation loss against the baseline's."""
    baseline = next((run for run in runs if run["name"] == "baseline"), None)
    if baseline is None:
        return ""
    lines = []
    for run in runs:
        if run["kind"] == "ce" or run["student"] != baseline["student"]:
            continue
        gain = baseline["val_loss"] - run["val_loss"]
        lines.append(f"{run['name']}: validation loss {run['val_loss']:.4f} vs baseline {baseline['val_loss']:.4f}, "
                     f"{abs(gain):.4f} nats/token {'lower' if gain > 0 else 'HIGHER'} "
                     f"(perplexity {run['perplexity']:.3f} vs {baseline['perplexity']:.3f})")
    return "\n".join(lines)


def write_json(path: str, runs: Sequence[dict], **extra) -> None:
    with open(path, "w") as handle:
        json.dump({**extra, "runs": list(runs)}, handle, indent=2)
        handle.write("\n")


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure, path: str, dpi: int = 120) -> str:
    """Writes ``figure`` to ``path`` (its folder created), closes it, returns ``path``."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def plot_curves(path: str, runs: Sequence[dict], teacher_val_loss: Optional[float] = None,
                title: str = "Validation loss") -> Optional[str]:
    """Writes the runs' validation curves to ``path`` (PNG); returns None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps = [step for step, _ in run["curve"]]
        losses = [loss for _, loss in run["curve"]]
        style = "--" if run["kind"] == "ce" else "-"
        axes.plot(steps, losses, style, marker="o", markersize=3, label=run["name"])
    if teacher_val_loss is not None and math.isfinite(teacher_val_loss):
        axes.axhline(teacher_val_loss, color="black", linestyle=":", label="teacher")
    axes.set_xlabel("student step")
    axes.set_ylabel("validation loss (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)
