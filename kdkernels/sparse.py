"""KD from a sparse teacher: top-k or sampled teacher distributions (e.g. a teacher cache,
kdkernels.teacher_cache) against a dense student, fused. Validation and dispatch.

Per row, with u = z / T the tempered student logits over the vocabulary V, the teacher given on a
support S of k ids with values v, and p̂ = softmax_S(v · T_gen / T) (probs: w / Σw):

    renormalize   D = Σ_S p̂ (log p̂ − log q),  q = softmax_V(u)               (forward KL)
    support       D(p̂ ‖ q̂) on S,  q̂ = softmax_S(u)                          (any divergence)
    residual      D on S ∪ {rest}: teacher (1 − r_t) p̂ and r_t = 1 − Σ_S exp(v) (at T_gen),
                  student q and r_s = exp(LSE_{V∖S}(u) − LSE_V(u))           (any divergence)

loss = ce_weight · CE(z, y) + kd_weight · T² · D, as in kd_loss. The formulas and gradients are in
csrc/include/kdkernels/sparse.h.
"""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels import _checks
from kdkernels._amp import autocast_as_matmul_inputs
from kdkernels._sparse_checks import (check_label_range, check_sparse_teacher, check_student, config_without_labels,
                                      effective_labels, make_sparse_config)
from kdkernels._config import math_dtype
from kdkernels.ops import sparse as sparse_ops


def _prepare(student, teacher_ids, teacher_values, labels, batch_shape, vocab, options: dict):
    """Validates a sparse loss call; returns (cfg, SparseTeacher [N, k], effective labels [N], reduction)."""
    labels = _checks.check_labels(labels, batch_shape, student.device)
    reduction = _checks.check_reduction(options.pop("reduction"))
    cfg = make_sparse_config(has_labels=labels is not None, **options)
    check_label_range(labels, vocab, cfg.ignore_index)
    if labels is None:
        cfg = config_without_labels(cfg)
    teacher = check_sparse_teacher(teacher_ids, teacher_values, batch_shape, vocab, student.device, cfg,
                                   math_dtype(student.dtype))
    return cfg, teacher, effective_labels(labels, teacher, cfg), reduction


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_kind: str = "logprobs",
    teacher_temperature: float = 1.0,
    missing_mass: str = "renormalize",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    pad_id: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """KD loss against a teacher known only on k ids per row (top-k or sampled), fused.

    ``loss = ce_weight * CE(student_logits, labels) + kd_weight * T^2 * D`` per row, with D the
    divergence between the sparse teacher and the dense student chosen by ``missing_mass`` (see
    the module docstring). One pass over each student row (online log-sum-exp and a gather at the
    k ids), and the gradient written once during the forward pass: ``q_j * c_row`` off the support
    plus the support columns' own values. The student's full log-softmax never exists.

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]``, float32 / bfloat16 / float16 (float64 runs on
            the reference backend). Receives the gradient, in its own dtype. ``-inf`` entries are
            masked vocabulary; a row whose loss becomes infinite because of them (the teacher or
            the label on a masked entry, or a fully masked row) raises ValueError.
        teacher_ids: integer ``[N, k]`` / ``[B, S, k]``: the teacher's support per row, ids in
            ``[0, V)``, each at most once per row; ``pad_id`` marks unused slots. A row whose ids
            are all ``pad_id`` counts as ignored (loss 0, gradient 0, not in the mean).
        teacher_values: floating, shaped like ``teacher_ids``: the teacher's value at each id, of
            kind ``teacher_kind``. Values at padding slots are not read.
        labels: integer ``[N]`` / ``[B, S]``, optional; rows equal to ``ignore_index`` are
            ignored. Required when ``ce_weight > 0``.
        teacher_kind: ``"logprobs"`` (log-probabilities over the full vocabulary at temperature
            ``teacher_temperature``, e.g. an inference server's top-k logprobs; ``<= 0``),
            ``"logits"`` (raw logits at the support; no mass outside it is known) or ``"probs"``
            (probabilities or weights ``>= 0``, e.g. sampled counts / n; used as given).
        teacher_temperature: ``T_gen``, the temperature the log-probs / logits were produced at:
            the teacher is re-tempered to ``T`` over its support, ``p̂ ∝ exp(v * T_gen / T)``.
        missing_mass: what happens to the teacher mass outside the support:
            ``"renormalize"`` (teacher renormalised over S, student over V read at S; forward KL
            only), ``"residual"`` (one extra bucket per row with the mass outside S; needs
            logprobs or probs; every divergence), ``"support"`` (both renormalised over S; every
            divergence; no gradient off S). With residual at ``T != T_gen`` the teacher's rest mass
            stays ``r_t = 1 - sum_S exp(v)`` and only its shape inside S is re-tempered; probs
            summing to >= 1 leave no rest mass (they are renormalised). A teacher whose values
            leave no rest (``sum_S exp(v) >= 1``, e.g. by the rounding of fp16 log-probs) makes
            ``reverse_kl`` infinite wherever the student keeps mass outside S (ValueError).
        divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index: as in
            :func:`kdkernels.kd_loss`; ``temperature`` in [1e-6, 1e6].
        pad_id: the id that marks an unused slot of ``teacher_ids``.
        reduction: ``mean`` (over non-ignored rows), ``batchmean`` (sum / ``size(0)``), ``sum`` or
            ``none`` (one value per row, shaped like the token dimensions).
        backend: ``auto``, ``cpu``, ``triton`` or ``reference``.

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).
    """
    check_student("student_logits", student_logits)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    cfg, teacher, labels_1d, reduction = _prepare(
        student_logits, teacher_ids, teacher_values, labels, batch_shape, vocab,
        dict(teacher_kind=teacher_kind, teacher_temperature=teacher_temperature, missing_mass=missing_mass,
             pad_id=pad_id, divergence=divergence, temperature=temperature, beta=beta, kd_weight=kd_weight,
             ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index, reduction=reduction))
    return sparse_ops.sparse_loss(student_logits, teacher, labels_1d, cfg, reduction, backend)


