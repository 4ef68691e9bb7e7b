"""The autograd Function of the fused row kernels: the gradient is computed in the forward pass by
the backend kernel (already multiplied by the reduction factor), so backward only scales it by the
incoming gradient, in place, and skips even that when the incoming gradient is 1."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kdkernels import backends
from kdkernels.ops.reduction import reduce_rows


def is_one(grad_output: torch.Tensor) -> bool:
    # Only looked at on CPU, where reading the value costs no device synchronisation.
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """grad *= grad_output (a scalar, or one value per row when per_row), in place."""
    if per_row:
        return grad.mul_(grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype))
    if is_one(grad_output):
        return grad
    if grad.device.type == "cuda" and backends.usable("triton", grad):
        # On the GPU the value is not read on the host (no sync); the kernel skips the pass
        # over grad when it is 1.
        from kdkernels.backends.triton.kd_loss import scale_unless_one_

        return scale_unless_one_(grad, grad_output)
    return grad.mul_(grad_output.to(grad.dtype))


class FusedRowsFunction(torch.autograd.Function):
    """(reduce(row_loss), extras) of route.rows(student, teacher, labels), with the gradient that
    route.rows computed in the forward pass; extras (e.g. CAKD's components) carry no gradient."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], scale: torch.Tensor, cfg, reduction: str,
                batch_shape: Tuple[int, ...], route) -> Tuple[torch.Tensor, torch.Tensor]:
        row_loss, extras, grad = route.rows(student_logits, teacher_logits, labels, scale, cfg, True)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        ctx.consumed = False
        extras = row_loss.new_empty(0) if extras is None else extras
        ctx.mark_non_differentiable(extras)
        return reduce_rows(row_loss, scale, reduction, batch_shape), extras

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_extras: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.consumed:
            raise RuntimeError(
                "kdkernels: backward through a fused loss a second time is not supported "
                "(its gradient buffer is scaled in place); compute the loss again")
        ctx.consumed = ctx.per_row or not is_one(grad_output)
        return scale_grad_(grad, grad_output, ctx.per_row), None, None, None, None, None, None, None
