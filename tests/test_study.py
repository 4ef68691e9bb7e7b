"""The distillation study (kdkernels.train.study) on a miniature protocol: its outputs, its cache,
resumption, determinism across processes, and the interval arithmetic behind its sentences."""

import dataclasses
import json
import math
import os
import shutil

import pytest

from kdkernels.train import loop, models, study, study_report
from kdkernels.train.__main__ import main

CONTEXT = 16
MINIATURE = study.Protocol(
    name="miniature",
    teacher=models.transformer_shape(1, 32, context=CONTEXT),
    teacher_optim=loop.OptimSettings(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=15),
    students=(models.transformer_shape(1, 8, context=CONTEXT), models.transformer_shape(1, 16, context=CONTEXT)),
    main_student=1,
    optim=loop.OptimSettings(steps=4, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=2),
    seeds=(0, 1),
    temperatures=(1.0, 4.0),
    eval_windows=4,
    max_bytes=20_000,
)


def _run(out_dir, teacher_dir, **options):
    lines = []
    results = study.run_study(MINIATURE, str(out_dir), teacher_dir=str(teacher_dir), progress=False,
                              log=lines.append, **options)
    return results, lines


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _numbers(results):
    """Every run's final loss, agreement and curve, by run (what must not depend on how it ran)."""
    return {study.describe_run(key): (rec["result"]["val_loss"], rec["result"]["top1_agreement"],
                                      rec["result"]["curve"]) for key, rec in results.records.items()}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    results, lines = _run(out, teacher_dir)
    return out, results, lines


def expected_run_count(results):
    protocol = MINIATURE
    methods = len(study.active_methods(protocol))
    per_seed = (len(protocol.students) * (1 + len(protocol.temperatures))  # baselines and the T grid
                + len(protocol.kd_weights) - 1 + len(protocol.features) + methods - 1)  # λ=0.5 / forward KL: shared
    return per_seed * len(protocol.seeds)


def test_miniature_study_writes_report_results_and_four_figures(uninterrupted):
    out, results, _ = uninterrupted
    assert results.best_temperature in MINIATURE.temperatures
    report = _read(out / "report.md")
    for section in ("## Protocol", "## Findings", "## 1. CE baselines", "## 2. Temperature × capacity",
                    "## 3. KD weight λ", "## 4. Output-only KD vs feature alignment", "## 5. Methods"):
        assert section in report
    for method in study.active_methods(MINIATURE):
        assert method.label in report
    assert report.count("**") == 8  # one bold-led sentence per question
    saved = json.loads(_read(out / "results.json"))
    assert len(saved["runs"]) == expected_run_count(results) == len(os.listdir(out / "runs"))
    for run in saved["runs"]:
        assert run["config"]["seed"] in MINIATURE.seeds and run["config"]["loss"]["kind"] in loop.LOSS_KINDS
        assert run["result"]["curve"][-1] == [MINIATURE.optim.steps, run["result"]["val_loss"]]
        assert run["result"]["cpu_time_s"] > 0
    for name in study_report.FIGURES:
        assert (out / name).stat().st_size > 10_000, name
        assert f"]({name})" in report


def test_rerunning_an_unchanged_study_trains_nothing_and_rewrites_the_same_report(uninterrupted, teacher_dir):
    out, results, _ = uninterrupted
    before = _read(out / "report.md")
    again, lines = _run(out, teacher_dir, figures=False)
    assert not any("to train" in line for line in lines)
    assert _read(out / "report.md") == before
    assert _numbers(again) == _numbers(results)


def test_same_seeds_give_identical_numbers_in_two_worker_processes(uninterrupted, tmp_path, teacher_dir):
    out, results, _ = uninterrupted
    parallel, lines = _run(tmp_path, teacher_dir, jobs=2, figures=False)
    assert any("2 processes" in line for line in lines)
    assert _numbers(parallel) == _numbers(results)
    assert _read(tmp_path / "report.md") == _read(out / "report.md")


