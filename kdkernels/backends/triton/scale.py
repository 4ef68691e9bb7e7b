"""Scaling a gradient by the incoming gradient on the GPU, without reading it on the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.backends.triton.kd_loss import _on_device


@triton.jit
def _scale_unless_one_kernel(
    grad_ptr,  # [numel] contiguous, scaled in place
    factor_ptr,  # [] the incoming gradient
    numel,
    BLOCK: tl.constexpr,
):
    # Reads the factor on the device: when it is 1 (a loss that is not scaled further) every
    # program returns at once, and the gradient is not touched.
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_range = offs < numel
            g = tl.load(grad_ptr + offs, mask=in_range).to(tl.float32)
            tl.store(grad_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=in_range)


def scale_unless_one_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad *= factor (a one-element tensor on grad's device), in place, without the pass over
    grad when factor is 1 and without reading factor on the host: the backward of a fused loss
    on CUDA, where looking at the incoming gradient from the host would synchronise."""
    if not grad.is_contiguous():
        return grad.mul_(factor.to(grad.dtype))
    block = 4096
    programs = max(1, min(triton.cdiv(grad.numel(), block), 1024))
    with _on_device(grad.device):
        _scale_unless_one_kernel[(programs,)](grad, factor.reshape(()).to(device=grad.device), grad.numel(),
                                              BLOCK=block, num_warps=8)
    return grad
