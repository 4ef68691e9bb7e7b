"""Loads the compiled kernels: the best CPU build for this processor, and the CUDA build if any.

Import never fails: when no compiled module is importable, ``kdkernels`` warns once and every
loss runs on the pure-PyTorch reference backend.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

import torch

# Best first. torch reports what the running CPU supports ("AVX512", "AVX2", "DEFAULT", ...).
_CPU_BUILDS = ("avx512", "avx2", "default")
_SUPPORTED = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}

_cpu_build: Optional[str] = None
_cpu_error: Optional[str] = None
_cuda_loaded = False


def _load_cpu() -> None:
    global _cpu_build, _cpu_error
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = "DEFAULT"
    errors = []
    for build in _SUPPORTED.get(capability, ("default",)):
        try:
            importlib.import_module(f"kdkernels._C_{build}")
        except ImportError as exc:
            errors.append(f"_C_{build}: {exc}")
            continue
        _cpu_build = build
        return
    _cpu_error = "; ".join(errors) or "no CPU build matches this processor"
    warnings.warn(
        "kdkernels: compiled CPU kernels are not available "
        f"({_cpu_error}); using the pure-PyTorch reference backend. "
        "Reinstall with `pip install --no-build-isolation .` to build them.",
        RuntimeWarning,
        stacklevel=3,
    )


def _load_cuda() -> None:
    global _cuda_loaded
    if torch.version.cuda is None:
        return
    try:
        importlib.import_module("kdkernels._C_cuda")
        _cuda_loaded = True
    except ImportError:
        _cuda_loaded = False


_load_cpu()
_load_cuda()


def cpu_available() -> bool:
    return _cpu_build is not None


def cuda_available() -> bool:
    return _cuda_loaded


def info() -> Dict[str, object]:
    """What was loaded: used by kdkernels.backend_info()."""
    result: Dict[str, object] = {"cpu_build": _cpu_build, "cuda_build": _cuda_loaded}
    if _cpu_build is not None:
        raw = torch.ops.kdkernels.build_info()
        for item in raw.split(";"):
            key, _, value = item.partition("=")
            result[key] = int(value) if value.isdigit() else value
        result["cpu_cached_buffer_bytes"] = int(torch.ops.kdkernels.cached_buffer_bytes())
    else:
        result["cpu_error"] = _cpu_error
    try:
        result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return result
