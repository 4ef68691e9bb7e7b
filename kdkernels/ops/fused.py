"""The autograd side of the fused kernels, whose gradient is computed in the forward pass (already
multiplied by the reduction factor): backward only scales the saved gradient by the incoming one.

Saved-gradient rule. When autograd will not run the node again (no ``retain_graph`` /
``create_graph``, the common ``loss.backward()``), backward hands out the saved buffer itself,
scaled in place when the incoming gradient is not 1 (no copy; on CPU not even a pass when it is
1). When the graph is kept, a later backward would read the buffer again, and a gradient handed
out now can be written later (autograd accumulates into ``x.grad`` in place, and may adopt the
handed-out tensor as ``x.grad``), so backward returns a new tensor and never writes the buffer.
Under torch.compile it always returns a new tensor. The product is formed in float32 and rounded
once (:func:`times`); a per-row loss (reduction="none") of a bfloat16 / float16 student keeps its
gradient in float32 until backward, so each row's incoming gradient multiplies it before that
one rounding.

The fused kernels are first-order: differentiating their gradient again raises (as
``torch.autograd.function.once_differentiable`` does) with a message pointing to
``backend="reference"``, whose formula autograd differentiates to any order.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from kdkernels import backends
from kdkernels._config import math_dtype
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


# Elements of a gradient scaled at a time on CPU when dtypes mix (see times): one small float32 copy.
_CPU_BLOCK_ELEMENTS = 1 << 20


def times(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool, *, in_place: bool = False,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """grad * grad_output in `dtype` (default grad's): written over grad when in_place and grad
    has that dtype, else into a new tensor; with grad_output a 0-dim tensor or, per_row, one value per row of grad [N, ...]. The
    product is formed in float32 (float64 for float64) and rounded once to the result's dtype:
    grad_output is never rounded to bfloat16 / float16 first."""
    dtype = grad.dtype if dtype is None else dtype
    factor = grad_output.to(math_dtype(dtype))
    if per_row:
        factor = factor.reshape(grad.shape[0], *([1] * (grad.dim() - 1)))
    elif grad.device.type != "cpu":
        # a 0-dim device tensor would be cast to grad's dtype before the product; a 1-element one
        # promotes it to float32. (A 0-dim CPU tensor is applied as a float32 scalar, no copy.)
        factor = factor.reshape([1] * grad.dim())
    if torch.compiler.is_compiling():  # fused by the compiler: no float32 tensor of grad's size
        return (grad.to(factor.dtype) * factor).to(dtype)
    out = grad if in_place and grad.dtype == dtype else torch.empty_like(grad, dtype=dtype)
    if grad.device.type != "cpu" or grad.dtype == dtype == factor.dtype or (not per_row and grad.dtype == dtype):
        return torch.mul(grad, factor, out=out)
    # CPU with mixed dtypes: the product would make float32 temporaries of grad's size; a block of
    # rows at a time bounds that to one small one.
    rows = max(1, _CPU_BLOCK_ELEMENTS // max(1, grad[:1].numel()))
    for start in range(0, grad.shape[0], rows):
        end = start + rows
        out[start:end].copy_(grad[start:end].to(factor.dtype, copy=True).mul_(factor[start:end] if per_row else factor))
    return out


def _scale_in_place(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    if not per_row and grad.device.type == "cuda" and grad.is_contiguous() and backends.usable("triton", grad):
        # On the GPU the value is not read on the host (no sync); the kernel skips the pass
        # over grad when it is 1.
        from kdkernels.backends.triton.scale import scale_unless_one_

        return scale_unless_one_(grad, grad_output)
    return times(grad, grad_output, per_row, in_place=True)


def scale_saved_grads(grads: Sequence[Optional[torch.Tensor]], grad_output: torch.Tensor,
                      per_row: bool) -> List[Optional[torch.Tensor]]:
    """The saved gradients times grad_output, by the saved-gradient rule (module docstring)."""
    if torch.compiler.is_compiling() or _graph_kept():
        return [None if g is None else times(g, grad_output, per_row) for g in grads]
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
        ctx.per_row = reduction == "none"
        ctx.dtype = student_logits.dtype
        if ctx.per_row and student_logits.itemsize < 4:
            # Each row's incoming gradient multiplies the saved gradient in backward: kept in
            # float32 (the kernel given the same logits in float32), so that the product is
            # rounded to bfloat16 / float16 once, as eager PyTorch rounds it.
            student_logits = student_logits.float()
        row_loss, extras, grad = route.rows(student_logits, teacher_logits, labels, scale, cfg, True)
        loss = reduce_rows(row_loss, scale, reduction, batch_shape)
        ctx.save_for_backward(grad, loss)
        extras = row_loss.new_empty(0) if extras is None else extras
        ctx.mark_non_differentiable(extras)
        return loss, extras

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_extras: torch.Tensor):
        grad, loss = ctx.saved_tensors
        with torch.no_grad():
            if grad.dtype != ctx.dtype:  # the float32 gradient of a per-row loss: never handed out itself
                grad = times(grad, grad_output, ctx.per_row, dtype=ctx.dtype)
            else:
                (grad,) = scale_saved_grads([grad], grad_output, ctx.per_row)
        return (*first_order([grad], loss), None, None, None, None, None, None, None)
