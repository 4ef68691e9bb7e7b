"""The study's four figures (matplotlib, PNG): the gain heatmap over T × capacity, the methods with
their intervals, the λ curve, and the validation curves."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from kdkernels.train import study
from kdkernels.train.study import StudyResults
from kdkernels.train.study_report import FIGURES, feature_rows, interval, lambda_rows, method_rows, student_label

GAIN_LABEL = "gain over the CE baseline (nats/token)"
# Interval above 0, containing 0, below 0.
HELPS, UNSURE, HURTS = "#2b8a3e", "#868e96", "#c92a2a"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seeds_note(results: StudyResults) -> str:
    n = len(results.protocol.seeds)
    return f"{n} seed{'s' if n != 1 else ''}"


def _save(figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    figure.clf()
    return path


def gain_heatmap(results: StudyResults, path: str) -> str:
    plt = _pyplot()
    protocol = results.protocol
    temperatures = protocol.temperatures
    grid = [[interval(results.gains(student, study.kd_spec(protocol, t))) for t in temperatures]
            for student in protocol.students]
    means = [[cell.mean for cell in row] for row in grid]
    limit = max(abs(value) for row in means for value in row) or 1.0
    figure, axes = plt.subplots(figsize=(5.0 + 1.2 * len(temperatures), 2.2 + 0.9 * len(protocol.students)))
    image = axes.imshow(means, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            text = f"{cell.mean:+.3f}" + (f"\n±{cell.high - cell.mean:.3f}" if cell.defined else "")
            axes.text(j, i, text, ha="center", va="center", fontsize=9,
                      color="white" if abs(cell.mean) > 0.6 * limit else "black")
    axes.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    axes.set_yticks(range(len(protocol.students)),
                    [student_label(results, i).replace(" (", "\n(").replace(", ", ",\n")
                     for i in range(len(protocol.students))], fontsize=8)
    axes.set_xlabel("temperature T (dimensionless)")
    axes.set_ylabel("student (parameters, share of the teacher's)")
    axes.set_title(f"KD gain over the CE baseline (forward KL, λ={protocol.kd_weight:g}): mean ± 95% interval "
                   f"half-width,\n{_seeds_note(results)}; blue: KD better than the baseline, red: worse", fontsize=10)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(GAIN_LABEL, fontsize=9)
    return _save(figure, path)


def _interval_colour(cell) -> str:
    if cell.defined and cell.low > 0:
        return HELPS
    if cell.defined and cell.high < 0:
        return HURTS
    return UNSURE


def _error_bars(cells) -> List[List[float]]:
    """matplotlib's asymmetric error bars: distances from each mean down to low and up to high."""
    return [[c.mean - c.low for c in cells], [c.high - c.mean for c in cells]]


def _interval_legend(axes, extra: Sequence = ()) -> None:
    from matplotlib.patches import Patch

    handles = list(extra) + [Patch(color=HELPS, label="95% interval above 0"),
                             Patch(color=UNSURE, label="interval contains 0"),
                             Patch(color=HURTS, label="interval below 0")]
    axes.legend(handles=handles, fontsize=8, loc="best")


