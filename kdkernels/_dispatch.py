"""Choosing the backend that runs a loss (see kdkernels.backends for the shared contract)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from kdkernels import _extension

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# On CUDA tensors, "auto" tries these in order (the first is the one measured faster).
GPU_PREFERENCE = ("triton", "cuda")


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"kdkernels.backends.{name}")


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
        return on_device and tensor.dtype != torch.float64 and _triton_importable()
    return False


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """The backend name that will run: `backend` itself, or the best usable one for "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def module(name: str) -> ModuleType:
    return _module(name)


def rows_fn(name: str):
    """The `rows` entry point of backend `name`. GPU kernels report bad input as NaN row losses
    (no host synchronisation inside the kernel); here one look at the [N] row losses turns that
    into the ValueError the other backends raise."""
    impl = _module(name)
    if not getattr(impl, "BAD_INPUT_AS_NAN", False):
        return impl.rows

    def rows(student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad):
        row_loss, grad = impl.rows(student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad)
        if bool(torch.isnan(row_loss).any()):
            _raise_bad_input(teacher_logits, labels, student_logits.shape[-1], cfg, student_logits)
        return row_loss, grad

    return rows


def rows_inplace_fn(name: str):
    """The `rows_inplace` entry point of backend `name` (gradient written over the student
    logits), with the same bad-input check as rows_fn; None when the backend has none."""
    impl = _module(name)
    inplace = getattr(impl, "rows_inplace", None)
    if inplace is None or not getattr(impl, "BAD_INPUT_AS_NAN", False):
        return inplace

    def rows_inplace(student_logits, teacher_logits, labels, grad_scale, cfg):
        row_loss = inplace(student_logits, teacher_logits, labels, grad_scale, cfg)
        if bool(torch.isnan(row_loss).any()):
            # the student logits now hold the gradient: what is not the teacher's or the
            # labels' fault was the student's
            _raise_bad_input(teacher_logits, labels, student_logits.shape[-1], cfg, student_logits=None)
        return row_loss

    return rows_inplace


# The CPU kernel's words (csrc/cpu/row_ops.h) for a loss the student's -inf entries make +inf or
# undefined, which the GPU kernels report as a NaN row loss.
STUDENT_NEG_INF_MESSAGE = (
    "student_logits is -inf where the loss needs a finite value (a whole row, the label's entry, or an "
    "entry where the teacher has probability), so the loss would be +inf or undefined")


def _raise_bad_input(teacher_logits, labels, vocab: int, cfg, student_logits) -> None:
    """The ValueError for a NaN row loss from a GPU kernel: bad teacher values or labels first,
    else the student's: NaN / +inf, or -inf where the loss needs a finite value (`student_logits`
    None: they were overwritten, so it can only be one of those)."""
    from kdkernels import _checks

    _checks.check_values(teacher_logits, labels, vocab, cfg.ignore_index)
    if student_logits is None:
        raise ValueError("student_logits contains NaN or +inf, or is -inf where the loss needs a finite value")
    _checks.check_finite("student_logits", student_logits)
    raise ValueError(STUDENT_NEG_INF_MESSAGE)
