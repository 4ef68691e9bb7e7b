"""Smoke tests of the benchmark suite: the harness measures in a subprocess and formats tables,
the eager peer formulas equal kd_loss, and `python -m benchmarks.kd_loss` produces its rows.
Tiny shapes, no timing asserts."""

import json
import os
import subprocess
import sys

import pytest
import torch

import kdkernels
from benchmarks import harness
from benchmarks.eager import EAGER_LOSSES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_measure_reports_time_and_memory_of_a_child_process():
    result = harness.measure("benchmarks.harness:copy_setup", {"nbytes": 1 << 20}, repeat=3, warmup=1)
    assert "error" not in result, result
    assert len(result["times_ms"]) == 3
    assert 0 < result["min_ms"] <= result["median_ms"]
    assert result["rss_inputs_mib"] > 0
    assert result["threads"] == harness.available_cpus()
    for key in ("extra_peak_mib", "warmup_extra_peak_mib", "retained_mib"):
        assert isinstance(result[key], float)


def test_measure_reports_a_failing_setup_as_an_error():
    result = harness.measure("benchmarks.harness:no_such_setup", repeat=1, warmup=0)
    assert "AttributeError" in result["error"]


def test_reset_peak_rss_forgets_earlier_allocations():
    # The harness relies on /proc/self/clear_refs resetting VmHWM to the current VmRSS.
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    del big
    harness._reset_peak_rss()
    assert harness._rss_kib("VmHWM") - harness._rss_kib("VmRSS") < 32 * 1024


def test_format_table_aligns_columns_and_prints_missing_cells_as_na():
    rows = [{"impl": "eager", "ms": 12.345}, {"impl": "kdkernels", "ms": None}]
    columns = [harness.Column("impl", "impl"), harness.Column("median ms", "ms", ".1f")]
    lines = harness.format_table(rows, columns).splitlines()
    assert lines[0].split() == ["impl", "median", "ms"]
    assert lines[2].split() == ["eager", "12.3"]
    assert lines[3].split() == ["kdkernels", "n/a"]
    assert len({len(line) for line in lines[:3]}) == 1
    markdown = harness.format_table(rows, columns, markdown=True).splitlines()
    assert markdown[0].startswith("| impl") and markdown[1].endswith(":|")


@pytest.mark.parametrize("argv, n, repeat", [([], 4096, 7), (["--quick"], 1024, 3),
                                              (["--quick", "--n", "10", "--repeat", "2"], 10, 2)])
def test_run_args_take_their_sizes_from_quick_unless_given(argv, n, repeat):
    import argparse

    parser = argparse.ArgumentParser()
    harness.add_run_args(parser, repeat=7, time_budget_s=5.0)
    args = harness.parse_run_args(parser, argv)
    assert (args.n, args.repeat, args.warmup, args.time_budget) == (n, repeat, 1, 5.0)
    assert not hasattr(args, "_run_defaults") and args.json is None and not args.markdown


