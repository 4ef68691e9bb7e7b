"""nn.Module forms of the public losses (kdkernels.functional): the options are fixed, and
validated, at construction; ``forward`` takes the tensors."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from kdkernels import _checks, functional, sparse
from kdkernels.ops.features import FEATURE_KINDS


class _LossModule(nn.Module):
    """Options fixed at construction over a loss function of kdkernels.functional.

    ``forward`` takes the function's tensor arguments, positional as in its signature. Subclasses
    name the function (``loss_fn``) and a tiny call that validates the options at construction
    rather than at the first forward (``_probe``, run under no_grad on the reference backend
    where the function takes a backend)."""

    loss_fn: Callable = staticmethod(functional.kd_loss)

    def __init__(self, **options) -> None:
        super().__init__()
        self.options: Dict[str, Any] = dict(options)
        with torch.no_grad():
            self._probe()

    def _probe(self) -> None:
        probe = torch.zeros(1, 2)
        labels = torch.zeros(1, dtype=torch.long)
        type(self).loss_fn(probe, probe, labels, **{**self.options, "backend": "reference"})

    def forward(self, *tensors, **more) -> Any:
        return type(self).loss_fn(*tensors, **more, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KDLoss(_LossModule):
    """Module form of :func:`kdkernels.kd_loss`; keyword arguments are kd_loss's options.

    Example::

        criterion = KDLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_logits, teacher_logits, labels)
    """

    loss_fn = staticmethod(functional.kd_loss)


class FusedLinearKDLoss(_LossModule):
    """Module form of :func:`kdkernels.fused_linear_kd_loss` (lm_head + KD loss in token chunks);
    keyword arguments are its options: chunk_size, softcap, logit_scale and kd_loss's options.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
    labels=None, *, teacher_logits=None, student_bias=None, teacher_bias=None)``.

    Example::

        criterion = FusedLinearKDLoss(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_hidden, student.lm_head.weight, teacher_hidden,
                         teacher.lm_head.weight, labels)
    """

    loss_fn = staticmethod(functional.fused_linear_kd_loss)

    def _probe(self) -> None:
        labels = torch.zeros(1, dtype=torch.long)
        functional.fused_linear_kd_loss(torch.zeros(1, 1), torch.zeros(2, 1), labels=labels,
                                        teacher_logits=torch.zeros(1, 2),
                                        **{**self.options, "backend": "reference"})


class CAKDLoss(_LossModule):
    """Module form of :func:`kdkernels.cakd_loss`; keyword arguments are its options.

    Example::

        criterion = CAKDLoss(groups="teacher_topk", k=5, bcd_weight=1.0, scd_weight=1.0,
                             wcd_weight=2.0, temperature=2.0)
        loss = criterion(student_logits, teacher_logits, labels)   # labels optional here
    """

    loss_fn = staticmethod(functional.cakd_loss)


class DKDLoss(_LossModule):
    """Module form of :func:`kdkernels.dkd_loss` (labels required); keyword arguments are its
    options, e.g. ``DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)``."""

    loss_fn = staticmethod(functional.dkd_loss)


class FeatureAlignmentLoss(_LossModule):
    """Hint loss (:func:`kdkernels.feature_alignment_loss`) with its learned projection
    ``nn.Linear(student_dim, teacher_dim)``.

    Add this module's parameters to the optimizer next to the student's. With equal widths and
    ``project=False`` there is no projection (the student's states are compared as they are).
    ``forward(student_hidden, teacher_hidden, mask=None)``.

    Example::

        align = FeatureAlignmentLoss(student_dim=128, teacher_dim=256, kind="cosine")
        optimizer = torch.optim.AdamW([*student.parameters(), *align.parameters()])
        loss = kd + 0.1 * align(student_hidden, teacher_hidden)
    """

    loss_fn = staticmethod(functional.feature_alignment_loss)

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse", *, bias: bool = True,
                 project: bool = True, reduction: str = "mean") -> None:
        student_dim = _checks.check_positive_int("student_dim", student_dim)
        teacher_dim = _checks.check_positive_int("teacher_dim", teacher_dim)
        if not project and student_dim != teacher_dim:
            raise ValueError(f"project=False needs student_dim == teacher_dim, got {student_dim} and {teacher_dim}")
        super().__init__(kind=_checks.check_choice("kind", kind, FEATURE_KINDS),
                         reduction=_checks.check_reduction(reduction))
        self.projection = nn.Linear(student_dim, teacher_dim, bias=bias) if project else None

    def _probe(self) -> None:
        pass  # every option is checked in __init__

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.feature_alignment_loss(student_hidden, teacher_hidden, self.projection, mask=mask,
                                                 **self.options)


class AttentionTransferLoss(_LossModule):
    """Module form of :func:`kdkernels.attention_transfer_loss` (no parameters); keyword
    arguments are its options (p, channel_dim, reduction).
    ``forward(student_features, teacher_features)``."""

    loss_fn = staticmethod(functional.attention_transfer_loss)

    def _probe(self) -> None:
        probe = torch.zeros(1, 2, 2)
        functional.attention_transfer_loss(probe, probe, **self.options)


class SparseKDLoss(_LossModule):
    """Module form of :func:`kdkernels.sparse_kd_loss` (a top-k / sampled teacher); keyword
    arguments are its options. ``forward(student_logits, teacher_ids, teacher_values, labels=None)``.

    Example::

        criterion = SparseKDLoss(missing_mass="residual", ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_logits, teacher_ids, teacher_logprobs, labels)
    """

    loss_fn = staticmethod(sparse.sparse_kd_loss)

    def _probe(self) -> None:
        labels = torch.zeros(1, dtype=torch.long)
        sparse.sparse_kd_loss(torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long),
                              _probe_teacher_values(self.options), labels, **{**self.options, "backend": "reference"})


class FusedLinearSparseKDLoss(_LossModule):
    """Module form of :func:`kdkernels.fused_linear_sparse_kd_loss`; keyword arguments are its
    options. ``forward(student_hidden, student_weight, teacher_ids, teacher_values, labels=None, *,
    student_bias=None)``."""

    loss_fn = staticmethod(sparse.fused_linear_sparse_kd_loss)

    def _probe(self) -> None:
        labels = torch.zeros(1, dtype=torch.long)
        sparse.fused_linear_sparse_kd_loss(torch.zeros(1, 1), torch.zeros(2, 1), torch.zeros(1, 1, dtype=torch.long),
                                           _probe_teacher_values(self.options), labels,
                                           **{**self.options, "backend": "reference"})


def _probe_teacher_values(options: Dict[str, Any]) -> torch.Tensor:
    """A [1, 1] teacher value that every option set accepts: half the mass on the support (so
    missing_mass="residual" has mass outside it), as the configured teacher_kind expresses it."""
    if options.get("teacher_kind", "logprobs") == "probs":
        return torch.full((1, 1), 0.5)
    return torch.full((1, 1), -math.log(2.0))  # log-prob of 1/2; any value is a valid logit