@autocast_as_matmul_inputs("student_hidden", "student_weight", "student_bias")
def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    teacher_kind: str = "logprobs",
    teacher_temperature: float = 1.0,
    missing_mass: str = "renormalize",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    pad_id: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse-teacher KD loss of a student lm_head, without materialising ``[tokens, vocab]`` logits.

    Equal to ``sparse_kd_loss(student_logits, teacher_ids, teacher_values, labels, ...)`` with
    ``student_logits = softcap(logit_scale * (student_hidden @ student_weight.T + student_bias))``.
    Tokens are processed ``chunk_size`` rows at a time (the logits GEMM, the sparse row kernel
    writing the gradient over the chunk's logits, the gradient GEMMs), so memory beyond the inputs
    and gradients is one chunk of logits; no teacher logits exist at all. A bfloat16 / float16
    lm_head's weight gradient is still summed over the tokens in float32 and rounded once: in two
    passes over the tokens (the logits GEMM and row kernel run twice), so that its float32
    accumulators need half the gradient's memory beyond it rather than twice. Gradients are
    computed in the forward pass, only for the tensors that require grad. Under
    ``torch.autocast`` the lm_head inputs (hidden states, weight, bias) are cast to the autocast
    dtype, as a matmul's are; the loss math stays float32.

    Args:
        student_hidden: ``[N, H]`` or ``[B, S, H]`` final hidden states, float32 / bfloat16 /
            float16 (float64 runs on the reference backend).
        student_weight: lm_head weight ``[V, H]``, the same dtype.
        teacher_ids, teacher_values: the sparse teacher, ``[N, k]`` / ``[B, S, k]`` (see
            :func:`sparse_kd_loss`); ids in ``[0, V)`` or ``pad_id``.
        labels: integer ``[N]`` / ``[B, S]``, optional (required when ``ce_weight > 0``).
        student_bias: optional lm_head bias ``[V]``.
        chunk_size, softcap, logit_scale: as in :func:`kdkernels.fused_linear_kd_loss` (the default
            chunk fits the per-chunk logits in its memory budget).
        teacher_kind, teacher_temperature, missing_mass, divergence, temperature, beta, kd_weight,
        ce_weight, scale_by_t2, ignore_index, pad_id, reduction, backend: as in
            :func:`sparse_kd_loss`; "mean" divides by the non-ignored tokens of the whole call.
            With "none" the gradients are computed in backward (they depend on each row's incoming
            gradient), which runs the logits GEMMs a second time.

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).
    """
    _checks.check_linear_head("student_hidden", student_hidden, "student_weight", student_weight,
                              "student_bias", student_bias)
    batch_shape = tuple(student_hidden.shape[:-1])
    chunk_size, softcap, logit_scale = _checks.check_lm_head_options(chunk_size, softcap, logit_scale)
    cfg, teacher, labels_1d, reduction = _prepare(
        student_hidden, teacher_ids, teacher_values, labels, batch_shape, student_weight.shape[0],
        dict(teacher_kind=teacher_kind, teacher_temperature=teacher_temperature, missing_mass=missing_mass,
             pad_id=pad_id, divergence=divergence, temperature=temperature, beta=beta, kd_weight=kd_weight,
             ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index, reduction=reduction))
    return sparse_ops.fused_linear_sparse_loss(student_hidden, student_weight, student_bias, teacher, labels_1d, cfg,
                                               reduction, backend, chunk_size, softcap, logit_scale)


__all__ = ["sparse_kd_loss", "fused_linear_sparse_kd_loss"]