@pytest.mark.parametrize("divergence", sorted(EAGER_LOSSES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_eager_formula_equals_kd_loss_batchmean(divergence, beta):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 133, dtype=torch.float64, generator=generator) * 3
    teacher = torch.randn(7, 133, dtype=torch.float64, generator=generator) * 3
    eager = EAGER_LOSSES[divergence](student, teacher, 2.0, beta)
    fused = kdkernels.kd_loss(student, teacher, divergence=divergence, temperature=2.0, beta=beta,
                              reduction="batchmean", backend="reference")
    torch.testing.assert_close(eager, fused.to(eager.dtype), rtol=1e-6, atol=1e-9)


def test_kd_loss_benchmark_prints_a_row_per_configuration(tmp_path):
    json_path, png_path = tmp_path / "kd_loss.json", tmp_path / "kd_loss.png"
    command = [sys.executable, "-m", "benchmarks.kd_loss", "--n", "16", "--v", "96", "--repeat", "1",
               "--warmup", "1", "--dtypes", "fp32,bf16", "--divergences", "forward_kl,tvd",
               "--impls", "eager,kdkernels", "--json", str(json_path), "--png", str(png_path)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Forward KL" in proc.stdout and "Divergences at fp32" in proc.stdout
    assert "copy of one [N, V] tensor: fp32" in proc.stdout and "bf16" in proc.stdout
    assert "x floor" in proc.stdout
    assert f"Setup: {harness.describe_setup(harness.setup_info())}" in proc.stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    payload = json.loads(json_path.read_text())
    rows = payload["rows"]
    assert set(payload["meta"]["copy_ms"]) == {"fp32", "bf16"}
    expected = {("forward_kl", "fp32"), ("forward_kl", "bf16"), ("tvd", "fp32")}
    for impl in ("eager", "kdkernels"):
        measured = {(r["divergence"], r["dtype"]) for r in rows if r["impl"] == impl and "error" not in r}
        assert measured == expected, rows
    for row in rows:
        # the floor is 1.5 copies of one [N, V] tensor of the row's own dtype
        floor_ms = 1.5 * payload["meta"]["copy_ms"][row["dtype"]]
        assert row["floor_ms"] == pytest.approx(floor_ms)
        assert row["vs_floor"] == pytest.approx(row["median_ms"] / floor_ms)
        if row["impl"] == "kdkernels":
            assert row["median_ms"] > 0 and row["gbs"] > 0 and row["pct_copy"] > 0
    table_rows = [line.split() for line in proc.stdout.splitlines()]
    assert sum(1 for cells in table_rows if cells[:2] == ["fp32", "kdkernels"]) == 1
    assert sum(1 for cells in table_rows if cells[:2] == ["tvd", "kdkernels"]) == 1


@pytest.mark.parametrize("argv", [
    ["benchmarks.cakd", "--n", "16", "--v", "64", "--k", "3", "--no-peers", "--repeat", "1"],
    ["benchmarks.cakd", "--n", "16", "--v", "64", "--k", "3", "--no-peers", "--repeat", "1", "--dtype", "bf16"],
    ["benchmarks.fused_linear", "--n", "16", "--h", "8", "--v", "64", "--impls", "kdkernels", "gemms",
     "--skip-vocab-table", "--repeat", "1"],
    ["benchmarks.fused_linear", "--n", "16", "--h", "8", "--v", "64", "--impls", "kdkernels", "gemms",
     "--skip-vocab-table", "--repeat", "1", "--dtype", "bf16"],
], ids=["cakd", "cakd-bf16", "fused_linear", "fused_linear-bf16"])
def test_benchmarks_name_their_setup_and_write_a_png(tmp_path, argv):
    png_path, json_path = tmp_path / "plot.png", tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", *argv, "--warmup", "1", "--png", str(png_path),
                           "--json", str(json_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Setup: {harness.describe_setup(harness.setup_info())}" in proc.stdout
    payload = json.loads(json_path.read_text())
    rows = payload.get("rows") or payload["peers"] + payload["vocab"]
    assert rows and not [row for row in rows if "error" in row], rows
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bars_draws_every_measured_row_and_skips_failed_ones(tmp_path):
    rows = [{"impl": impl, "config": config, "median_ms": ms, "extra_peak_mib": mib, "floor_ms": 1.0}
            for config, impl, ms, mib in (("a fp32", "eager", 100.0, 50.0), ("a fp32", "kdkernels", 5.0, 10.0),
                                          ("b bf16", "eager", 80.0, 40.0))]
    rows.append({"impl": "liger", "config": "a fp32", "error": "not installed"})
    path = harness.plot_bars(str(tmp_path / "p.png"), rows, group=lambda row: row["config"], title="t",
                             setup="s", floor_key="floor_ms")
    assert path and os.path.getsize(path) > 1000
    assert harness.plot_bars(None, rows, group=lambda row: row["config"], title="t", setup="s") is None
    assert harness.plot_bars("none", rows, group=lambda row: row["config"], title="t", setup="s") is None


def test_liger_peer_runs_or_says_why_not():
    # Liger's losses are Triton kernels: without a GPU driver the row's error must name Liger (the
    # benchmark prints it as the "n/a" reason). In a child process, so that triton is not imported
    # into the test process.
    kwargs = {"impl": "liger", "divergence": "forward_kl", "dtype": "fp32", "n": 4, "v": 32,
              "temperature": 2.0, "beta": 0.5}
    result = harness.measure("benchmarks.kd_loss:setup", kwargs, repeat=1, warmup=0)
    assert "median_ms" in result or "Liger-Kernel" in result["error"], result


def test_compare_builds_times_each_row_for_both_checkouts(tmp_path):
    json_path = tmp_path / "compare.json"
    command = [sys.executable, "-m", "benchmarks.compare_builds", "--before", REPO_ROOT, "--after", REPO_ROOT,
               "--n", "8", "--v", "64", "--h", "8", "--rounds", "1", "--repeat", "1", "--json", str(json_path)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Setup: {harness.describe_setup(harness.setup_info())}" in proc.stdout
    rows = json.loads(json_path.read_text())
    assert {(r["loss"], r["divergence"], r["dtype"]) for r in rows} == {
        ("kd_loss", "forward_kl", "bfloat16"), *(("kd_loss", d, "float32") for d in
        ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")),
        ("fused_linear", "forward_kl", "float32"), ("fused_linear", "forward_kl", "bfloat16")}
    for row in rows:
        assert row["before_ms"] > 0 and row["after_ms"] > 0
        assert row["ratio"] == pytest.approx(row["after_ms"] / row["before_ms"])
    assert sum(1 for line in proc.stdout.splitlines() if line.startswith(("kd_loss", "fused_linear"))) == len(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_linear_gemm_floor_computes_the_four_products(dtype):
    # The floor's step does the four GEMMs of a fused step, in whichever form this machine takes
    # for the dtype (torch's matmul, or the widening GEMM on a CPU without 16-bit dot products).
    import torch
    from benchmarks import fused_linear

    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    hs, ws, ht, wt = (torch.randn(shape).to(dtype) for shape in ((4, 8), (16, 8), (4, 8), (16, 8)))
    step = fused_linear._gemms_step(hs, ws, ht, wt)
    step()
    student_logits, teacher_logits, grad_logits, grad_hidden, grad_weight = (x.double() for x in step.tensors)
    h64, w64, ht64, wt64 = (x.double() for x in (hs, ws, ht, wt))
    tol = dict(rtol=1e-2, atol=1e-2 * 8 ** 0.5) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student_logits, h64 @ w64.t(), **tol)
    torch.testing.assert_close(teacher_logits, ht64 @ wt64.t(), **tol)
    scale = grad_logits.abs().max().item()
    torch.testing.assert_close(grad_hidden / scale, grad_logits @ w64 / scale, **tol)
    torch.testing.assert_close(grad_weight / scale, grad_logits.t() @ h64 / scale, **tol)
