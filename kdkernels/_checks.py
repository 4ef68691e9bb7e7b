"""Argument validation: done once, here, before any backend runs."""

from __future__ import annotations

import math
from typing import Optional

import torch

from kdkernels._config import DIVERGENCES, REDUCTIONS, KDConfig

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {value.dtype}"
        )
    return value


def check_logits_pair(student_logits, teacher_logits) -> None:
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [N, V] or [B, S, V], got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty vocabulary (last) dimension")


def check_labels(labels, batch_shape, device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    check_tensor("labels", labels, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits shape without the vocab "
            f"dimension, {tuple(batch_shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
    return labels


def _check_number(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_temperature(temperature) -> float:
    return _check_number("temperature", temperature, low=0.0, low_open=True)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def make_config(*, divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index,
                has_labels: bool) -> KDConfig:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    ce_weight = _check_number("ce_weight", ce_weight, low=0.0)
    if ce_weight > 0 and not has_labels:
        raise ValueError("ce_weight > 0 needs labels (the hard targets of the CE term)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return KDConfig(
        divergence=divergence,
        temperature=check_temperature(temperature),
        beta=_check_number("beta", beta, low=0.0, high=1.0),
        kd_weight=_check_number("kd_weight", kd_weight, low=0.0),
        ce_weight=ce_weight,
        scale_by_t2=bool(scale_by_t2),
        ignore_index=ignore_index,
    )


def check_values(teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], vocab: int,
                 ignore_index: int) -> None:
    """Data checks for backends whose kernels do not make them in-stream (the compiled CPU kernel
    does): NaN/+inf teacher logits and labels outside [0, V)."""
    if bool(torch.isnan(teacher_logits).any()) or bool(torch.isposinf(teacher_logits).any()):
        raise ValueError("teacher_logits contains NaN or +inf")
    if labels is not None:
        used = labels[labels != ignore_index]
        if used.numel() and (bool((used < 0).any()) or bool((used >= vocab).any())):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index ({ignore_index})")
