"""The CUDA kernels without a GPU.

1. Every torch-free ``csrc/cuda/*.cu`` includes no torch header and compiles with plain ``nvcc -c``
   for sm_80 and sm_90 (skipped only where nvcc is absent).
2. The kernels' logic runs on the CPU: the ``.cu`` file is compiled by the host C++ compiler
   against a small emulation of the CUDA features it uses (thread blocks run one at a time, each
   CUDA thread a std::thread; ``__syncthreads`` a barrier; warp shuffles go through a shared slot
   array between two barriers, so every thread of a block must reach them together, as the
   kernels' block reductions do). Its row losses and gradients are checked against the float64
   reference like every other backend. A kernel that uses a CUDA feature the emulation lacks
   fails to build here: extend ``_EMULATION`` below.
3. The torch glue (``csrc/cuda/*.cpp``) compiles against torch's and the CUDA toolkit's headers
   (a syntax check; skipped where the toolkit's headers are absent).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

from conftest import (DIVERGENCE_NAMES, STUDENT_NEG_INF_CASES, assert_within_eager_error, make_labels, make_logits,
                      make_pair, masked_teacher_row_oracle, student_neg_inf_case)
from kdkernels import _checks
from kdkernels.backends import reference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO_ROOT, "csrc", "cuda", "*.cu")))
CUDA_DIR = os.path.join(REPO_ROOT, "csrc", "cuda")
INCLUDE_DIR = os.path.join(REPO_ROOT, "csrc", "include")
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.M)


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_sources_include_no_torch_header(source):
    seen = set()

    def local_headers(path):
        with open(path) as handle:
            text = handle.read()
        assert not TORCH_INCLUDE.search(text), f"{os.path.relpath(path, REPO_ROOT)} includes a torch header"
        for name in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, re.M):
            for base in (os.path.dirname(path), CUDA_DIR, INCLUDE_DIR):
                candidate = os.path.normpath(os.path.join(base, name))
                if os.path.isfile(candidate) and candidate not in seen:
                    seen.add(candidate)
                    local_headers(candidate)
                    break

    local_headers(source)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_sources_compile_with_nvcc_for_sm80_and_sm90(source, tmp_path):
    # The flags of the real build (setup.py); --threads 0 compiles the two targets in parallel.
    proc = subprocess.run(
        ["nvcc", "-c", "-std=c++17", "-O3", "--use_fast_math", "--threads", "0",
         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
         f"-I{INCLUDE_DIR}", f"-I{CUDA_DIR}", source, "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed on {os.path.basename(source)}:\n{proc.stderr[-4000:]}"


@functools.lru_cache(maxsize=None)
def _cuda_runtime_include() -> Optional[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc may be a wrapper script on PATH: ask it where its own binary lives
    proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True)
    for home in re.findall(r"TOP=(\S+)", proc.stdout + proc.stderr) + [os.path.dirname(os.path.dirname(nvcc))]:
        include = os.path.join(home, "include")
        if os.path.isfile(os.path.join(include, "cuda_runtime.h")):
            return include
    return None


GLUE_SOURCES = sorted(glob.glob(os.path.join(REPO_ROOT, "csrc", "cuda", "*.cpp")))


@pytest.mark.skipif(_cuda_runtime_include() is None, reason="the CUDA toolkit's headers are not installed")
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=os.path.basename)
def test_cuda_torch_glue_compiles_against_torch_headers(source, tmp_path):
    # A CPU torch ships c10/cuda's headers but not the one its CMake build generates: an empty
    # stand-in is enough for a syntax check.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n")
    includes = [*include_paths(), str(tmp_path), sysconfig.get_paths()["include"], _cuda_runtime_include(),
                os.path.join(REPO_ROOT, "csrc"), INCLUDE_DIR, CUDA_DIR]
    proc = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-w", "-DKDK_MODULE=_C_cuda",
                           *(f"-I{path}" for path in includes), source],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{os.path.basename(source)} does not compile:\n{proc.stderr[-4000:]}"


# --- the kernels run on the CPU through an emulation of CUDA ---------------------------------------

_EMULATION = r"""
#pragma once
// Just enough CUDA for csrc/cuda/*.cu to run on the host: see tests/test_cuda_compile.py.
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned int x, y, z; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
typedef struct KdEmuStream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "success" : "invalid value"; }

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;

namespace kd_emu {
inline std::barrier<>* block_barrier = nullptr;
// Set by the harness, which knows the kernels' signature.
inline cudaError_t (*launch)(const void*, dim3, dim3, void**) = nullptr;
}  // namespace kd_emu

