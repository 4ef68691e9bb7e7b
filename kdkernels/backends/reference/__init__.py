"""The pure-PyTorch backend: every loss written from its definition, differentiable to any order.
It is the test oracle (run in float64) and the fallback where no compiled or GPU kernel runs.

``kd.row_loss``, ``cakd.row_loss`` and ``sparse.row_loss`` are the differentiable per-row losses;
``rows`` / ``rows_inplace`` / ``cakd_rows`` / ``sparse_rows`` / ``sparse_rows_inplace`` wrap them in
the backend contract (kdkernels.backends)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from kdkernels._config import CAKDConfig, KDConfig
from kdkernels.backends.reference import cakd, kd, sparse

# NaN / +inf teachers and out-of-range labels are checked by the caller (kdkernels._checks).
CHECKS_VALUES = False


def _losses_and_grad(row_loss_fn: Callable, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: Optional[torch.Tensor], grad_scale: torch.Tensor, cfg, compute_grad: bool):
    """(row_loss_fn's outputs, detached; dL/d(student_logits) of grad_scale * row_loss.sum() or None)."""
    if not compute_grad:
        with torch.no_grad():
            return row_loss_fn(student_logits, teacher_logits, labels, cfg), None
    with torch.enable_grad():
        student = student_logits.detach().requires_grad_(True)
        outputs = row_loss_fn(student, teacher_logits, labels, cfg)
        loss = outputs[0] if isinstance(outputs, tuple) else outputs
        (grad,) = torch.autograd.grad(loss, student, grad_outputs=grad_scale.to(loss.dtype).expand_as(loss))
    if isinstance(outputs, tuple):
        return tuple(output.detach() for output in outputs), grad
    return outputs.detach(), grad


def rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: KDConfig, compute_grad: bool
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return _losses_and_grad(kd.row_loss, student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad)


def rows_inplace(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    row_loss, grad = rows(student_logits, teacher_logits, labels, grad_scale, cfg, True)
    student_logits.copy_(grad)
    return row_loss


def cakd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
              grad_scale: torch.Tensor, cfg: CAKDConfig, compute_grad: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    (loss, components), grad = _losses_and_grad(cakd.row_loss, student_logits, teacher_logits, labels,
                                                grad_scale, cfg, compute_grad)
    return loss, components, grad


def sparse_rows(student_logits: torch.Tensor, teacher, labels: Optional[torch.Tensor], grad_scale: torch.Tensor,
                cfg, compute_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``rows`` with a SparseTeacher (kdkernels.sparse_kd_loss); an infinite row raises as on CPU."""
    row_loss, grad = _losses_and_grad(sparse.row_loss, student_logits, teacher, labels, grad_scale, cfg,
                                      compute_grad)
    sparse.check_row_loss(row_loss)
    return row_loss, grad


def sparse_rows_inplace(student_logits: torch.Tensor, teacher, labels: Optional[torch.Tensor],
                        grad_scale: torch.Tensor, cfg) -> torch.Tensor:
    row_loss, grad = sparse_rows(student_logits, teacher, labels, grad_scale, cfg, True)
    student_logits.copy_(grad)
    return row_loss
