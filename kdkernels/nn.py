"""nn.Module wrappers over kdkernels.functional: the options are fixed at construction."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdkernels import functional
from kdkernels.features import AttentionTransferLoss, FeatureAlignmentLoss  # noqa: F401  (public here)
from kdkernels.cakd import cakd_loss, dkd_loss
from kdkernels.fused_linear import fused_linear_kd_loss
from kdkernels.sparse import SparseKDLoss  # noqa: F401  (public here)
from kdkernels.fused_linear_sparse import FusedLinearSparseKDLoss  # noqa: F401  (public here)


class KDLoss(nn.Module):
    """Module form of :func:`kdkernels.kd_loss`; keyword arguments are kd_loss's options.

    Example::

        criterion = KDLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_logits, teacher_logits, labels)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = dict(options)
        # Validate the options now rather than at the first forward.
        probe = torch.zeros(1, 2)
        labels = torch.zeros(1, dtype=torch.long) if self.options.get("ce_weight", 0) else None
        with torch.no_grad():
            functional.kd_loss(probe, probe, labels, **{**self.options, "backend": "reference"})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`kdkernels.fused_linear_kd_loss` (lm_head + KD loss in token chunks);
    keyword arguments are its options: chunk_size, softcap, logit_scale and kd_loss's options.

    Example::

        criterion = FusedLinearKDLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_hidden, student.lm_head.weight, teacher_hidden,
                         teacher.lm_head.weight, labels)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = dict(options)
        # Validate the options now rather than at the first forward.
        labels = torch.zeros(1, dtype=torch.long) if self.options.get("ce_weight", 0) else None
        with torch.no_grad():
            fused_linear_kd_loss(torch.zeros(1, 1), torch.zeros(2, 1), labels=labels,
                                 teacher_logits=torch.zeros(1, 2), **{**self.options, "backend": "reference"})

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, teacher_logits: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    teacher_logits=teacher_logits, student_bias=student_bias,
                                    teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class _DecomposedKLLoss(nn.Module):
    """Options fixed at construction (validated then) over a decomposed-KL loss function."""

    loss_fn = staticmethod(cakd_loss)

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = dict(options)
        probe = torch.zeros(1, 2)
        with torch.no_grad():
            type(self).loss_fn(probe, probe, torch.zeros(1, dtype=torch.long),
                               **{**self.options, "backend": "reference"})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None):
        return type(self).loss_fn(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CAKDLoss(_DecomposedKLLoss):
    """Module form of :func:`kdkernels.cakd_loss`; keyword arguments are its options.

    Example::

        criterion = CAKDLoss(groups="teacher_topk", k=5, bcd_weight=1.0, scd_weight=1.0,
                             wcd_weight=2.0, temperature=2.0)
        loss = criterion(student_logits, teacher_logits, labels)   # labels optional here
    """

    loss_fn = staticmethod(cakd_loss)


class DKDLoss(_DecomposedKLLoss):
    """Module form of :func:`kdkernels.dkd_loss` (labels required); keyword arguments are its options.

    Example::

        criterion = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
        loss = criterion(student_logits, teacher_logits, labels)
    """

    loss_fn = staticmethod(dkd_loss)