inline void __syncthreads() { kd_emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned int, T value, int lane_mask, int = 32) {
  static T slots[1024];
  slots[threadIdx.x] = value;
  __syncthreads();
  T result = slots[threadIdx.x ^ static_cast<unsigned int>(lane_mask)];
  __syncthreads();
  return result;
}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }

struct __nv_bfloat16 { unsigned short bits; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned int u; std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<unsigned short>(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

struct __half { unsigned short bits; };
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline float __half2float(__half h) { _Float16 x; std::memcpy(&x, &h.bits, 2); return static_cast<float>(x); }
inline __half __float2half_rn(float f) { _Float16 x = static_cast<_Float16>(f); __half h; std::memcpy(&h.bits, &x, 2); return h; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

inline cudaError_t cudaLaunchKernel(const void* func, dim3 grid, dim3 block, void** args, size_t, cudaStream_t) {
  return kd_emu::launch(func, grid, block, args);
}
"""

_HARNESS = r"""
// Runs launch_kd_loss_fwd on files: <dir>/meta.txt (key value lines) and raw arrays; writes
// <dir>/row_loss.bin and <dir>/grad.bin (with in_place, the student buffer the gradient overwrote).
#include "kd_loss_kernel.cu"

#include <fstream>
#include <iostream>
#include <map>
#include <string>

using kdkernels::KDParams;
using kdkernels::cuda::KDRowsProblem;

static cudaError_t run_blocks(const void* func, dim3 grid, dim3 block, void** args) {
  using Kernel = void (*)(KDRowsProblem, KDParams);
  Kernel kernel = reinterpret_cast<Kernel>(const_cast<void*>(func));
  const KDRowsProblem problem = *static_cast<KDRowsProblem*>(args[0]);
  const KDParams params = *static_cast<KDParams*>(args[1]);
  gridDim = grid;
  blockDim = block;
  for (unsigned int b = 0; b < grid.x; ++b) {
    blockIdx = {b, 0, 0};
    std::barrier<> barrier(block.x);
    kd_emu::block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block.x; ++t)
      threads.emplace_back([&, t] { threadIdx = {t, 0, 0}; kernel(problem, params); });
    for (auto& thread : threads) thread.join();
  }
  return cudaSuccess;
}

static std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

int main(int argc, char** argv) {
  const std::string dir = argv[1];
  std::map<std::string, double> meta;
  std::ifstream meta_file(dir + "/meta.txt");
  std::string key;
  double value;
  while (meta_file >> key >> value) meta[key] = value;
  kd_emu::launch = &run_blocks;

  std::vector<char> student = read_file(dir + "/student.bin");
  std::vector<char> teacher = read_file(dir + "/teacher.bin");
  std::vector<char> labels = read_file(dir + "/labels.bin");
  float grad_scale = static_cast<float>(meta["grad_scale"]);
  const int64_t rows = static_cast<int64_t>(meta["rows"]), vocab = static_cast<int64_t>(meta["vocab"]);
  const int student_size = static_cast<int>(meta["student_size"]);
  std::vector<float> row_loss(rows);
  // 16-byte aligned, plus `grad_offset` elements to exercise the unaligned path
  std::vector<uint4> grad_storage((rows * vocab * student_size) / 16 + 2);
  char* grad = reinterpret_cast<char*>(grad_storage.data()) + static_cast<int>(meta["grad_offset"]) * student_size;

  KDRowsProblem problem;
  problem.student = student.data() + static_cast<int64_t>(meta["student_offset"]);
  problem.teacher = teacher.data() + static_cast<int64_t>(meta["teacher_offset"]);
  problem.student_type = static_cast<kdkernels::cuda::LogitsType>(static_cast<int>(meta["student_type"]));
  problem.teacher_type = static_cast<kdkernels::cuda::LogitsType>(static_cast<int>(meta["teacher_type"]));
  problem.student_row_stride = static_cast<int64_t>(meta["student_row_stride"]);
  problem.teacher_row_stride = static_cast<int64_t>(meta["teacher_row_stride"]);
  problem.labels = meta["has_labels"] != 0 ? reinterpret_cast<const int64_t*>(labels.data()) : nullptr;
  problem.grad_scale = &grad_scale;
  problem.row_loss = row_loss.data();
  problem.grad = meta["compute_grad"] != 0 ? grad : nullptr;
  if (meta["in_place"] != 0) {  // the gradient written over the student logits
    grad = student.data() + static_cast<int64_t>(meta["student_offset"]);
    problem.grad = grad;
  }
  problem.rows = rows;
  problem.vocab = vocab;
  const KDParams params = kdkernels::make_kd_params(
      static_cast<int64_t>(meta["divergence"]), static_cast<float>(meta["temperature"]),
      meta["beta"], static_cast<float>(meta["kd_weight"]),
      static_cast<float>(meta["ce_weight"]), meta["scale_by_t2"] != 0,
      static_cast<int64_t>(meta["ignore_index"]));
  const cudaError_t status = kdkernels::cuda::launch_kd_loss_fwd(problem, params, nullptr);
  if (status != cudaSuccess) {
    std::cerr << "launch failed: " << cudaGetErrorString(status) << "\n";
    return 1;
  }
  std::ofstream(dir + "/row_loss.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(row_loss.data()), rows * sizeof(float));
  std::ofstream(dir + "/grad.bin", std::ios::binary).write(grad, rows * vocab * student_size);
  return 0;
}
"""

_LOGITS_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _host_compiler() -> Optional[str]:
    return shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    compiler = _host_compiler()
    if compiler is None:
        pytest.skip("no host C++ compiler")
    build = tmp_path_factory.mktemp("cuda_emulation")
    stubs = build / "stubs"
    stubs.mkdir()
    (stubs / "kd_cuda_emulation.h").write_text(_EMULATION)
    for header in ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_bf16.h", "cuda_fp16.h"):
        (stubs / header).write_text('#pragma once\n#include "kd_cuda_emulation.h"\n')
    (build / "harness.cpp").write_text(_HARNESS)
    binary = build / "harness"
    proc = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", f"-I{stubs}", f"-I{CUDA_DIR}", f"-I{INCLUDE_DIR}",
         str(build / "harness.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the CUDA emulation does not build:\n{proc.stderr[-4000:]}"
    return binary


@dataclass
class Problem:
    student: torch.Tensor  # [N, V]
    teacher: torch.Tensor  # [N, V]
    labels: Optional[torch.Tensor]
    cfg: object
    grad_scale: float = 0.25


def _raw_bytes(tensor: torch.Tensor, offset_elements: int) -> bytes:
    flat = tensor.contiguous().view(-1)
    pad = torch.zeros(offset_elements, dtype=flat.dtype)
    return torch.cat([pad, flat]).view(torch.uint8).numpy().tobytes()


def run_emulated(binary, workdir, problem: Problem, *, compute_grad=True, misalign=False, in_place=False):
    """The CUDA launcher's (row_loss [N] float32, grad [N, V] or None) on the emulation; in_place:
    the gradient written over the student logits."""
    cfg = problem.cfg
    rows, vocab = problem.student.shape
    offset = 1 if misalign else 0  # one element: breaks the 16-byte alignment of every row
    meta = {
        "rows": rows, "vocab": vocab, "student_size": problem.student.element_size(),
        "student_type": _LOGITS_TYPE[problem.student.dtype], "teacher_type": _LOGITS_TYPE[problem.teacher.dtype],
        "student_row_stride": vocab, "teacher_row_stride": vocab,
        "student_offset": offset * problem.student.element_size(),
        "teacher_offset": offset * problem.teacher.element_size(), "grad_offset": offset,
        "has_labels": int(problem.labels is not None), "compute_grad": int(compute_grad), "in_place": int(in_place),
        "divergence": cfg.divergence_id, "temperature": cfg.temperature, "beta": cfg.beta,
        "kd_weight": cfg.kd_weight, "ce_weight": cfg.ce_weight, "scale_by_t2": int(cfg.scale_by_t2),
        "ignore_index": cfg.ignore_index, "grad_scale": problem.grad_scale,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "meta.txt").write_text("".join(f"{k} {float(v)!r}\n" for k, v in meta.items()))
    (workdir / "student.bin").write_bytes(_raw_bytes(problem.student, offset))
    (workdir / "teacher.bin").write_bytes(_raw_bytes(problem.teacher, offset))
    labels = problem.labels if problem.labels is not None else torch.zeros(rows, dtype=torch.int64)
    (workdir / "labels.bin").write_bytes(labels.to(torch.int64).numpy().tobytes())
    # A kernel whose threads disagree about a block-uniform branch deadlocks at a barrier.
    proc = subprocess.run([str(binary), str(workdir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row_loss = torch.from_numpy(np.fromfile(workdir / "row_loss.bin", dtype=np.float32).copy())
    if not compute_grad:
        return row_loss, None
    raw = np.fromfile(workdir / "grad.bin", dtype=np.uint8).copy()
    grad = torch.from_numpy(raw).view(problem.student.dtype).reshape(rows, vocab)
    return row_loss, grad


def config(**options):
    """A validated KDConfig; labels are assumed present (the CE term may need them)."""
    values = dict(divergence="forward_kl", temperature=2.0, beta=0.3, kd_weight=1.0, ce_weight=0.0,
                  scale_by_t2=True, ignore_index=-100)
    values.update(options)
    return _checks.make_config(has_labels=True, **values)


def check_emulated(binary, workdir, problem: Problem, **kwargs):
    """Emulated CUDA rows vs the float64 oracle, within twice eager PyTorch's error."""
    row_loss, grad = run_emulated(binary, workdir, problem, **kwargs)
    scale = torch.tensor(problem.grad_scale)
    eager_loss, eager_grad = reference.rows(problem.student, problem.teacher, problem.labels, scale,
                                            problem.cfg, True)
    oracle_loss, oracle_grad = reference.rows(problem.student.double(), problem.teacher.double(),
                                              problem.labels, scale.double(), problem.cfg, True)
    assert_within_eager_error(row_loss, eager_loss, oracle_loss, what="row loss", floor_dtype=torch.float32)
    if grad is not None:
        assert grad.dtype == problem.student.dtype
        assert_within_eager_error(grad, eager_grad, oracle_grad, what="gradient")
    return row_loss, grad


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_emulated_divergences_match_reference(emulated_kernels, tmp_path, divergence, temperature):
    student, teacher = make_pair((3, 203), seed=1)  # 203: a ragged last chunk
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, None,
                                                       config(divergence=divergence, temperature=temperature)))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_emulated_ce_blend_and_ignored_rows_match_reference(emulated_kernels, tmp_path, divergence):
    student, teacher = make_pair((4, 160), seed=2)
    labels = make_labels((4,), 160, ignored=[2])
    cfg = config(divergence=divergence, ce_weight=0.6, kd_weight=0.7)
    _, grad = check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, labels, cfg))
    assert (grad[2] == 0).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("misalign", (False, True), ids=("vector_loads", "scalar_loads"))
