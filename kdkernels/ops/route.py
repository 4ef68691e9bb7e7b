"""The one road from a validated public call to a backend.

A :class:`Route` is where one call runs and what follows from that: the backend (resolved once,
kdkernels.backends), whether the call must check values first (``CHECKS_VALUES``), the dtype of
the reduction scale, and the backend's row kernels, whose NaN reports of bad input
(``BAD_INPUT_AS_NAN``) it checks (kdkernels._reports: a device assertion on GPU by default, else the
ValueError the other backends raise).

:func:`logits_loss` is the whole road for a loss on logits (kd_loss, cakd_loss, dkd_loss): the
reference backend runs its differentiable formula under autograd (so double backward works);
every other backend runs under the first-order fused Function (kdkernels.ops.fused), or without
any gradient work when no gradient is wanted. The fused lm_head loss (kdkernels.ops.fused_linear)
takes a Route of its own and runs the same row kernels chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from kdkernels import _checks, _reports, backends
from kdkernels._config import math_dtype
from kdkernels.backends.reference import cakd as reference_cakd
from kdkernels.backends.reference import kd as reference_kd
from kdkernels.ops import fused
from kdkernels.ops.reduction import counted_rows, reduce_rows, reduction_scale

RowKernelResult = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class Family:
    """A family of row losses: the backend contract's entry point that computes it, its
    differentiable reference formula, and its name in messages."""

    entry: str
    title: str
    # (student [N, V], teacher [N, V], labels [N] or None, cfg) -> row_loss [N] or (row_loss, extras [N, k])
    formula: Callable


KD = Family(entry="rows", title="KD", formula=reference_kd.row_loss)
CAKD = Family(entry="cakd_rows", title="CAKD/DKD", formula=reference_cakd.row_loss)


class Route:
    """Where one call runs; see the module docstring."""

    def __init__(self, family: Family, backend: str, tensor: torch.Tensor) -> None:
        name = backends.resolve(backend, tensor)
        module = backends.load(name)
        if not hasattr(module, family.entry):
            if backend != "auto":
                raise ValueError(f"backend={backend!r} has no {family.title} kernel; use backend='auto' or "
                                 f"'reference'")
            name, module = "reference", backends.load("reference")
        self.family, self.name, self.module = family, name, module
        self.checks_values = bool(module.CHECKS_VALUES)
        self.nan_reports = bool(getattr(module, "BAD_INPUT_AS_NAN", False))
        # dtype of the loss, the rows and the reduction scale: the kernels work in float32
        self.dtype = math_dtype(tensor.dtype)

    @property
    def differentiable(self) -> bool:
        """Whether the loss runs as a plain autograd graph (the reference formula)."""
        return self.name == "reference"

    @property
    def has_inplace(self) -> bool:
        return hasattr(self.module, "rows_inplace")

    def check_values(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: Optional[torch.Tensor], cfg) -> Optional[torch.Tensor]:
        """The value checks the backend does not make itself while it streams (rows [N, V]).
        They read values on the host: under torch.compile they run as an op when the graph runs,
        whose 0-dim zero result the caller adds to its reduction scale to keep it in the graph;
        otherwise None."""
        if self.checks_values:
            return None
        args = (student_logits.detach(), teacher_logits, labels, cfg.ignore_index, cfg.log_q_by_teacher,
                cfg.ce_weight, cfg.log_p_by_student)
        if torch.compiler.is_compiling():
            return torch.ops.kdkernels.check_logit_values(*args)
        _checks.check_logit_values(*args)
        return None

    def grad_scale(self, labels: Optional[torch.Tensor], ignore_index: int, reduction: str, n_rows: int,
                   batch_shape: Sequence[int], device: torch.device) -> torch.Tensor:
        return reduction_scale(counted_rows(labels, ignore_index), reduction, n_rows, batch_shape, device,
                               self.dtype)

    def rows(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
             grad_scale: torch.Tensor, cfg, compute_grad: bool) -> RowKernelResult:
        """The backend's row kernel: (row_loss [N], extras [N, k] or None, grad [N, V] or None)."""
        outputs = getattr(self.module, self.family.entry)(student_logits, teacher_logits, labels, grad_scale, cfg,
                                                          compute_grad)
        row_loss, grad = outputs[0], outputs[-1]
        extras = outputs[1] if len(outputs) == 3 else None
        self._raise_reported(row_loss, teacher_logits, labels, cfg, student_logits)
        return row_loss, extras, grad

    def rows_inplace(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: Optional[torch.Tensor], grad_scale: torch.Tensor, cfg) -> torch.Tensor:
        """The backend's KD row kernel with the gradient written over the student logits."""
        row_loss = self.module.rows_inplace(student_logits, teacher_logits, labels, grad_scale, cfg)
        # the student logits now hold the gradient: a NaN that is not the teacher's or the labels'
        # fault was the student's
        self._raise_reported(row_loss, teacher_logits, labels, cfg, student_logits=None)
        return row_loss

    def _raise_reported(self, row_loss: torch.Tensor, teacher_logits: torch.Tensor,
                        labels: Optional[torch.Tensor], cfg, student_logits: Optional[torch.Tensor]) -> None:
        """GPU kernels report bad input as NaN row losses: kdkernels._reports checks them without a
        host synchronisation by default; where it raises, the ValueError names the argument
        (teacher or labels first, else the student)."""
        if not self.nan_reports:
            return

        def raise_error() -> None:
            if student_logits is None:
                _checks.check_values(teacher_logits, labels, teacher_logits.shape[-1], cfg.ignore_index)
                raise ValueError("student_logits contains NaN or +inf, or is -inf where the loss needs a finite "
                                 "value (a whole row, the label's entry, or where forward KL's teacher has mass)"
                                 + (", or teacher_logits is -inf where the student has probability (reverse KL)"
                                    if cfg.log_p_by_student else ""))
            _checks.check_logit_values(student_logits, teacher_logits, labels, cfg.ignore_index,
                                       cfg.log_q_by_teacher, cfg.ce_weight, cfg.log_p_by_student)

        _reports.raise_reported(row_loss, raise_error)


