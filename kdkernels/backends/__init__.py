"""Backends: the modules that compute a loss's rows, and the choice of the one that runs a call.

The contract. A backend is a module with these names (all arguments arrive validated by
kdkernels._checks; a backend never re-validates them):

    rows(student_logits [N, V], teacher_logits [N, V], labels [N] or None,
         grad_scale: 0-dim tensor, cfg: KDConfig, compute_grad: bool)
        -> (row_loss [N] float32 (float64 for float64 input), grad [N, V] in the student dtype or None)

        ``grad`` is dL/d(student_logits) of ``grad_scale * row_loss.sum()``, in fresh memory that
        the caller owns. Rows whose label equals ``cfg.ignore_index`` have loss 0 and gradient 0.

    rows_inplace(student_logits, teacher_logits, labels, grad_scale, cfg) -> row_loss   (optional)

        The same, with the gradient written over ``student_logits`` (contiguous), for callers that
        own a reusable logits buffer (the fused lm_head loss); it saves the [N, V] allocation.

    cakd_rows(student_logits, teacher_logits, labels, grad_scale, cfg: CAKDConfig, compute_grad)
        -> (row_loss [N], components [N, 3] = (BCD, SCD, WCD), grad or None)      (optional)

        The decomposed KL of kdkernels.cakd_loss / dkd_loss.

    CHECKS_VALUES: bool
        Whether the backend finds NaN / +inf teacher logits and labels outside [0, V) itself,
        while it streams the rows; otherwise the caller checks before the call.
    BAD_INPUT_AS_NAN: bool (optional, default False)
        Whether the backend reports bad values as NaN row losses (GPU kernels: no host
        synchronisation inside the kernel); the caller then checks them (kdkernels._reports: a
        device assertion by default, the ValueError in strict mode and on CPU tensors).

Backends: ``reference`` (pure PyTorch, differentiable: the float64 test oracle and the fallback),
``cpu`` (compiled C++ kernels), ``cuda`` (compiled CUDA kernels), ``triton`` (Triton kernels).
kdkernels.ops.route is the one caller.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Dict

import torch

from kdkernels import _extension
from kdkernels.backends import cpu, cuda, reference

NAMES = ("auto", "cpu", "cuda", "triton", "reference")

# On CUDA tensors, "auto" tries these in order (the first is the one measured faster).
GPU_PREFERENCE = ("triton", "cuda")

# The backend modules, by name. Triton is imported on first use (importing triton is slow); the
# others are light. Under torch.compile a loaded backend is a plain dictionary lookup.
_LOADED: Dict[str, ModuleType] = {"cpu": cpu, "cuda": cuda, "reference": reference}
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def load(name: str) -> ModuleType:
    """The module of backend `name` (one of NAMES but "auto")."""
    module = _LOADED.get(name)
    if module is None:
        from kdkernels.backends import triton as module

        _LOADED[name] = module
    return module


def usable(name: str, tensor: torch.Tensor) -> bool:
    """Whether backend `name` can run on `tensor`'s device and dtype in this process."""
    if name == "reference":
        return True
    if name == "cpu":
        return tensor.device.type == "cpu" and tensor.dtype != torch.float64 and _extension.cpu_available()
    if name == "cuda":
        return tensor.device.type == "cuda" and tensor.dtype != torch.float64 and _extension.cuda_available()
    if name == "triton":
        on_device = tensor.device.type == "cuda" or (
            tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
        return on_device and tensor.dtype != torch.float64 and _TRITON_FOUND
    return False


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """The backend name that will run: `backend` itself, or the best usable one for "auto"."""
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        candidates = GPU_PREFERENCE if tensor.device.type == "cuda" else ("cpu",)
        for name in candidates:
            if usable(name, tensor):
                return name
        return "reference"
    if not usable(backend, tensor):
        raise ValueError(
            f"backend={backend!r} cannot run on {tensor.device.type} {tensor.dtype} tensors in this "
            f"process (see kdkernels.backend_info()); use backend='auto' or 'reference'")
    return backend
