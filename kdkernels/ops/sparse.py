"""The road of the sparse-teacher losses (kdkernels.sparse): the same Route, fused Function and
lm_head chunk loop as the dense losses, with a SparseTeacher (ids and values [N, k]) where they
pass teacher logits. Backends offer the family as ``sparse_rows`` / ``sparse_rows_inplace``
(kdkernels.backends: the contract of ``rows`` / ``rows_inplace`` with a SparseTeacher)."""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels._sparse_checks import SparseConfig, SparseTeacher
from kdkernels.backends.reference import sparse as reference_sparse
from kdkernels.ops import fused
from kdkernels.ops.fused_linear import (DEFAULT_CHUNK_BYTES, FusedLinearKDFunction, Wanted, _LinearLogits, _Plan,
                                        _run_chunks, chunk_rows)
from kdkernels.ops.reduction import reduce_rows
from kdkernels.ops.route import Family, Route

SPARSE = Family(entry="sparse_rows", title="sparse-teacher", formula=reference_sparse.row_loss)

# The lm_head chunk loop's memory budget is this share of the dense loop's (DEFAULT_CHUNK_BYTES):
# with no teacher logits, a float32 chunk then has the rows of the dense loop's (student + teacher
# logits), and so the same GEMM shapes, at half the memory. At V=128000 a chunk holds 77 MiB
# (N=4096: 158 rows in float32, 316 in bfloat16), so that a bfloat16 lm_head (H=1024) fits its
# gradients, their float32 accumulators (_run_weight_halves) and a chunk in 512 MiB beyond the inputs.
SPARSE_CHUNK_BYTES_SHARE = 0.5


class SparseRoute(Route):
    """A Route of the sparse family: its in-place kernel is ``sparse_rows_inplace``, and it has no
    value checks to add (the teacher's ids and values are checked at the public call; the kernels
    check the student)."""

    def __init__(self, backend: str, tensor: torch.Tensor) -> None:
        super().__init__(SPARSE, backend, tensor)

    @property
    def has_inplace(self) -> bool:
        return hasattr(self.module, "sparse_rows_inplace")

    def check_values(self, *unused) -> None:
        pass

    def rows_inplace(self, student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
                     grad_scale: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
        return self.module.sparse_rows_inplace(student_logits, teacher, labels, grad_scale, cfg)


def sparse_loss(student_logits: torch.Tensor, teacher: SparseTeacher, labels: torch.Tensor, cfg: SparseConfig,
                reduction: str, backend: str) -> torch.Tensor:
    """The validated call of kdkernels.sparse_kd_loss: student logits [..., V], teacher [N, k],
    labels [N] (all-padding rows already ignore_index)."""
    route = SparseRoute(backend, student_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    student = student_logits.reshape(-1, student_logits.shape[-1])
    scale = route.grad_scale(labels, cfg.ignore_index, reduction, student.shape[0], batch_shape, student.device)
    if route.differentiable:
        row_loss = reference_sparse.row_loss(student, teacher, labels, cfg)
        reference_sparse.check_row_loss(row_loss.detach())
        return reduce_rows(row_loss, scale, reduction, batch_shape)
    if torch.is_grad_enabled() and student.requires_grad:
        loss, _ = fused.FusedRowsFunction.apply(student, teacher, labels, scale, cfg, reduction, batch_shape, route)
        return loss
    row_loss, _, _ = route.rows(student, teacher, labels, scale, cfg, False)
    return reduce_rows(row_loss, scale, reduction, batch_shape)


def fused_linear_sparse_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             student_bias: Optional[torch.Tensor], teacher: SparseTeacher, labels: torch.Tensor,
                             cfg: SparseConfig, reduction: str, backend: str, chunk_size: Optional[int],
                             softcap: Optional[float], logit_scale: float) -> torch.Tensor:
    """The validated call of kdkernels.fused_linear_sparse_kd_loss: the dense fused-linear chunk loop
    (kdkernels.ops.fused_linear) with the sparse row kernels; no teacher logits exist."""
    route = SparseRoute(backend, student_hidden)
    batch_shape = tuple(student_hidden.shape[:-1])
    student = _LinearLogits(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
                            logit_scale, softcap)
    if route.differentiable:
        # The definition itself: whole logits, then the reference formula; differentiable to any
        # order, memory growing with tokens x vocabulary.
        counted = labels != cfg.ignore_index  # the effective labels: all-padding rows are ignored too
        loss = sparse_loss(student.full(student.vocab, counted), teacher, labels, cfg, reduction, "reference")
        return loss.reshape(batch_shape) if reduction == "none" else loss
    n_rows = student.hidden.shape[0]
    wanted = Wanted(student_hidden.requires_grad, student_weight.requires_grad,
                    student_bias is not None and student_bias.requires_grad)
    wanted = wanted if torch.is_grad_enabled() else Wanted.none()
    inplace = route.has_inplace and softcap is None
    if chunk_size is None:
        # student logits (+ the kernel's gradient unless written over them) per vocabulary entry
        # of a row; a low-precision lm_head's float32 copies go in blocks of COPY_BLOCK_BYTES
        per_entry = student.dtype.itemsize * (1 if inplace or not any(wanted) else 2)
        chunk_size = chunk_rows(n_rows, student.vocab, per_entry, student_hidden.device.type,
                                int(SPARSE_CHUNK_BYTES_SHARE * DEFAULT_CHUNK_BYTES.get(student_hidden.device.type,
                                                                                       DEFAULT_CHUNK_BYTES["cpu"])))
    plan = _Plan(cfg=cfg, reduction=reduction, batch_shape=batch_shape, vocab=student.vocab, chunk_size=chunk_size,
                 route=route, inplace=inplace, weight_halves=True)
    grad_scale = route.grad_scale(labels, cfg.ignore_index, reduction, n_rows, batch_shape, student_hidden.device)
    if any(wanted):
        return FusedLinearKDFunction.apply(student.hidden, student_weight, student_bias, student, teacher, labels,
                                           grad_scale, plan, wanted)
    row_loss, _ = _run_chunks(plan, student, teacher, labels, grad_scale, wanted)
    return reduce_rows(row_loss, grad_scale, reduction, batch_shape)
