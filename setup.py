"""Build of kdkernels' compiled kernels.

CPU: one extension module per instruction set (``_C_avx512``, ``_C_avx2``, ``_C_default``), each
compiled with the ``CPU_CAPABILITY_*`` define and ``-m`` flags that make ``at::vec::Vectorized``
use that ISA, and with ``-fopenmp`` so ``at::parallel_for`` runs threaded. ``kdkernels`` loads the
best one the running CPU supports.

CUDA: ``_C_cuda`` is built only against a CUDA build of torch with ``CUDA_HOME`` available.

Environment:
  KDKERNELS_CPU_ISAS   comma list of CPU builds to compile (default: avx512,avx2,default)
  KDKERNELS_BUILD_CUDA 1 forces the CUDA build (fails without a toolkit), 0 skips it;
                       unset builds it when torch.version.cuda and CUDA_HOME exist.
Install with ``pip install --no-build-isolation .`` so the extension compiles against the torch
that will import it.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

CPU_ISAS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cpu_extensions(CppExtension):
    wanted = os.environ.get("KDKERNELS_CPU_ISAS", "avx512,avx2,default").split(",")
    extensions = []
    for isa in (w.strip() for w in wanted if w.strip()):
        if isa not in CPU_ISAS:
            raise ValueError(f"KDKERNELS_CPU_ISAS: unknown ISA {isa!r}; expected {sorted(CPU_ISAS)}")
        module = f"_C_{isa}"
        extensions.append(
            CppExtension(
                name=f"kdkernels.{module}",
                sources=["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp"),
                include_dirs=[os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc", "cpu")],
                extra_compile_args=["-O3", "-std=c++17", "-fopenmp", f"-DKDK_MODULE={module}"]
                + CPU_ISAS[isa],
                extra_link_args=["-fopenmp"],
            )
        )
    return extensions


def _want_cuda(torch_module):
    flag = os.environ.get("KDKERNELS_BUILD_CUDA")
    if flag == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch_module.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("KDKERNELS_BUILD_CUDA=1 but torch has no CUDA or CUDA_HOME is unset")
    return available


def _cuda_extensions(CUDAExtension):
    sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if not sources:
        return []
    return [
        CUDAExtension(
            name="kdkernels._C_cuda",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc", "include")],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17", "-DKDK_MODULE=_C_cuda"],
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-DKDK_MODULE=_C_cuda",
                         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
            },
        )
    ]


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("kdkernels: torch is not importable at build time; installing without compiled "
              "kernels (the pure-PyTorch reference backend will be used)", file=sys.stderr)
        return [], {}
    extensions = _cpu_extensions(CppExtension)
    if _want_cuda(torch):
        extensions += _cuda_extensions(CUDAExtension)
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
