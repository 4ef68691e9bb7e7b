"""Triton GPU kernels, one module per loss family. On CPU tensors they run only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which the tests use."""

from kdkernels.backends.triton.cakd import cakd_rows
from kdkernels.backends.triton.kd_loss import BAD_INPUT_AS_NAN, CHECKS_VALUES, rows, rows_inplace
from kdkernels.backends.triton.sparse import sparse_rows, sparse_rows_inplace

__all__ = ["BAD_INPUT_AS_NAN", "CHECKS_VALUES", "cakd_rows", "rows", "rows_inplace", "sparse_rows",
           "sparse_rows_inplace"]
