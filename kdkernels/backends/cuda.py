"""The compiled CUDA kernels (csrc/cuda), through the ops the CPU kernels also implement:
torch.ops.kdkernels.kd_loss_fwd and kd_loss_fwd_inplace_ dispatch on the tensors' device, so
``rows`` and ``rows_inplace`` (the gradient written over the student logits, which the fused lm_head
loss uses to reuse one chunk buffer) are the CPU backend's own calls. Loaded by
kdkernels._extension as the module kdkernels._C_cuda.

Bad values are found in-stream: a row whose logits contain NaN or +inf, or whose label is neither
``ignore_index`` nor in [0, V), gets a NaN loss and a NaN gradient row (as on Triton);
kdkernels.ops.route checks them through kdkernels._reports (a device assertion without host
synchronisation by default, the ValueError in strict mode).
"""

from __future__ import annotations

from kdkernels.backends.cpu import rows, rows_inplace

# The kernel reports bad values in-stream, as NaN row losses (module docstring).
CHECKS_VALUES = True
BAD_INPUT_AS_NAN = True

__all__ = ["BAD_INPUT_AS_NAN", "CHECKS_VALUES", "rows", "rows_inplace"]