def test_emulated_low_precision_and_load_paths(emulated_kernels, tmp_path, dtype, misalign):
    student, teacher = make_pair((2, 1003), dtype, seed=3)
    labels = make_labels((2,), 1003)
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, labels,
                                                       config(divergence="jsd", ce_weight=0.5)),
                   misalign=misalign)


def test_emulated_mixed_dtypes_and_long_rows(emulated_kernels, tmp_path):
    # 9000 columns: 512 threads, several steps per thread, a partial last step
    student, teacher = make_pair((2, 9000), torch.bfloat16, teacher_dtype=torch.float32, seed=4)
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, None, config(divergence="reverse_kl")))


def test_emulated_masked_columns_and_rows(emulated_kernels, tmp_path):
    student, teacher = make_pair((3, 77), seed=5)
    columns = [0, 7, 8, 40, 76]
    student[:, columns] = -float("inf")
    teacher[:, columns] = -float("inf")
    problem = Problem(student, teacher, torch.tensor([3, 9, 41]), config(divergence="tvd", ce_weight=0.3))
    _, grad = check_emulated(emulated_kernels, tmp_path, problem)
    assert (grad[:, columns] == 0).all()
    student[1] = teacher[1] = -float("inf")  # a fully masked row without a CE term: loss 0, gradient 0
    row_loss, grad = run_emulated(emulated_kernels, tmp_path, Problem(student, teacher, None, config(divergence="tvd")))
    assert row_loss[1] == 0 and (grad[1] == 0).all() and torch.isfinite(row_loss).all()


