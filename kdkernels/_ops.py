"""Fake (meta) implementations of the compiled ops, so shapes propagate under torch.compile and
torch.library.opcheck passes (registered only when the compiled library is loaded), and the one
op written in Python: the value checks of a loss on logits, opaque to torch.compile."""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels import _checks, _extension


@torch.library.custom_op("kdkernels::check_logit_values", mutates_args=())
def check_logit_values(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                       ignore_index: int, log_q_by_teacher: bool, ce_weight: float,
                       log_p_by_student: bool = False) -> torch.Tensor:
    """The value checks of a loss on logits [N, V] (kdkernels._checks: teacher, labels, then the
    student), as an op: under torch.compile they run when the graph runs, and still raise the
    ValueError naming the argument. Returns a float32 zero that the caller adds to its reduction
    scale, so the compiled graph keeps the op."""
    _checks.check_logit_values(student_logits, teacher_logits, labels, ignore_index, log_q_by_teacher, ce_weight,
                               log_p_by_student)
    return torch.zeros((), dtype=torch.float32, device=student_logits.device)


@check_logit_values.register_fake
def _check_logit_values_fake(student_logits, teacher_logits, labels, ignore_index, log_q_by_teacher, ce_weight,
                             log_p_by_student=False):
    return torch.empty((), dtype=torch.float32, device=student_logits.device)


def fake_row_loss(student_logits: torch.Tensor) -> torch.Tensor:
    """What every fused row op returns first: one float32 loss per row of `student_logits` [N, V]."""
    return student_logits.new_empty((student_logits.shape[0],), dtype=torch.float32)


def fake_row_loss_and_grad(student_logits: torch.Tensor, compute_grad: bool):
    """The outputs of a fused row op that also returns the gradient: row losses [N] and a contiguous
    gradient like `student_logits` (an empty tensor when compute_grad is off)."""
    grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format) if compute_grad \
        else student_logits.new_empty((0,))
    return fake_row_loss(student_logits), grad


def _register_fakes() -> None:
    @torch.library.register_fake("kdkernels::kd_loss_fwd")
    def _kd_loss_fwd_fake(student_logits, teacher_logits, labels, grad_scale, divergence, temperature,
                          beta, kd_weight, ce_weight, scale_by_t2, ignore_index, compute_grad):
        return fake_row_loss_and_grad(student_logits, compute_grad)

    @torch.library.register_fake("kdkernels::kd_loss_fwd_inplace_")
    def _kd_loss_fwd_inplace_fake(student_logits, teacher_logits, labels, grad_scale, divergence, temperature,
                                  beta, kd_weight, ce_weight, scale_by_t2, ignore_index):
        return fake_row_loss(student_logits)

    @torch.library.register_fake("kdkernels::empty_cached")
    def _empty_cached_fake(size, dtype):
        return torch.empty(size, dtype=dtype)

    @torch.library.register_fake("kdkernels::addmm_widening_")
    def _addmm_widening_fake(out, mat1, mat2, beta, alpha):
        return None

    @torch.library.register_fake("kdkernels::cakd_loss_fwd")
    def _cakd_loss_fwd_fake(student_logits, teacher_logits, labels, grad_scale, group_rule, top_k, mass,
                            bcd_weight, scd_weight, wcd_weight, scd_teacher_mass, wcd_teacher_mass,
                            temperature, scale_by_t2, ignore_index, compute_grad):
        row_loss, grad = fake_row_loss_and_grad(student_logits, compute_grad)
        components = student_logits.new_empty((student_logits.shape[0], 3), dtype=torch.float32)  # BCD, SCD, WCD
        return row_loss, components, grad


if _extension.cpu_available() or _extension.cuda_available():
    _register_fakes()
