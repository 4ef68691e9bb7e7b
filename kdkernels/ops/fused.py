"""The autograd side of the fused kernels, whose gradient is computed in the forward pass (already
multiplied by the reduction factor): backward only scales the saved gradient by the incoming one.

Saved-gradient rule. When autograd will not run the node again (no ``retain_graph`` /
``create_graph``, the common ``loss.backward()``), backward hands out the saved buffer itself,
scaled in place when the incoming gradient is not 1 (no copy; on CPU not even a pass when it is
1). When the graph is kept, a later backward would read the buffer again, and a gradient handed
out now can be written later (autograd accumulates into ``x.grad`` in place, and may adopt the
handed-out tensor as ``x.grad``), so backward returns a new tensor and never writes the buffer.
Under torch.compile it always returns a new tensor.

The fused kernels are first-order: differentiating their gradient again raises (as
``torch.autograd.function.once_differentiable`` does) with a message pointing to
``backend="reference"``, whose formula autograd differentiates to any order.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from kdkernels import backends
from kdkernels.ops.reduction import reduce_rows

FIRST_ORDER_MESSAGE = (
    "kdkernels: the fused kernels compute first-order gradients only, so this loss cannot be "
    "differentiated twice (create_graph=True, gradient penalties); use backend='reference' for "
    "higher-order gradients")


def is_one(grad_output: torch.Tensor) -> bool:
    # Only looked at on CPU, where reading the value costs no device synchronisation, and never
    # under torch.compile, where it would be a data-dependent branch.
    return (grad_output.device.type == "cpu" and grad_output.numel() == 1
            and not torch.compiler.is_compiling() and float(grad_output) == 1.0)


def _graph_kept() -> bool:
    """Whether autograd may run the current backward's nodes again (retain_graph / create_graph);
    True when it cannot tell."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _factor(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """grad_output shaped to broadcast over grad: a scalar, or one value per row."""
    if per_row:
        return grad_output.reshape(grad.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype)
    return grad_output.to(grad.dtype)


def _scale_in_place(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    if not per_row and grad.device.type == "cuda" and backends.usable("triton", grad):
        # On the GPU the value is not read on the host (no sync); the kernel skips the pass
        # over grad when it is 1.
        from kdkernels.backends.triton.kd_loss import scale_unless_one_

        return scale_unless_one_(grad, grad_output)
    return grad.mul_(_factor(grad, grad_output, per_row))


def scale_saved_grads(grads: Sequence[Optional[torch.Tensor]], grad_output: torch.Tensor,
                      per_row: bool) -> List[Optional[torch.Tensor]]:
    """The saved gradients times grad_output, by the saved-gradient rule (module docstring)."""
    if torch.compiler.is_compiling() or _graph_kept():
        return [None if g is None else g * _factor(g, grad_output, per_row) for g in grads]
    if not per_row and is_one(grad_output):
        return list(grads)
    return [None if g is None else _scale_in_place(g, grad_output, per_row) for g in grads]


class _RaisesWhenDifferentiated(torch.autograd.Function):
    """grad, unchanged, attached to `anchor` (an output of the fused Function) so that it lies on
    every path from a first-order gradient back to the loss's inputs; differentiating it raises."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(FIRST_ORDER_MESSAGE)


def first_order(grads: Sequence[Optional[torch.Tensor]],
                anchor: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """grads as backward's result. When autograd records a graph of the backward pass
    (create_graph=True), each comes out of a node that raises FIRST_ORDER_MESSAGE if anything
    differentiates through it, instead of silently lacking the second derivative.

    anchor: the Function's loss output (saved for backward), which ties that node to the loss's
    inputs, so that torch.autograd.grad(..., inputs) reaches it too. Without one the node hangs
    from a detached copy, which only a backward over every leaf reaches (pass the anchor)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuple(grads)
    if anchor is None:
        anchor = torch.zeros((), requires_grad=True)
    return tuple(None if g is None else _RaisesWhenDifferentiated.apply(g, anchor) for g in grads)


class FusedRowsFunction(torch.autograd.Function):
    """(reduce(row_loss), extras) of route.rows(student, teacher, labels), with the gradient that
    route.rows computed in the forward pass; extras (e.g. CAKD's components) carry no gradient."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], scale: torch.Tensor, cfg, reduction: str,
                batch_shape: Tuple[int, ...], route) -> Tuple[torch.Tensor, torch.Tensor]:
        row_loss, extras, grad = route.rows(student_logits, teacher_logits, labels, scale, cfg, True)
        loss = reduce_rows(row_loss, scale, reduction, batch_shape)
        ctx.save_for_backward(grad, loss)
        ctx.per_row = reduction == "none"
        extras = row_loss.new_empty(0) if extras is None else extras
        ctx.mark_non_differentiable(extras)
        return loss, extras

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_extras: torch.Tensor):
        grad, loss = ctx.saved_tensors
        with torch.no_grad():
            (grad,) = scale_saved_grads([grad], grad_output, ctx.per_row)
        return (*first_order([grad], loss), None, None, None, None, None, None, None)