@pytest.mark.parametrize("divergence,temperature", (("forward_kl", 1.0), ("reverse_kl", 2.0), ("skew_kl", 2.0),
                                                    ("tvd", 2.0)))
def test_emulated_teacher_row_entirely_masked_keeps_its_ce_term(emulated_kernels, tmp_path, divergence, temperature):
    # No teacher distribution: the row's KD term is 0, its CE term (and gradient) stays.
    student, teacher = make_pair((3, 77), seed=40)
    teacher[1] = -float("inf")
    labels = torch.tensor([4, 9, 70])
    problem = Problem(student, teacher, labels, config(divergence=divergence, temperature=temperature, ce_weight=0.7))
    row_loss, grad = run_emulated(emulated_kernels, tmp_path, problem)
    oracle = masked_teacher_row_oracle(student, teacher, labels, 1, grad_output=torch.full((3,), problem.grad_scale),
                                       divergence=divergence, temperature=temperature, ce_weight=0.7, beta=0.3)
    torch.testing.assert_close(row_loss.double(), oracle.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), oracle.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", STUDENT_NEG_INF_CASES)
def test_emulated_student_neg_inf_that_makes_the_loss_infinite_is_a_nan_row(emulated_kernels, tmp_path, case):
    student, teacher, labels, options = student_neg_inf_case(case)
    row_loss, _ = run_emulated(emulated_kernels, tmp_path, Problem(student, teacher, labels, config(**options)))
    assert torch.isnan(row_loss[1]) and torch.isfinite(row_loss[[0, 2]]).all()


