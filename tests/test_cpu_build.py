"""The compiled CPU build: which one is loaded, that it is vectorised and threaded, and that
importing kdkernels without any compiled module still works (warning once, reference fallback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kdkernels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_BUILD = {"AVX512": ("avx512", 16), "AVX2": ("avx2", 8)}


def test_backend_info_reports_the_loaded_build():
    info = kdkernels.backend_info()
    assert info["cpu_build"] in ("avx512", "avx2", "default")
    assert info["isa"].lower() == info["cpu_build"]
    assert isinstance(info["vector_width"], int) and info["vector_width"] >= 1
    assert f"vector_width={info['vector_width']}" in torch.ops.kdkernels.build_info()
    assert info["cuda_build"] in (True, False)
    loaded = [name for name in sys.modules
              if name.startswith("kdkernels._C_") and name != "kdkernels._C_cuda"]
    assert loaded == [f"kdkernels._C_{info['cpu_build']}"]


def test_best_build_for_this_processor_is_vectorised_and_threaded():
    capability = torch.backends.cpu.get_cpu_capability()
    info = kdkernels.backend_info()
    if capability in EXPECTED_BUILD:
        build, width = EXPECTED_BUILD[capability]
        assert info["cpu_build"] == build
        assert info["vector_width"] == width  # fp32 lanes: not the scalar fallback
    assert info["threading"] == "openmp"


def test_parallel_for_runs_on_several_threads():
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs single-threaded in this process")
    assert torch.ops.kdkernels.parallel_threads_used(8) > 1


_NO_COMPILED_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys, warnings

    class HideCompiled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("kdkernels._C_"):
                raise ImportError(f"{name} hidden by the test")
            return None

    sys.meta_path.insert(0, HideCompiled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kdkernels
        import kdkernels.functional, kdkernels.nn
        import torch
        gen = torch.Generator().manual_seed(0)
        student = torch.randn(5, 17, generator=gen, requires_grad=True)
        teacher = torch.randn(5, 17, generator=gen)
        loss = kdkernels.kd_loss(student, teacher, temperature=2.0)
        loss.backward()
        kdkernels.kd_loss(student, teacher, divergence="jsd")
    try:
        kdkernels.kd_loss(student, teacher, backend="cpu")
        cpu_error = None
    except ValueError as exc:
        cpu_error = str(exc)
    reference = kdkernels.kd_loss(student.double(), teacher.double(), temperature=2.0, backend="reference")
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if "kdkernels" in str(w.message)],
        "info": {k: v for k, v in kdkernels.backend_info().items() if k in ("cpu_build", "cpu_error")},
        "loss": float(loss), "reference": float(reference),
        "grad_finite": bool(torch.isfinite(student.grad).all()),
        "cpu_error": cpu_error,
    }))
""")


def test_import_without_compiled_modules_warns_once_and_falls_back():
    result = subprocess.run([sys.executable, "-c", _NO_COMPILED_SCRIPT], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "reference" in report["warnings"][0]
    assert report["info"]["cpu_build"] is None and report["info"]["cpu_error"]
    assert abs(report["loss"] - report["reference"]) <= 1e-6 * max(1.0, abs(report["reference"]))
    assert report["grad_finite"]
    assert report["cpu_error"] is not None and "backend" in report["cpu_error"]


# --- the gradient buffers kept for reuse ------------------------------------------------------------

def _fresh_gradient_pointer(shape, dtype):
    student = torch.randn(shape).to(dtype).requires_grad_(True)
    teacher = torch.randn(shape).to(dtype)
    kdkernels.kd_loss(student, teacher, temperature=2.0).backward()
    pointer = student.grad.data_ptr()
    assert torch.isfinite(student.grad).all()
    del student  # frees the gradient: its mapping goes back to the cache
    return pointer


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_a_freed_gradient_buffer_serves_the_next_call_of_its_size(dtype):
    shape = (256, 16384)  # 16 MiB fp32: above the huge-page threshold
    kdkernels.empty_cpu_cache()
    first = _fresh_gradient_pointer(shape, dtype)
    assert kdkernels.backend_info()["cpu_cached_buffer_bytes"] >= shape[0] * shape[1] * dtype.itemsize
    assert _fresh_gradient_pointer(shape, dtype) == first
    released = kdkernels.empty_cpu_cache()
    assert released >= shape[0] * shape[1] * dtype.itemsize
    assert kdkernels.backend_info()["cpu_cached_buffer_bytes"] == 0


def test_a_reused_buffer_gives_the_same_gradient_as_a_fresh_one():
    # stale contents of a reused mapping never leak: ignored rows included, every entry is written
    student = torch.randn(300, 16384).requires_grad_(True)
    teacher = torch.randn(300, 16384)
    labels = torch.randint(0, 16384, (300,))
    labels[::7] = -100
    kdkernels.empty_cpu_cache()
    grads = []
    for _ in range(2):
        kdkernels.kd_loss(student, teacher, labels, ce_weight=0.5, divergence="jsd").backward()
        grads.append(student.grad.clone())
        student.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert (grads[0][::7] == 0).all()


def test_buffer_cache_can_be_switched_off():
    script = textwrap.dedent("""
        import torch, kdkernels
        s = torch.randn(256, 16384, requires_grad=True)
        kdkernels.kd_loss(s, torch.randn(256, 16384)).backward()
        s.grad = None
        print(kdkernels.backend_info()["cpu_cached_buffer_bytes"])
    """)
    env = {**os.environ, "KDKERNELS_CPU_BUFFER_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0"
