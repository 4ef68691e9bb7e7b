"""Decomposed KL losses: CAKD (correlation-aware KD) and DKD (decoupled KD), validation + dispatch.

For each row the classes split into a strongly correlated set S and the rest W, and forward KL
splits exactly (DESIGN.md §3):

    KL(p || q) = BCD + P_S * SCD + P_W * WCD
    BCD = KL([P_S, P_W] || [Q_S, Q_W]),  SCD = KL(p̂_S || q̂_S),  WCD = KL(p̂_W || q̂_W)

with p = softmax(teacher / T), q = softmax(student / T), P_g / Q_g the teacher / student mass of
group g and p̂, q̂ the distributions renormalised inside each group. CAKD frees the weights;
DKD is the case S = {label} (TCKD = BCD, NCKD = WCD).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from kdkernels import _checks, _dispatch
from kdkernels._autograd import fused_rows_loss, reduce_rows, reduction_scale
from kdkernels._config import CAKDConfig
from kdkernels.backends import reference_cakd


class CAKDResult(NamedTuple):
    """cakd_loss(..., return_components=True): the loss and its unweighted parts (at temperature
    T, without the T^2 factor; reduced like the loss, detached)."""

    loss: torch.Tensor
    bcd: torch.Tensor
    scd: torch.Tensor
    wcd: torch.Tensor


class DKDResult(NamedTuple):
    """dkd_loss(..., return_components=True): the loss, TCKD and NCKD (unweighted, without T^2)."""

    loss: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor


def cakd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    groups: str,
    k: Optional[int] = None,
    mass: Optional[float] = None,
    bcd_weight: float = 1.0,
    scd_weight: Union[float, str] = 1.0,
    wcd_weight: Union[float, str] = 1.0,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, CAKDResult]:
    """Correlation-aware KD loss: ``T^2 * (bcd_weight * BCD + scd_weight * SCD + wcd_weight * WCD)``
    per row (see the module docstring), fused: one pass chooses S, one gathers per-group
    statistics in log space and one writes the loss terms and the gradient.

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]``, float32 / bfloat16 / float16 (float64 runs on
            the reference backend). Receives the gradient, in its own dtype.
        teacher_logits: same shape; no gradient. ``-inf`` entries are masked vocabulary (zero
            probability); NaN and ``+inf`` are rejected.
        labels: integer ``[N]`` / ``[B, S]``; required for ``groups="label"``, optional otherwise.
            Rows whose label equals ``ignore_index`` have loss 0 and gradient 0.
        groups: how S is chosen per row:
            ``"label"``: S = {label};
            ``"teacher_top1"``: S = the teacher's most probable class;
            ``"teacher_topk"``: S = the teacher's ``k`` most probable classes (all of them if
            ``k >= V``, then W is empty);
            ``"teacher_mass"``: S = the fewest most probable teacher classes (at temperature T)
            whose probabilities sum to ``>= mass``; the class that crosses ``mass`` is included.
            Among equal teacher logits the lower class index ranks first, so S is deterministic.
        k: size of S for ``teacher_topk`` (int >= 1); only for that rule.
        mass: teacher mass S reaches for ``teacher_mass``, in (0, 1); only for that rule.
        bcd_weight, scd_weight, wcd_weight: weights (>= 0) of the three parts. ``scd_weight`` /
            ``wcd_weight`` may be ``"teacher_mass"``: the teacher's mass P_S / P_W of each row, a
            constant for the gradient; with ``bcd_weight=1`` and both set so the loss is forward KL.
            A group holding no teacher probability at all (every teacher logit in it ``-inf``)
            contributes no SCD / WCD.
        temperature: ``T > 0``, applied to both logits.
        scale_by_t2: multiply the loss by ``T^2`` (on by default).
        ignore_index: label value that marks rows to ignore.
        reduction: ``mean`` (over non-ignored rows), ``batchmean`` (sum / ``size(0)``), ``sum`` or
            ``none`` (one value per row, shaped like the batch dimensions).
        return_components: also return BCD, SCD, WCD (unweighted, without ``T^2``, detached),
            reduced the same way, as a :class:`CAKDResult`.
        backend: ``auto``, ``cpu`` (compiled C++) or ``reference`` (PyTorch).

    Returns:
        The loss (a scalar, or the batch shape for ``reduction="none"``; float32, float64 for
        float64 input), or a :class:`CAKDResult` with ``return_components=True``.
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    labels = _checks.check_labels(labels, batch_shape, student_logits.device)
    reduction = _checks.check_reduction(reduction)
    cfg = _checks.make_cakd_config(groups=groups, k=k, mass=mass, bcd_weight=bcd_weight,
                                   scd_weight=scd_weight, wcd_weight=wcd_weight, temperature=temperature,
                                   scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                                   has_labels=labels is not None)
    loss, parts = _decomposed_kl(student_logits, teacher_logits, labels, cfg, reduction, backend)
    if not return_components:
        return loss
    return CAKDResult(loss, *parts)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, DKDResult]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * (alpha * TCKD + beta * NCKD)`` per row, with
    TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y]) (the label's binary split) and NCKD the KL between
    teacher and student renormalised over the non-label classes. Defaults are the paper's.

    The same fused kernel as :func:`cakd_loss` with ``groups="label"``, ``bcd_weight=alpha``,
    ``wcd_weight=beta``; the other arguments mean the same there. ``labels`` is required.
    With ``return_components=True`` returns a :class:`DKDResult` (TCKD, NCKD unweighted, without
    ``T^2``, detached, reduced like the loss).
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    if labels is None:
        raise ValueError("labels is required by dkd_loss (the target class of each row)")
    labels = _checks.check_labels(labels, batch_shape, student_logits.device)
    reduction = _checks.check_reduction(reduction)
    cfg = _checks.make_cakd_config(groups="label", k=None, mass=None,
                                   bcd_weight=_checks.check_weight("alpha", alpha), scd_weight=0.0,
                                   wcd_weight=_checks.check_weight("beta", beta), temperature=temperature,
                                   scale_by_t2=scale_by_t2, ignore_index=ignore_index, has_labels=True)
    loss, (tckd, _, nckd) = _decomposed_kl(student_logits, teacher_logits, labels, cfg, reduction, backend)
    if not return_components:
        return loss
    return DKDResult(loss, tckd, nckd)


def _backend_for(backend: str, tensor: torch.Tensor) -> str:
    """The backend that runs the decomposed KL: as kd_loss chooses, except that "auto" falls back
    to the reference where the chosen backend has no decomposed-KL kernel."""
    name = _dispatch.resolve(backend, tensor)
    if name == "reference" or hasattr(_dispatch.module(name), "cakd_rows"):
        return name
    if backend == "auto":
        return "reference"
    raise ValueError(f"backend={backend!r} has no CAKD/DKD kernel; use backend='auto' or 'reference'")


class _KeepComponents:
    """A backend's cakd_rows in the (row_loss, grad) form fused_rows_loss expects; keeps the
    per-row components it also returns."""

    def __init__(self, cakd_rows):
        self.cakd_rows = cakd_rows
        self.components: Optional[torch.Tensor] = None

    def __call__(self, student, teacher, labels, grad_scale, cfg, compute_grad):
        row_loss, self.components, grad = self.cakd_rows(student, teacher, labels, grad_scale, cfg, compute_grad)
        return row_loss, grad


def _decomposed_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                   cfg: CAKDConfig, reduction: str, backend: str):
    """(loss, (BCD, SCD, WCD) reduced like the loss) on the chosen backend."""
    name = _backend_for(backend, student_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.reshape(-1, vocab)
    labels_1d = labels.reshape(-1) if labels is not None else None
    impl = reference_cakd if name == "reference" else _dispatch.module(name)
    if not impl.CHECKS_VALUES:
        _checks.check_values(teacher_logits, labels_1d, vocab, cfg.ignore_index)

    scale = reduction_scale(labels_1d, cfg.ignore_index, reduction, student_2d.shape[0], batch_shape,
                            student_2d.device)
    if name == "reference":
        rows, components = reference_cakd.row_losses(student_2d, teacher_2d, labels_1d, cfg)
        loss = reduce_rows(rows, scale, reduction, batch_shape)
    else:
        rows_fn = _KeepComponents(impl.cakd_rows)
        loss = fused_rows_loss(student_2d, teacher_2d, labels_1d, cfg, reduction, batch_shape, rows_fn)
        components = rows_fn.components
    components = components.detach()
    parts = tuple(reduce_rows(components[:, j], scale, reduction, batch_shape) for j in range(3))
    return loss, parts
