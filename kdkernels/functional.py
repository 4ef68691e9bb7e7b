"""The public loss functions: argument validation, then dispatch to a backend."""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels import _checks, _dispatch, distributed
from kdkernels._autograd import fused_rows_loss, reduce_rows, reduction_scale
from kdkernels.backends import reference


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Fused knowledge-distillation loss from logits.

    ``loss = ce_weight * CE(student_logits, labels) + kd_weight * T^2 * D(p_T || q_T)`` per row,
    where ``p_T = softmax(teacher_logits / T)``, ``q_T = softmax(student_logits / T)`` and ``D`` is
    the chosen divergence; CE uses the student at T = 1. Both terms are computed in one pass over
    each row, and the gradient is written during the forward pass (only when the student requires
    grad and grad mode is on).

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]``, float32 / bfloat16 / float16 (float64 runs on
            the reference backend). Any strides. Receives the gradient, in its own dtype.
        teacher_logits: same shape as ``student_logits``; never receives a gradient. ``-inf``
            entries mask vocabulary items (masked for the student too, they contribute nothing);
            NaN and ``+inf`` are rejected.
        labels: integer ``[N]`` / ``[B, S]``, optional. Rows whose label equals ``ignore_index``
            count for neither term and get zero gradient. Required when ``ce_weight > 0``.
        divergence: ``forward_kl`` (KL(p||q)), ``reverse_kl`` (KL(q||p)), ``jsd`` (generalized JSD
            with m = beta p + (1-beta) q; 0 at beta in {0, 1}), ``skew_kl`` (KL(p || beta p +
            (1-beta) q)), ``skew_reverse_kl`` (KL(q || (1-beta) p + beta q)), ``tvd``.
        temperature: ``T > 0``, applied to both logits for the divergence.
        beta: mixing weight of ``jsd`` / skew weight of the skew divergences, in [0, 1].
        kd_weight, ce_weight: weights of the two terms (>= 0).
        scale_by_t2: multiply the divergence by ``T^2`` (Hinton et al.), on by default.
        ignore_index: label value that marks rows to ignore.
        reduction: ``mean`` (over non-ignored rows), ``batchmean`` (sum / ``student_logits.size(0)``,
            as ``F.kl_div``), ``sum`` or ``none`` (one value per row, shaped like ``labels``).
        backend: ``auto``, ``cpu`` (compiled C++), ``triton``, ``cuda`` or ``reference`` (PyTorch).

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).
    """
    if distributed.is_dtensor(student_logits):  # vocabulary-sharded (tensor-parallel) or replicated logits
        return distributed.dtensor_kd_loss(
            student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, beta=beta,
            kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            reduction=reduction, backend=backend)
    _checks.check_logits_pair(student_logits, teacher_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    labels = _checks.check_labels(labels, batch_shape, student_logits.device)
    reduction = _checks.check_reduction(reduction)
    cfg = _checks.make_config(divergence=divergence, temperature=temperature, beta=beta,
                              kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
                              ignore_index=ignore_index, has_labels=labels is not None)
    name = _dispatch.resolve(backend, student_logits)

    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.reshape(-1, vocab)
    labels_1d = labels.reshape(-1) if labels is not None else None
    impl = _dispatch.module(name)
    if not impl.CHECKS_VALUES:
        _checks.check_values(teacher_logits, labels_1d, vocab, ignore_index)

    if name == "reference":
        rows = reference.row_losses(student_2d, teacher_2d, labels_1d, cfg)
        scale = reduction_scale(labels_1d, ignore_index, reduction, student_2d.shape[0], batch_shape,
                                student_2d.device, dtype=rows.dtype)
        return reduce_rows(rows, scale, reduction, batch_shape)
    return fused_rows_loss(student_2d, teacher_2d, labels_1d, cfg, reduction, batch_shape,
                           _dispatch.rows_fn(name))
