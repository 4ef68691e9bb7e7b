"""kdkernels: fused knowledge-distillation losses for PyTorch."""

from kdkernels import _extension, _ops  # noqa: F401  (loads the compiled kernels)
from kdkernels import nn
from kdkernels.functional import kd_loss
from kdkernels.features import attention_transfer_loss, feature_alignment_loss
from kdkernels.cakd import cakd_loss, dkd_loss
from kdkernels.fused_linear import fused_linear_kd_loss

__version__ = "0.1.0"


def backend_info() -> dict:
    """Which compiled kernels this process loaded: the CPU build (``avx512``/``avx2``/``default``
    or None), its vector width and threading runtime, and whether the CUDA build is present."""
    return _extension.info()


__all__ = ["kd_loss", "feature_alignment_loss", "attention_transfer_loss", "cakd_loss", "dkd_loss", "fused_linear_kd_loss", "nn", "backend_info", "__version__"]
