"""Build of kdkernels' compiled kernels.

CPU: one extension module per instruction set (``_C_avx512``, ``_C_avx2``, ``_C_default``), each
compiled with the ``CPU_CAPABILITY_*`` define and ``-m`` flags that make ``at::vec::Vectorized``
use that ISA, and with ``-fopenmp`` so ``at::parallel_for`` runs threaded. ``kdkernels`` loads the
best one the running CPU supports.

By default a build compiles what the building machine can run: its best ISA and the baseline
``default`` (the fallback every x86-64 or other CPU runs). A wheel meant for other machines
builds every ISA: ``KDKERNELS_CPU_ISAS=all``. The modules compile with ninja, several at once
(``MAX_JOBS`` caps the compiler processes of each module), and the build prints what it compiles.

CUDA: ``_C_cuda`` is built only against a CUDA build of torch with ``CUDA_HOME`` available.

Environment:
  KDKERNELS_CPU_ISAS   "native" (default: this machine's best ISA + default), "all"
                       (avx512,avx2,default), or a comma list of avx512, avx2, default
  KDKERNELS_BUILD_CUDA 1 forces the CUDA build (fails without a toolkit), 0 skips it;
                       unset builds it when torch.version.cuda and CUDA_HOME exist.
  MAX_JOBS             compiler processes per module (default: the CPUs shared out among the
                       modules built at once)
Install with ``pip install --no-build-isolation .`` so the extension compiles against the torch
that will import it (``-v`` shows the compiler's progress).
"""

import glob
import os
import sys
import sysconfig
import threading
import time

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

CPU_ISAS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _log(message):
    # one write per line: the modules build in threads at the same time
    sys.stderr.write(f"kdkernels build: {message}\n")
    sys.stderr.flush()


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _native_isas(torch_module):
    """This machine's best ISA (as torch reports it) and the baseline."""
    capability = torch_module.backends.cpu.get_cpu_capability()
    best = next((isa for isa in ("avx512", "avx2") if capability.upper().startswith(isa.upper())), None)
    return ([best] if best else []) + ["default"], capability


def _wanted_isas(torch_module):
    wanted = os.environ.get("KDKERNELS_CPU_ISAS", "native").strip().lower()
    if wanted == "native":
        isas, capability = _native_isas(torch_module)
        _log(f"CPU kernels for {', '.join(isas)} (this processor: {capability}); "
             "KDKERNELS_CPU_ISAS=all builds every ISA, for a wheel meant for other machines")
        return isas
    isas = list(CPU_ISAS) if wanted == "all" else [w.strip() for w in wanted.split(",") if w.strip()]
    for isa in isas:
        if isa not in CPU_ISAS:
            raise ValueError(f"KDKERNELS_CPU_ISAS: unknown ISA {isa!r}; expected native, all or a comma "
                             f"list of {', '.join(CPU_ISAS)}")
    _log(f"CPU kernels for {', '.join(isas)} (KDKERNELS_CPU_ISAS={wanted})")
    return isas


def _cpu_extensions(CppExtension, isas):
    extensions = []
    for isa in isas:
        module = f"_C_{isa}"
        extensions.append(
            CppExtension(
                name=f"kdkernels.{module}",
                sources=["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp"),
                include_dirs=[os.path.join(HERE, "csrc", d) for d in ("", "include", "cpu")],
                depends=_sources("csrc/*.h") + _sources("csrc/include/kdkernels/*.h") + _sources("csrc/cpu/*.h"),
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
            include_dirs=[os.path.join(HERE, "csrc", d) for d in ("", "include")],
            depends=_sources("csrc/*.h") + _sources("csrc/include/kdkernels/*.h") + _sources("csrc/cuda/*.h"),
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17", "-DKDK_MODULE=_C_cuda"],
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-DKDK_MODULE=_C_cuda",
                         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
            },
        )
    ]


def _put_ninja_on_path():
    """torch looks for a ``ninja`` executable on PATH; the pip package's one sits in this
    interpreter's scripts folder, which is not on PATH when a virtual environment's python is run
    without activating it. Without ninja, torch compiles serially."""
    folders = [sysconfig.get_path("scripts")]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    missing = [f for f in dict.fromkeys(folders) if f and f not in path.split(os.pathsep)]
    os.environ["PATH"] = os.pathsep.join(missing + [path])


def _build_ext_class(BuildExtension):
    class BuildKernels(BuildExtension):
        """torch's BuildExtension, with each module in its own build folder (the ISA modules
        compile the same sources with different flags) so that, with ninja, the modules build at
        the same time; says what it compiles and how long each module took."""

        _per_thread = threading.local()

        @property
        def build_temp(self):
            return getattr(self._per_thread, "build_temp", None) or self.__dict__.get("_shared_build_temp")

        @build_temp.setter
        def build_temp(self, value):
            self.__dict__["_shared_build_temp"] = value

        def finalize_options(self):
            super().finalize_options()
            modules = len(self.extensions)
            if self.use_ninja and not self.parallel and modules > 1:
                self.parallel = modules
            if self.use_ninja and "MAX_JOBS" not in os.environ:
                # ninja's own default (CPUs + 2) per module would oversubscribe the machine.
                os.environ["MAX_JOBS"] = str(max(1, -(-_cpu_count() // max(1, int(self.parallel or 1)))))

        def build_extensions(self):
            names = ", ".join(ext.name.rsplit(".", 1)[-1] for ext in self.extensions)
            how = (f"ninja, {self.parallel or 1} module(s) at once, MAX_JOBS={os.environ.get('MAX_JOBS')}"
                   if self.use_ninja else "without ninja (pip install ninja for a parallel build): one file at a time")
            _log(f"compiling {names} with {how}")
            super().build_extensions()

        def build_extension(self, ext):
            module = ext.name.rsplit(".", 1)[-1]
            self._per_thread.build_temp = os.path.join(self.__dict__["_shared_build_temp"], module)
            started = time.perf_counter()
            _log(f"{module}: compiling {len(ext.sources)} sources")
            try:
                super().build_extension(ext)
            finally:
                self._per_thread.build_temp = None
            _log(f"{module}: built in {time.perf_counter() - started:.0f} s")

    return BuildKernels


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time; installing without compiled kernels (the "
             "pure-PyTorch reference backend will be used). Install torch first and build with "
             "`pip install --no-build-isolation .`")
        return [], {}
    _put_ninja_on_path()
    extensions = _cpu_extensions(CppExtension, _wanted_isas(torch))
    if _want_cuda(torch):
        extensions += _cuda_extensions(CUDAExtension)
    return extensions, {"build_ext": _build_ext_class(BuildExtension).with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
