"""Fake (meta) implementations of the compiled ops, so shapes propagate under torch.compile and
torch.library.opcheck passes (registered only when the compiled library is loaded), and the one
op written in Python: the value checks of a loss on logits, opaque to torch.compile."""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels import _checks, _extension


@torch.library.custom_op("kdkernels::check_logit_values", mutates_args=())
def check_logit_values(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                       ignore_index: int, log_q_by_teacher: bool, ce_weight: float) -> torch.Tensor:
    """The value checks of a loss on logits [N, V] (kdkernels._checks: teacher, labels, then the
    student), as an op: under torch.compile they run when the graph runs, and still raise the
    ValueError naming the argument. Returns a float32 zero that the caller adds to its reduction
    scale, so the compiled graph keeps the op."""
    _checks.check_logit_values(student_logits, teacher_logits, labels, ignore_index, log_q_by_teacher, ce_weight)
    return torch.zeros((), dtype=torch.float32, device=student_logits.device)


@check_logit_values.register_fake
def _check_logit_values_fake(student_logits, teacher_logits, labels, ignore_index, log_q_by_teacher, ce_weight):
    return torch.empty((), dtype=torch.float32, device=student_logits.device)


def _register_fakes() -> None:
    @torch.library.register_fake("kdkernels::kd_loss_fwd")
    def _kd_loss_fwd_fake(student_logits, teacher_logits, labels, grad_scale, divergence, temperature,
                          beta, kd_weight, ce_weight, scale_by_t2, ignore_index, compute_grad):
        n = student_logits.shape[0]
        row_loss = student_logits.new_empty((n,), dtype=torch.float32)
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format) if compute_grad \
            else student_logits.new_empty((0,))
        return row_loss, grad

    @torch.library.register_fake("kdkernels::kd_loss_fwd_inplace_")
    def _kd_loss_fwd_inplace_fake(student_logits, teacher_logits, labels, grad_scale, divergence, temperature,
                                  beta, kd_weight, ce_weight, scale_by_t2, ignore_index):
        return student_logits.new_empty((student_logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("kdkernels::empty_cached")
    def _empty_cached_fake(size, dtype):
        return torch.empty(size, dtype=dtype)

    @torch.library.register_fake("kdkernels::cakd_loss_fwd")
    def _cakd_loss_fwd_fake(student_logits, teacher_logits, labels, grad_scale, group_rule, top_k, mass,
                            bcd_weight, scd_weight, wcd_weight, scd_teacher_mass, wcd_teacher_mass,
                            temperature, scale_by_t2, ignore_index, compute_grad):
        # the same outputs as the KD op's; the divergence options (forward_kl, beta, kd_weight,
        # ce_weight) do not change their shapes
        row_loss, grad = _kd_loss_fwd_fake(student_logits, teacher_logits, labels, grad_scale, 0,
                                           temperature, 0.5, 1.0, 0.0, scale_by_t2, ignore_index,
                                           compute_grad)
        components = student_logits.new_empty((student_logits.shape[0], 3), dtype=torch.float32)
        return row_loss, components, grad


if _extension.cpu_available() or _extension.cuda_available():
    _register_fakes()
