"""kd_loss on a CUDA device, for both GPU backends (Triton and the compiled CUDA kernels), against
the float64 reference; plus what only a GPU can show: launches on the current stream without a
host synchronisation (CUDA-graph capture), no recompilation when T or beta change, the op
registration. Those tests are skipped without a CUDA device (shapes stay few: every Triton variant
compiles once). The last test runs everywhere: the GPU benchmark script's CPU dry run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import kdkernels
from conftest import DIVERGENCE_NAMES, check_against_reference, loss_and_grad, make_labels, make_pair
from kdkernels import _checks, _extension, backends

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu(test):
    """Marks a test that needs a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))

GPU_BACKENDS = ("triton", "cuda")


def _require(backend: str) -> None:
    probe = torch.zeros(1, device="cuda")
    if not backends.usable(backend, probe):
        what = "triton is not importable" if backend == "triton" else (
            "kdkernels._C_cuda is not built (pip install --no-build-isolation -e . with CUDA_HOME set)")
        pytest.skip(f"backend {backend!r} unavailable: {what}")


def on_gpu(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


def config(**options):
    values = dict(divergence="forward_kl", temperature=2.0, beta=0.5, kd_weight=1.0, ce_weight=0.0,
                  scale_by_t2=True, ignore_index=-100)
    values.update(options)
    return _checks.make_config(has_labels=True, **values)


# --- values and gradients against the float64 reference ----------------------------------------------

@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_every_divergence_with_ce_blend_matches_reference(backend, divergence):
    _require(backend)
    student, teacher = make_pair((41, 1271), torch.bfloat16, seed=1)
    labels = make_labels((41,), 1271, ignored=[0, 7, 40])
    student, teacher, labels = on_gpu(student, teacher, labels)
    result = check_against_reference(student, teacher, labels, backend=backend, divergence=divergence,
                                     temperature=2.0, beta=0.3, ce_weight=0.4, reduction="none",
                                     grad_output=torch.randn(41, device="cuda"))
    assert (result.grad[[0, 7, 40]] == 0).all()


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("shape", ((3, 7, 33), (2, 50257)), ids=str)
def test_dtypes_and_shapes_match_reference(backend, dtype, shape):
    _require(backend)
    student, teacher = on_gpu(*make_pair(shape, dtype, seed=2))
    check_against_reference(student, teacher, backend=backend, temperature=1.0)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_llama3_vocabulary_in_bf16_matches_reference(backend):
    _require(backend)
    student, teacher = make_pair((4, 128256), torch.bfloat16, seed=3)
    labels = make_labels((4,), 128256, ignored=[2])
    student, teacher, labels = on_gpu(student, teacher, labels)
    check_against_reference(student, teacher, labels, backend=backend, temperature=2.0, ce_weight=0.5)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_dtypes_strides_and_masked_columns_match_reference(backend):
    _require(backend)
    student, teacher = make_pair((24, 300), torch.bfloat16, teacher_dtype=torch.float32, seed=4)
    student[:, ::7] = -math.inf
    teacher[:, ::7] = -math.inf
    student, teacher = on_gpu(student[::2, 1:], teacher[::2, 1:])  # row stride != V, unaligned rows
    result = check_against_reference(student, teacher, backend=backend, divergence="jsd", temperature=2.0)
    assert (result.grad[:, 6::7] == 0).all()


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bad_values_make_their_row_nan(backend):
    _require(backend)
    student, teacher = make_pair((3, 100), seed=5)
    teacher[0, 5] = math.nan
    labels = torch.tensor([1, 100, 2])
    student, teacher, labels = on_gpu(student, teacher, labels)
    result = loss_and_grad(student, teacher, labels, backend=backend, ce_weight=0.5, reduction="none")
    assert torch.isnan(result.loss[:2]).all() and torch.isnan(result.grad[:2]).all()
    assert torch.isfinite(result.loss[2]) and torch.isfinite(result.grad[2]).all()


@gpu
def test_auto_picks_the_preferred_gpu_backend():
    student = torch.zeros(2, 8, device="cuda")
    expected = next((name for name in backends.GPU_PREFERENCE if backends.usable(name, student)), "reference")
    assert backends.resolve("auto", student) == expected


# --- the current stream, no host synchronisation, no recompilation -----------------------------------

@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_rows_are_capturable_in_a_cuda_graph(backend):
    # Capture fails on a host synchronisation and on a launch outside the capturing stream.
    _require(backend)
    impl = backends.load(backend)
    student, teacher = make_pair((8, 1000), torch.bfloat16, seed=6)
    labels = make_labels((8,), 1000, ignored=[3])
    student, teacher, labels = on_gpu(student, teacher, labels)
    scale = torch.tensor(0.125, device="cuda")
    cfg = config(divergence="reverse_kl", ce_weight=0.3)
    expected_loss, expected_grad = impl.rows(student, teacher, labels, scale, cfg, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        row_loss, grad = impl.rows(student, teacher, labels, scale, cfg, True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(row_loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_a_side_stream(backend):
    _require(backend)
    student, teacher = on_gpu(*make_pair((16, 4000), torch.bfloat16, seed=7))
    reference = kdkernels.kd_loss(student, teacher, temperature=2.0, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = kdkernels.kd_loss(student, teacher, temperature=2.0, backend=backend)
    side.synchronize()
    torch.testing.assert_close(on_side, reference, rtol=0, atol=0)


@gpu
def test_triton_does_not_recompile_for_new_temperature_or_beta():
    _require("triton")
    from kdkernels.backends.triton import kd_loss as triton_kd_loss

    kernel = triton_kd_loss._kd_loss_fwd_kernel
    student, teacher = on_gpu(*make_pair((4, 500), torch.bfloat16, seed=8))

    if not hasattr(kernel, "device_caches"):
        pytest.skip("this Triton version keeps its compiled kernels elsewhere")

    def variants() -> int:  # compiled variants: the first item of each device's cache entry
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    kdkernels.kd_loss(student, teacher, divergence="jsd", temperature=2.0, beta=0.3, backend="triton")
    before = variants()
    for temperature, beta in ((3.0, 0.7), (0.5, 0.1), (7.0, 0.9)):
        kdkernels.kd_loss(student, teacher, divergence="jsd", temperature=temperature, beta=beta,
                          backend="triton")
    assert variants() == before


@gpu
@pytest.mark.parametrize("factor", (1.0, 0.37))
def test_scale_unless_one_on_the_device(factor):
    _require("triton")
    from kdkernels.backends.triton import scale

    grad = torch.randn(1000, 1003, device="cuda").to(torch.bfloat16)
    expected = (grad.float() * factor).to(torch.bfloat16)
    scale.scale_unless_one_(grad, torch.tensor(factor, device="cuda"))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@gpu
def test_cuda_op_registration_passes_opcheck():
    if not _extension.cuda_available():
        pytest.skip("kdkernels._C_cuda is not built")
    student, teacher = on_gpu(*make_pair((5, 37), torch.bfloat16, seed=9))
    labels = torch.tensor([0, 3, -100, 36, 2], device="cuda")
    for args in ((student, teacher, labels, torch.tensor(0.2, device="cuda"), 2, 2.0, 0.5, 1.0, 0.5, True,
                  -100, True),
                 (student, teacher, None, torch.tensor(1.0, device="cuda"), 0, 1.0, 0.5, 1.0, 0.0, True,
                  -100, False)):
        torch.library.opcheck(torch.ops.kdkernels.kd_loss_fwd, args)


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    # The benchmark script's plumbing without a GPU: children, tables, files, n/a rows on failure.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--dry-run", "--impls", "eager,kdkernels-triton",
         "--divergences", "forward_kl", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    eager = next(r for r in results["rows"] if r["impl"] == "eager")
    assert eager["median_ms"] > 0 and eager["gbs"] > 0
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "## forward_kl, N=4, V=256" in table
    # the other loss families at the first shape: CAKD/DKD, sparse teachers, the fused lm_head
    assert "## cakd (" in table and "## sparse (" in table and "## fused_linear_kd_loss" in table
    rows = {(r["family"], r["case"], r["impl"]): r for r in results["family_rows"]}
    assert rows[("cakd", "dkd", "eager")]["median_ms"] > 0 and rows[("sparse", "residual", "eager")]["gbs"] > 0
    fused = rows[("fused_linear", "forward_kl", "eager")]
    assert fused["tflops"] > 0 and 0 <= fused["grad_error"] < 0.1
    assert "error" in rows[("cakd", "cakd_topk", "kdkernels-triton")]  # no Triton on CPU tensors: n/a, not a crash
