"""The compiled CPU sparse-teacher kernel (csrc/cpu/sparse_kd_cpu.cpp) through its registered ops,
with their fake (meta) implementations for torch.compile and torch.library.opcheck."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kdkernels import _extension
from kdkernels._ops import fake_row_loss, fake_row_loss_and_grad
from kdkernels._sparse_checks import SparseConfig, SparseTeacher

def available() -> bool:
    """Whether the loaded CPU build has the sparse ops (an older build may not)."""
    return _extension.cpu_available() and hasattr(torch.ops.kdkernels, "sparse_kd_loss_fwd")


def _options(cfg: SparseConfig):
    kd = cfg.kd
    return (cfg.teacher_kind_id, cfg.teacher_temperature, cfg.missing_mass_id, kd.divergence_id, kd.temperature,
            kd.beta, kd.kd_weight, kd.ce_weight, kd.scale_by_t2, kd.ignore_index, cfg.pad_id)


def sparse_rows(student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: SparseConfig, compute_grad: bool
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    row_loss, grad = torch.ops.kdkernels.sparse_kd_loss_fwd(
        student_logits, teacher.ids, teacher.values, labels, grad_scale, *_options(cfg), compute_grad)
    return row_loss, (grad if compute_grad else None)


def sparse_rows_inplace(student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """`sparse_rows` with the gradient written over the (contiguous) student logits; returns row_loss."""
    return torch.ops.kdkernels.sparse_kd_loss_fwd_inplace_(
        student_logits, teacher.ids, teacher.values, labels, grad_scale, *_options(cfg))


def _register_fakes() -> None:
    @torch.library.register_fake("kdkernels::sparse_kd_loss_fwd")
    def _sparse_fwd_fake(student_logits, teacher_ids, teacher_values, labels, grad_scale, teacher_kind,
                         teacher_temperature, missing_mass, divergence, temperature, beta, kd_weight, ce_weight,
                         scale_by_t2, ignore_index, pad_id, compute_grad):
        return fake_row_loss_and_grad(student_logits, compute_grad)

    @torch.library.register_fake("kdkernels::sparse_kd_loss_fwd_inplace_")
    def _sparse_fwd_inplace_fake(student_logits, teacher_ids, teacher_values, labels, grad_scale, teacher_kind,
                                 teacher_temperature, missing_mass, divergence, temperature, beta, kd_weight,
                                 ce_weight, scale_by_t2, ignore_index, pad_id):
        return fake_row_loss(student_logits)


if available():
    _register_fakes()
