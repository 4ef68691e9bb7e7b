"""nn.Module wrappers over kdkernels.functional: the options are fixed at construction."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdkernels import functional


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
