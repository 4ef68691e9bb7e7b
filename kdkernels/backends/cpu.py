"""The compiled CPU kernels (csrc/cpu), through the registered op torch.ops.kdkernels.*."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kdkernels._config import KDConfig

# The kernel reports NaN/+inf logits and out-of-range labels itself, while it streams the rows.
CHECKS_VALUES = True


def rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: KDConfig, compute_grad: bool
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    row_loss, grad = torch.ops.kdkernels.kd_loss_fwd(
        student_logits, teacher_logits, labels, grad_scale, cfg.divergence_id, cfg.temperature,
        cfg.beta, cfg.kd_weight, cfg.ce_weight, cfg.scale_by_t2, cfg.ignore_index, compute_grad)
    return row_loss, (grad if compute_grad else None)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on huge pages, whose mapping is kept after it is freed for
    the next request of (nearly) its size: buffers a caller needs every step cost no page faults."""
    return torch.ops.kdkernels.empty_cached(list(shape), dtype)


def rows_inplace(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """`rows` with the gradient written over the (contiguous) student logits; returns row_loss."""
    return torch.ops.kdkernels.kd_loss_fwd_inplace_(
        student_logits, teacher_logits, labels, grad_scale, cfg.divergence_id, cfg.temperature,
        cfg.beta, cfg.kd_weight, cfg.ce_weight, cfg.scale_by_t2, cfg.ignore_index)


def cakd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
              grad_scale: torch.Tensor, cfg, compute_grad: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Decomposed KL (kdkernels.cakd_loss): (row_loss [N], components [N, 3] = BCD, SCD, WCD, grad)."""
    row_loss, components, grad = torch.ops.kdkernels.cakd_loss_fwd(
        student_logits, teacher_logits, labels, grad_scale, cfg.group_rule_id, cfg.top_k, cfg.mass_target,
        cfg.bcd_weight, cfg.scd_weight, cfg.wcd_weight, cfg.scd_teacher_mass, cfg.wcd_teacher_mass,
        cfg.temperature, cfg.scale_by_t2, cfg.ignore_index, compute_grad)
    return row_loss, components, (grad if compute_grad else None)


# The sparse-teacher family (kdkernels.sparse_kd_loss), where the loaded build has its ops.
from kdkernels.backends import cpu_sparse  # noqa: E402

if cpu_sparse.available():
    sparse_rows, sparse_rows_inplace = cpu_sparse.sparse_rows, cpu_sparse.sparse_rows_inplace
