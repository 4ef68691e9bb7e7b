"""kdkernels: fused knowledge-distillation losses for PyTorch."""

import torch

from kdkernels import _extension, _ops  # noqa: F401  (loads the compiled kernels)
from kdkernels import nn
from kdkernels._reports import set_value_checks
from kdkernels.functional import (attention_transfer_loss, cakd_loss, dkd_loss, feature_alignment_loss,
                                  fused_linear_kd_loss, kd_loss)
from kdkernels.sparse import fused_linear_sparse_kd_loss, sparse_kd_loss

__version__ = "0.1.0"


def backend_info() -> dict:
    """Which compiled kernels this process loaded: the CPU build (``avx512``/``avx2``/``default``
    or None), its vector width and threading runtime, and whether the CUDA build is present."""
    return _extension.info()


def empty_cpu_cache() -> int:
    """Unmaps the CPU gradient buffers kept for reuse and returns how many bytes that freed.

    The compiled CPU kernels keep the mappings of up to four freed buffers (``[N, V]``
    gradients, fused-linear chunks and accumulators) and hand them to the next call that needs
    one of (nearly) that size: its pages are already resident, which spares the page faults and
    zeroing of fresh memory every training step. Set
    ``KDKERNELS_CPU_BUFFER_CACHE=0`` before the first call to unmap on free instead."""
    return torch.ops.kdkernels.release_cached_buffers() if _extension.cpu_available() else 0


__all__ = ["kd_loss", "feature_alignment_loss", "attention_transfer_loss", "cakd_loss", "dkd_loss",
           "fused_linear_kd_loss", "sparse_kd_loss", "fused_linear_sparse_kd_loss", "nn", "backend_info", "empty_cpu_cache",
           "set_value_checks", "__version__"]