def logits_loss(family: Family, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], cfg, reduction: str, backend: str
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(loss, extras reduced like the loss, one per column) of a validated call on logits
    [..., V] with labels [...] or None."""
    route = Route(family, backend, student_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    # The teacher never receives a gradient: detached on every path, so a teacher that requires
    # grad does not put a compiled op (which has no autograd formula) into the graph.
    teacher = teacher_logits.detach().reshape(-1, vocab)
    labels = labels.reshape(-1) if labels is not None else None
    checked = route.check_values(student, teacher, labels, cfg)
    scale = route.grad_scale(labels, cfg.ignore_index, reduction, student.shape[0], batch_shape, student.device)
    if checked is not None:
        scale = scale + checked

    if route.differentiable:
        outputs = family.formula(student, teacher, labels, cfg)
        row_loss, extras = outputs if isinstance(outputs, tuple) else (outputs, None)
        extras = None if extras is None else extras.detach()
        loss = reduce_rows(row_loss, scale, reduction, batch_shape)
    elif torch.is_grad_enabled() and student.requires_grad:
        loss, extras = fused.FusedRowsFunction.apply(student, teacher, labels, scale, cfg, reduction, batch_shape,
                                                     route)
    else:
        row_loss, extras, _ = route.rows(student, teacher, labels, scale, cfg, False)
        loss = reduce_rows(row_loss, scale, reduction, batch_shape)
    if extras is None or extras.dim() != 2:  # FusedRowsFunction stands in an empty 1-d tensor for none
        return loss, ()
    return loss, tuple(reduce_rows(extras[:, j], scale, reduction, batch_shape) for j in range(extras.shape[1]))