def test_killed_and_resumed_study_gives_the_uninterrupted_report(uninterrupted, tmp_path, teacher_dir):
    out, results, _ = uninterrupted
    assert _run(tmp_path, teacher_dir, stop_after=5)[0] is None  # killed in the T grid
    assert not (tmp_path / "report.md").exists() and len(os.listdir(tmp_path / "runs")) == 5
    assert _run(tmp_path, teacher_dir, stop_after=10)[0] is None  # killed after the best T was chosen
    assert len(os.listdir(tmp_path / "runs")) == 15
    # A run file that is not a finished run (here: cut short) is trained again; a killed write's
    # temporary file is removed.
    broken = sorted(os.listdir(tmp_path / "runs"))[0]
    with open(tmp_path / "runs" / broken, "r+") as handle:
        handle.truncate(20)
    (tmp_path / "runs" / f"{broken}.123.tmp").write_text("{")
    resumed, lines = _run(tmp_path, teacher_dir, figures=False)
    trained = sum(int(line.split()[0]) for line in lines if "to train" in line)
    assert trained == expected_run_count(results) - 14
    assert _numbers(resumed) == _numbers(results)
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(os.listdir(out / "runs"))
    assert _read(tmp_path / "report.md") == _read(out / "report.md")


def test_sparse_method_runs_only_where_the_sparse_loss_exists(uninterrupted, monkeypatch):
    _, results, _ = uninterrupted
    has_sparse = study.SPARSE_METHOD in results.methods
    assert has_sparse == study.sparse_available()
    monkeypatch.setattr(study, "sparse_available", lambda: False)
    assert study.SPARSE_METHOD not in study.active_methods(MINIATURE)
    if not has_sparse:
        assert "Sparse top-k KD did not run" in study_report.report_text(results)


def test_interval_is_mean_plus_minus_t_times_standard_error():
    iv = study_report.interval([1.0, 2.0, 3.0])
    assert (iv.mean, iv.std) == (2.0, 1.0)
    assert iv.high - iv.mean == pytest.approx(4.303 / math.sqrt(3))
    assert study_report.t_quantile_975(2) == 4.303
    assert study_report.t_quantile_975(40) == pytest.approx(2.0211, abs=1e-4)
    assert study_report.t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-4)
    assert not study_report.interval([0.5]).defined


@pytest.mark.parametrize("options, claims, denies", [
    # clearly above 0, clearly above the other option
    ([("a", [0.10, 0.11, 0.12]), ("b", [0.01, 0.015, 0.02])], ["beats the CE baseline", "separated from every"],
     ["not distinguishable"]),
    # noisy: the interval contains 0 and the options overlap
    ([("a", [0.10, -0.08, 0.02]), ("b", [0.0, 0.01, -0.01])], ["not distinguishable", "do not separate it"],
     ["beats"]),
    # even the best is worse than the baseline
    ([("a", [-0.10, -0.11, -0.12])], ["worse than the CE baseline"], ["separate"]),
])
def test_findings_claim_only_what_the_intervals_support(options, claims, denies):
    sentence = study_report.best_sentence("Question", options)
    assert sentence.startswith("**Question**: a has the largest mean gain")
    for phrase in claims:
        assert phrase in sentence
    for phrase in denies:
        assert phrase not in sentence


@pytest.mark.parametrize("flags, message", [
    (["--study", "--steps", "5"], "--steps does not apply"),
    (["--study", "quick", "--sweep-temperature", "1,2"], "--sweep-temperature does not apply"),
    (["--jobs", "2"], "--jobs applies to --study"),
    (["--study", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_study_command_line_refuses_options_that_do_not_apply(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(flags)
    assert message in capsys.readouterr().err


def test_study_command_line_runs_the_named_protocol_into_out(uninterrupted, tmp_path, teacher_dir, monkeypatch,
                                                             capsys):
    out, _, _ = uninterrupted
    shutil.copytree(out / "runs", tmp_path / "runs")  # the miniature's runs, so nothing trains again
    monkeypatch.setitem(study.PROTOCOLS, "quick", dataclasses.replace(MINIATURE, name="quick"))
    assert main(["--study", "quick", "--out", str(tmp_path), "--cache-dir", str(teacher_dir), "--no-progress"]) == 0
    assert "to train" not in capsys.readouterr().out
    report = _read(tmp_path / "report.md")
    assert report.startswith("# Distillation study (`quick` protocol)")
    assert "`python -m kdkernels.train --study quick`" in report
    assert all((tmp_path / name).exists() for name in study_report.FIGURES)