def methods_chart(results: StudyResults, path: str) -> str:
    plt = _pyplot()
    student = results.protocol.students[results.protocol.main_student]
    rows = method_rows(results) + [(label, spec, None) for label, spec in feature_rows(results)[1:]]
    cells = [interval(results.gains(student, spec, sparse_k)) for _, spec, sparse_k in rows]
    figure, axes = plt.subplots(figsize=(8, 1.4 + 0.42 * len(rows)))
    positions = list(range(len(rows)))[::-1]  # first method on top
    axes.barh(positions, [c.mean for c in cells], color=[_interval_colour(c) for c in cells], height=0.6)
    axes.errorbar([c.mean for c in cells], positions, xerr=_error_bars(cells), fmt="none", ecolor="black", capsize=4,
                  label="95% interval (t, paired by seed)")
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_yticks(positions, [label for label, *_ in rows], fontsize=9)
    axes.set_xlabel(GAIN_LABEL + ", mean over " + _seeds_note(results))
    axes.set_title(f"KD methods and feature alignment under one protocol: {student.describe()}, "
                   f"T={results.best_temperature:g}, λ={results.protocol.kd_weight:g}", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    handles, _ = axes.get_legend_handles_labels()
    _interval_legend(axes, handles)
    return _save(figure, path)


def kd_weight_curve(results: StudyResults, path: str) -> str:
    plt = _pyplot()
    student = results.protocol.students[results.protocol.main_student]
    weights = results.protocol.kd_weights
    cells = [interval(results.gains(student, spec)) for _, spec in lambda_rows(results)]
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    axes.errorbar(weights, [c.mean for c in cells], yerr=_error_bars(cells), marker="o", capsize=4,
                  label=f"KD, forward KL, T={results.best_temperature:g} (mean, 95% interval)")
    axes.axhline(0.0, color="black", linestyle="--", linewidth=1, label="CE baseline (λ = 0)")
    axes.set_xlabel("KD weight λ (share of the loss on the teacher term)")
    axes.set_ylabel(GAIN_LABEL)
    axes.set_xticks(weights)
    axes.set_title(f"KD weight λ: {student.describe()}, {_seeds_note(results)}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _mean_curve(runs: Sequence[dict]):
    steps = [step for step, _ in runs[0]["curve"]]
    columns = list(zip(*[[loss for _, loss in run["curve"]] for run in runs]))
    return steps, [interval(column) for column in columns]


def _plot_mean_curve(axes, runs: Sequence[dict], label: str, style: str = "-", colour: Optional[str] = None) -> None:
    steps, cells = _mean_curve(runs)
    line, = axes.plot(steps, [c.mean for c in cells], style, color=colour, label=label, linewidth=1.4)
    if cells[0].defined:
        axes.fill_between(steps, [c.mean - c.std for c in cells], [c.mean + c.std for c in cells],
                          color=line.get_color(), alpha=0.15, linewidth=0)


def validation_curves(results: StudyResults, path: str) -> str:
    plt = _pyplot()
    protocol = results.protocol
    teacher_loss = results.context.teacher_info.val_loss
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, student in enumerate(protocol.students):
        colour = colours[i % len(colours)]
        best_t = max(protocol.temperatures, key=lambda t: sum(results.gains(student, study.kd_spec(protocol, t))))
        _plot_mean_curve(left, results.runs(student, study.CE_SPEC), f"{student.describe()} CE baseline", "--",
                         colour)
        _plot_mean_curve(left, results.runs(student, study.kd_spec(protocol, best_t)),
                         f"{student.describe()} KD, T={best_t:g}", "-", colour)
    left.set_title("Each student: CE baseline and KD at its best T", fontsize=10)
    main = protocol.students[protocol.main_student]
    _plot_mean_curve(right, results.runs(main, study.CE_SPEC), "CE baseline", "--", "black")
    for label, spec in feature_rows(results):
        _plot_mean_curve(right, results.runs(main, spec), label)
    output_only = feature_rows(results)[0][1]
    others = [row for row in method_rows(results) if row[1:] != (output_only, None)]
    if others:
        label, spec, sparse_k = max(others, key=lambda row: sum(results.gains(main, row[1], row[2])))
        _plot_mean_curve(right, results.runs(main, spec, sparse_k), f"{label} (best other method)")
    right.set_title(f"{main.describe()} at T={results.best_temperature:g}, λ={protocol.kd_weight:g}", fontsize=10)
    for axes in (left, right):
        axes.axhline(teacher_loss, color="grey", linestyle=":", label="teacher")
        axes.set_xlabel("student step (batches of %d windows)" % protocol.optim.batch_size)
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.legend(fontsize=7)
    left.set_ylabel("validation loss (nats/token)")
    figure.suptitle(f"Validation loss during training: mean over {_seeds_note(results)}, band ± 1 sd", fontsize=11)
    return _save(figure, path)


def plot_all(results: StudyResults, out_dir: str) -> List[str]:
    """The four figures in ``out_dir``; none (an empty list) without matplotlib."""
    try:
        plt = _pyplot()
    except ImportError:
        return []
    paths = []
    for name, draw in zip(FIGURES, (gain_heatmap, methods_chart, kd_weight_curve, validation_curves)):
        paths.append(draw(results, os.path.join(out_dir, name)))
        plt.close("all")
    return paths
