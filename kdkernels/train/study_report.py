"""What a study leaves in its folder: report.md, results.json and four figures.

report.md holds no timings and no dates: it is a function of the run files alone, so rerunning an
unchanged study (every run cached) writes it again byte for byte. Run times (wall and CPU) are in
results.json and the run files.

Intervals: a setting's gain over the CE baseline is computed per seed (the two runs of a seed share
the student initialisation and the batches), and its 95% interval is
``mean ± t(0.975, n − 1) · sd / √n`` over the n seeds. Two settings are "separated" when the same
interval of their per-seed difference excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import kdkernels
from kdkernels.train import loop, study
from kdkernels.train.study import StudyResults

REPORT = "report.md"
RESULTS = "results.json"
FIGURES = ("gain_heatmap.png", "methods.png", "kd_weight.png", "validation_curves.png")

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher series (error < 1e-5).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)
_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and 95% t-interval of n per-seed values (no interval for n = 1)."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @property
    def defined(self) -> bool:
        return self.n >= 2

    def contains_zero(self) -> bool:
        return not self.defined or self.low <= 0.0 <= self.high


def interval(values: Sequence[float]) -> Interval:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, 0.0, mean, mean, n)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    iv = interval(values)
    return f"{iv.mean:.{digits}f} ± {iv.std:.{digits}f}" if iv.defined else f"{iv.mean:.{digits}f}"


def gain_text(iv: Interval) -> str:
    return f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]" if iv.defined else f"{iv.mean:+.4f} [no interval]"


def _differences(a: Sequence[float], b: Sequence[float]) -> Interval:
    return interval([x - y for x, y in zip(a, b)])


def best_sentence(topic: str, options: Sequence[Tuple[str, List[float]]]) -> str:
    """One sentence on the option with the largest mean gain, claiming only what the intervals support.

    ``options``: (label, per-seed gains over the CE baseline), the seeds in the same order."""
    label, gains = max(options, key=lambda option: sum(option[1]) / len(option[1]))
    iv = interval(gains)
    if not iv.defined:
        return (f"**{topic}**: {label} has the largest gain, {iv.mean:+.4f} nats/token, but with one seed there "
                "is no interval, so no claim is made.")
    if iv.low > 0:
        versus_baseline = "its interval lies above 0, so it beats the CE baseline"
    elif iv.high < 0:
        versus_baseline = "its interval lies below 0, so even the best option is worse than the CE baseline"
    else:
        versus_baseline = "its interval contains 0, so it is not distinguishable from the CE baseline with these seeds"
    text = f"**{topic}**: {label} has the largest mean gain, {gain_text(iv)} nats/token; {versus_baseline}"
    others = [(other, other_gains) for other, other_gains in options if other != label]
    if others:
        tied = [other for other, other_gains in others if _differences(gains, other_gains).contains_zero()]
        if not tied:
            text += "; it is separated from every other option (paired-difference intervals exclude 0)"
        elif len(tied) == len(others):
            text += "; the seeds do not separate it from any other option (paired-difference intervals contain 0)"
        else:
            text += (f"; the seeds do not separate it from {_join(tied)} (paired-difference intervals contain 0), "
                     "but they do from the rest")
    return text + "."


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> List[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < right_from else "--:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# --- the pieces of the report, shared by the tables and the figures ----------------------------------

def student_label(results: StudyResults, index: int) -> str:
    """``2x128 (471k parameters, 24.9% of the teacher)``."""
    params = results.runs(results.protocol.students[index], study.CE_SPEC)[0]["student_parameters"]
    return f"{results.protocol.students[index].describe()} ({params / 1e3:.0f}k parameters, " \
           f"{100 * params / results.context.teacher_info.parameters:.1f}% of the teacher)"


def lambda_rows(results: StudyResults) -> List[Tuple[str, loop.LossSpec]]:
    protocol, best = results.protocol, results.best_temperature
    return [(f"λ={w:g}", study.kd_spec(protocol, best, w)) for w in protocol.kd_weights]


def feature_rows(results: StudyResults) -> List[Tuple[str, loop.LossSpec]]:
    protocol, best = results.protocol, results.best_temperature
    return [("output-only KD", study.kd_spec(protocol, best))] + [
        (f"KD + feature alignment ({kind})", study.kd_spec(protocol, best, feature_align=kind))
        for kind in protocol.features]


def method_rows(results: StudyResults) -> List[Tuple[str, loop.LossSpec, Optional[int]]]:
    return [(m.label, study.kd_spec(results.protocol, results.best_temperature, method=m), m.sparse_k)
            for m in results.methods]


def _setting_rows(results: StudyResults, rows) -> Tuple[List[List[str]], List[Tuple[str, List[float]]]]:
    """Table rows (label, val loss, gain, top-1 agreement) and the (label, gains) options of the findings."""
    student = results.protocol.students[results.protocol.main_student]
    table, options = [], []
    for label, spec, *sparse in rows:
        sparse_k = sparse[0] if sparse else None
        runs = results.runs(student, spec, sparse_k)
        gains = results.gains(student, spec, sparse_k)
        agreement = [run["top1_agreement"] for run in runs]
        table.append([label, mean_std([run["val_loss"] for run in runs]), gain_text(interval(gains)),
                      f"{100 * sum(agreement) / len(agreement):.1f}%"])
        options.append((label, gains))
    return table, options


def _command(protocol: "study.Protocol") -> str:
    if study.PROTOCOLS.get(protocol.name) == protocol:
        return f"`python -m kdkernels.train --study{'' if protocol.name == 'full' else ' ' + protocol.name}`"
    return f"`kdkernels.train.study.run_study` (protocol `{protocol.name}`)"


def report_text(results: StudyResults) -> str:
    protocol, context = results.protocol, results.context
    info, corpus, optim = context.teacher_info, context.corpus, protocol.optim
    n_seeds, best = len(protocol.seeds), results.best_temperature
    main = protocol.students[protocol.main_student]
    windows = int(context.eval_windows.shape[0])
    teacher_optim = protocol.teacher_optim
    out = [
        f"# Distillation study (`{protocol.name}` protocol)",
        "",
        f"Written by {_command(protocol)}. This file "
        "holds no timings, so rerunning the unchanged study (every run cached) rewrites it byte for byte; run "
        f"times are in `{RESULTS}`. kdkernels {kdkernels.__version__}, torch {torch.__version__}.",
        "",
        "## Protocol",
        "",
        f"- Corpus: `{corpus.name}`, {len(corpus.train):,} training / {len(corpus.validation):,} validation tokens "
        f"(vocabulary {corpus.vocab_size}), context {protocol.context} tokens.",
        f"- Teacher: {info.description}, {info.parameters:,} parameters, trained once on cross-entropy "
        f"({teacher_optim.steps} steps, batch {teacher_optim.batch_size}, peak lr {teacher_optim.lr:g}, seed "
        f"{protocol.teacher_seed}) and frozen; validation loss {info.val_loss:.4f} nats/token. All seeds share it.",
        "- Students (capacity = student parameters / teacher parameters): "
        + "; ".join(student_label(results, i) for i in range(len(protocol.students))) + ".",
        f"- Every student run: AdamW (betas 0.9, 0.95; weight decay {optim.weight_decay:g} on matrices), peak lr "
        f"{optim.lr:g}, {optim.warmup_steps} warm-up steps then cosine decay to {optim.min_lr_ratio:g}× the peak, "
        f"gradient clipping at {optim.grad_clip:g}, {optim.steps} steps of {optim.batch_size} windows; validation "
        f"loss every {optim.eval_every} steps on the same {windows} windows ({windows * protocol.context:,} tokens).",
        f"- Seeds {', '.join(str(s) for s in protocol.seeds)}: with seed s, every run starts from the student "
        "initialised by `torch.manual_seed(s)` and sees the same batches (drawn with seed s + 1), so runs of one "
        "seed differ only in their loss and each gain is paired by seed.",
        f"- KD loss: (1 − λ)·CE + λ·T²·D(p_T ‖ q_T) (DKD and CAKD: (1 − λ)·CE + λ·L with their own T²), "
        f"λ = {protocol.kd_weight:g} unless swept. The T grid uses forward KL; the λ, feature and method "
        f"comparisons use the main student {main.describe()} at the best T of the grid for it, T = {best:g} "
        "(largest mean gain).",
        f"- Feature alignment: the student's final normalised hidden state (width d_s, after its last LayerNorm) "
        f"is mapped by a learned linear projection d_s → d_t (trained with the student) onto the teacher's final "
        f"normalised hidden state, token by token; MSE or 1 − cosine, weight {protocol.feature_weight:g}, added to "
        "the KD loss.",
        f"- Reported: final validation loss (nats/token), mean ± standard deviation over {n_seeds} seeds; gain = "
        "baseline loss − run loss per seed (positive: distillation helped), mean [95% interval: mean ± "
        "t(0.975, n − 1)·sd/√n]. Two settings are separated when that interval of their per-seed difference "
        "excludes 0.",
        "",
    ]

    # Findings first, then the tables they come from.
    grid_options = []
    per_student = []
    cells_above = cells_below = 0
    for i, student in enumerate(protocol.students):
        options = [(f"T={t:g}", results.gains(student, study.kd_spec(protocol, t))) for t in protocol.temperatures]
        grid_options += [(f"{student.describe()} at {label}", gains) for label, gains in options]
        label, gains = max(options, key=lambda option: sum(option[1]) / len(option[1]))
        per_student.append(f"{student.describe()}: {label}, {gain_text(interval(gains))}")
        for _, gains in options:
            iv = interval(gains)
            cells_above += iv.defined and iv.low > 0
            cells_below += iv.defined and iv.high < 0
    lambda_table, lambda_options = _setting_rows(results, lambda_rows(results))
    feature_table, feature_options = _setting_rows(results, feature_rows(results))
    method_table, method_options = _setting_rows(results, method_rows(results))
    cells = len(grid_options)
    out += [
        "## Findings",
        "",
        "- " + best_sentence("Temperature × capacity", grid_options)
        + f" Best T per student: {'; '.join(per_student)}. The gain's interval lies above 0 in {cells_above} of "
          f"{cells} cells and below 0 in {cells_below}.",
        "- " + best_sentence(f"KD weight λ (forward KL, T={best:g}, {main.describe()})", lambda_options),
        "- " + best_sentence(f"Output-only KD vs feature alignment (T={best:g}, λ={protocol.kd_weight:g}, "
                             f"{main.describe()})", feature_options),
        "- " + best_sentence(f"Methods (T={best:g}, λ={protocol.kd_weight:g}, {main.describe()})", method_options),
        "",
        "## 1. CE baselines",
        "",
    ]
    out += _table(["student", "parameters", "% of teacher", "val loss (mean ± sd)"], [
        [protocol.students[i].describe(), f"{runs[0]['student_parameters']:,}",
         f"{100 * runs[0]['student_parameters'] / info.parameters:.1f}%", mean_std([r["val_loss"] for r in runs])]
        for i, runs in enumerate(results.runs(s, study.CE_SPEC) for s in protocol.students)])
    t_header = ["student"] + [f"T={t:g}" for t in protocol.temperatures]
    out += ["", "## 2. Temperature × capacity (forward KL, λ={:g})".format(protocol.kd_weight), "",
            "Gain over the CE baseline, nats/token, mean [95% interval]:", ""]
    out += _table(t_header, [[s.describe()] + [gain_text(interval(results.gains(s, study.kd_spec(protocol, t))))
                                               for t in protocol.temperatures] for s in protocol.students])
    out += ["", "Validation loss, nats/token, mean ± sd:", ""]
    out += _table(t_header, [[s.describe()] + [mean_std([r["val_loss"] for r in results.runs(
        s, study.kd_spec(protocol, t))]) for t in protocol.temperatures] for s in protocol.students])
    setting_header = ["setting", "val loss (mean ± sd)", "gain [95% interval]", "top-1 agreement with teacher"]
    for title, table in ((f"## 3. KD weight λ (forward KL, T={best:g}, {main.describe()})", lambda_table),
                         (f"## 4. Output-only KD vs feature alignment (T={best:g}, λ={protocol.kd_weight:g}, "
                          f"{main.describe()})", feature_table),
                         (f"## 5. Methods (T={best:g}, λ={protocol.kd_weight:g}, {main.describe()})", method_table)):
        out += ["", title, ""] + _table(setting_header, table)
    if study.SPARSE_METHOD.key in protocol.methods and study.SPARSE_METHOD not in results.methods:
        out += ["", "Sparse top-k KD did not run: this kdkernels has no sparse-teacher loss."]
    out += ["", "## Figures", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in FIGURES]
    return "\n".join(out) + "\n"


def results_json(results: StudyResults) -> dict:
    protocol = results.protocol
    keys = list(dict.fromkeys(study.phase_one(protocol) + study.phase_two(protocol, results.best_temperature)))
    runs = [dict(results.records[key], label=study.describe_run(key)) for key in keys]
    return {"protocol": dataclasses.asdict(protocol), "teacher": dataclasses.asdict(results.context.teacher_info),
            "corpus": results.context.corpus.name, "best_temperature": results.best_temperature,
            "methods": [m.key for m in results.methods], "runs": runs,
            "wall_time_s": sum(run["result"]["wall_time_s"] for run in runs),
            "cpu_time_s": sum(run["result"]["cpu_time_s"] for run in runs)}


def write_all(results: StudyResults, out_dir: str, figures: bool = True) -> List[str]:
    """Writes report.md, results.json and (with matplotlib) the four figures; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, REPORT)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(report_text(results))
    written.append(path)
    path = os.path.join(out_dir, RESULTS)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results_json(results), handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    written.append(path)
    if figures:
        from kdkernels.train import study_figures

        written += study_figures.plot_all(results, out_dir)
    return written