@pytest.mark.parametrize("divergence", ("jsd", "skew_kl", "skew_reverse_kl"))
def test_emulated_mixture_weights_near_one_keep_full_precision(emulated_kernels, tmp_path, divergence):
    student, teacher = make_pair((3, 77), seed=44)
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, None,
                                                       config(divergence=divergence, beta=0.999999)))


def test_emulated_bad_values_make_their_row_nan(emulated_kernels, tmp_path):
    student, teacher = make_pair((3, 50), seed=6)
    teacher[0, 3] = float("nan")
    labels = torch.tensor([1, 50, 2])  # row 1: label out of range
    row_loss, grad = run_emulated(emulated_kernels, tmp_path,
                                  Problem(student, teacher, labels, config(ce_weight=0.5)))
    assert torch.isnan(row_loss[:2]).all() and torch.isnan(grad[:2]).all()
    assert torch.isfinite(row_loss[2]) and torch.isfinite(grad[2]).all()


def test_emulated_without_gradient_gives_the_same_losses(emulated_kernels, tmp_path):
    student, teacher = make_pair((3, 99), seed=7)
    problem = Problem(student, teacher, None, config(divergence="skew_reverse_kl"))
    with_grad, _ = run_emulated(emulated_kernels, tmp_path, problem)
    without_grad, _ = run_emulated(emulated_kernels, tmp_path, problem, compute_grad=False)
    torch.testing.assert_close(without_grad, with_grad, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_emulated_nearly_identical_student_and_teacher(emulated_kernels, tmp_path, divergence):
    # A tiny divergence must not drown in the rounding of the much larger logits.
    student = make_logits((16, 1271), seed=37, scale=3.0)
    teacher = student + 1e-3 * make_logits((16, 1271), seed=38, scale=1.0)
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, None, config(divergence=divergence)))


@pytest.mark.parametrize("magnitude", (30.0, 1e4))
def test_emulated_peaked_rows(emulated_kernels, tmp_path, magnitude):
    student, teacher = make_pair((3, 301), seed=8, scale=magnitude)
    student[0] = teacher[0]  # identical peaks; row 1: all mass on different columns
    student[1], teacher[1] = -magnitude, -magnitude
    student[1, 3], teacher[1, 250] = magnitude, magnitude
    check_emulated(emulated_kernels, tmp_path, Problem(student, teacher, make_labels((3,), 301),
                                                       config(divergence="skew_kl", temperature=1.0,
                                                              ce_weight=0.5)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("divergence,temperature", (("forward_kl", 2.0), ("jsd", 1.0), ("reverse_kl", 2.0)))
def test_emulated_gradient_in_place_equals_the_separate_gradient(emulated_kernels, tmp_path, dtype, divergence,
                                                                 temperature):
    # The fused lm_head loss's mode (kd_loss_fwd_inplace_): the CE term reads the label's logit,
    # which the gradient overwrites; row 1's teacher is masked (the CE-only branch), row 2 ignored.
    student, teacher = make_pair((4, 1003), dtype, seed=7)
    teacher[1] = -float("inf")
    labels = torch.tensor([5, 600, -100, 1002])
    problem = Problem(student, teacher, labels, config(divergence=divergence, temperature=temperature, ce_weight=0.4))
    expected_loss, expected_grad = run_emulated(emulated_kernels, tmp_path / "separate", problem)
    row_loss, grad = run_emulated(emulated_kernels, tmp_path / "in_place", problem, in_place=True)
    torch.testing.assert_close(row_loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    assert torch.isfinite(row_loss).all() and (grad[2] == 0).all()

