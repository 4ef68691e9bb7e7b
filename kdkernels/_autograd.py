"""The autograd Function shared by every fused loss: the gradient is computed in the forward
pass by the backend kernel (already multiplied by the reduction factor), so backward only scales
it by the incoming gradient, in place, and skips even that when the incoming gradient is 1."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from kdkernels import _dispatch
from kdkernels._config import KDConfig


def reduction_scale(labels: Optional[torch.Tensor], ignore_index: int, reduction: str,
                    n_rows: int, batch_shape: Sequence[int], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The factor on sum(row_loss) that gives the reduced loss, as a 0-dim tensor on the logits'
    device (no host sync): 1/valid rows (mean), 1/size(0) (batchmean, as F.kl_div), 1.
    float32 for the kernels (the backend contract); float64 for float64 reference losses."""
    if reduction == "mean":
        if labels is None:
            return torch.tensor(1.0 / max(n_rows, 1), dtype=dtype, device=device)
        valid = (labels != ignore_index).sum().clamp(min=1)
        return valid.to(dtype).reciprocal()
    if reduction == "batchmean":
        return torch.tensor(1.0 / max(batch_shape[0], 1), dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)


def reduce_rows(row_loss: torch.Tensor, scale: torch.Tensor, reduction: str,
                batch_shape: Sequence[int]) -> torch.Tensor:
    if reduction == "none":
        return row_loss.reshape(tuple(batch_shape))
    return row_loss.sum() * scale.to(row_loss.dtype)


def _is_one(grad_output: torch.Tensor) -> bool:
    # Only looked at on CPU, where reading the value costs no device synchronisation.
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """grad *= grad_output (a scalar, or one value per row when per_row), in place."""
    if per_row:
        return grad.mul_(grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype))
    if _is_one(grad_output):
        return grad
    if grad.device.type == "cuda" and _dispatch.usable("triton", grad):
        # On the GPU the value is not read on the host (no sync); the kernel skips the pass
        # over grad when it is 1.
        from kdkernels.backends.triton.kd_loss import scale_unless_one_

        return scale_unless_one_(grad, grad_output)
    return grad.mul_(grad_output.to(grad.dtype))


RowsFn = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


class FusedKDFunction(torch.autograd.Function):
    """loss = reduce(rows_fn(student, teacher, labels)) with the gradient from rows_fn."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], scale: torch.Tensor, cfg: KDConfig, reduction: str,
                batch_shape: Tuple[int, ...], rows_fn: RowsFn) -> torch.Tensor:
        row_loss, grad = rows_fn(student_logits, teacher_logits, labels, scale, cfg, True)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        ctx.consumed = False
        return reduce_rows(row_loss, scale, reduction, batch_shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.consumed:
            raise RuntimeError(
                "kdkernels: backward through a fused loss a second time is not supported "
                "(its gradient buffer is scaled in place); compute the loss again")
        ctx.consumed = ctx.per_row or not _is_one(grad_output)
        return scale_grad_(grad, grad_output, ctx.per_row), None, None, None, None, None, None, None


def fused_rows_loss(student_2d: torch.Tensor, teacher_2d: torch.Tensor, labels_1d: Optional[torch.Tensor],
                    cfg: KDConfig, reduction: str, batch_shape: Tuple[int, ...], rows_fn: RowsFn
                    ) -> torch.Tensor:
    """Runs a backend's rows_fn under the fused Function, or without any gradient work when no
    gradient is wanted (torch.no_grad(), or a student that does not require grad)."""
    scale = reduction_scale(labels_1d, cfg.ignore_index, reduction, student_2d.shape[0], batch_shape,
                            student_2d.device)
    # The teacher never receives a gradient: detached on both paths, so a teacher that requires
    # grad does not put the compiled op (which has no autograd formula) into the graph.
    teacher_2d = teacher_2d.detach()
    if torch.is_grad_enabled() and student_2d.requires_grad:
        return FusedKDFunction.apply(student_2d, teacher_2d, labels_1d, scale, cfg, reduction,
                                     tuple(batch_shape), rows_fn)
    row_loss, _ = rows_fn(student_2d, teacher_2d, labels_1d, scale, cfg, False)
    return reduce_rows(row_loss, scale, reduction, batch_shape)
