"""Fused lm_head + sparse-teacher KD loss: the student's logits are computed chunk by chunk from
its hidden states and never exist in full; the teacher is sparse (k ids per token), so no teacher
logits exist at all. The chunk loop, gradient accumulation and autograd are kdkernels.fused_linear's;
per chunk the row kernel is the sparse one (kdkernels.sparse_kd_loss's), writing the gradient over
the chunk's student logits:

    z_s = softcap(logit_scale * (h_s @ W_s^T + b_s))          # [n, V]   student logits chunk
    row_loss, g = sparse_rows(z_s, ids, values, labels)        # g written over z_s
    dL/dh_s[chunk] = g @ W_s,  dL/dW_s += g^T @ h_s,  dL/db_s += sum_rows g
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdkernels import _checks
from kdkernels._autograd import reduce_rows, reduction_scale
from kdkernels.fused_linear import FusedLinearKDFunction, _LinearLogits, _Plan, _run_chunks, chunk_rows
from kdkernels.sparse import prepare, sparse_backend


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
    Tokens are processed ``chunk_size`` rows at a time (logits GEMM, the sparse row kernel, the
    gradient GEMMs), so memory beyond the inputs and gradients is one chunk of logits. Gradients
    are computed in the forward pass, only for the tensors that require grad.

    Args:
        student_hidden: ``[N, H]`` or ``[B, S, H]`` final hidden states, float32 / bfloat16 /
            float16 (float64 runs on the reference backend).
        student_weight: lm_head weight ``[V, H]``, the same dtype.
        teacher_ids, teacher_values: the sparse teacher, ``[N, k]`` / ``[B, S, k]`` (see
            :func:`kdkernels.sparse_kd_loss`); ids in ``[0, V)`` or ``pad_id``.
        labels: integer ``[N]`` / ``[B, S]``, optional (required when ``ce_weight > 0``).
        student_bias: optional lm_head bias ``[V]``.
        chunk_size, softcap, logit_scale: as in :func:`kdkernels.fused_linear_kd_loss`.
        teacher_kind, teacher_temperature, missing_mass, divergence, temperature, beta, kd_weight,
        ce_weight, scale_by_t2, ignore_index, pad_id, reduction, backend: as in
            :func:`kdkernels.sparse_kd_loss`; "mean" divides by the non-ignored tokens of the
            whole call. With "none" the gradients are computed in backward (they depend on each
            row's incoming gradient), which runs the logits GEMMs a second time.

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).
    """
    _checks.check_linear_head("student_hidden", student_hidden, "student_weight", student_weight,
                              "student_bias", student_bias)
    batch_shape = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    chunk_size, softcap, logit_scale = _checks.check_lm_head_options(chunk_size, softcap, logit_scale)
    cfg, teacher, labels_1d, reduction = prepare(
        student_hidden, teacher_ids, teacher_values, labels, batch_shape, vocab,
        dict(teacher_kind=teacher_kind, teacher_temperature=teacher_temperature, missing_mass=missing_mass,
             pad_id=pad_id, divergence=divergence, temperature=temperature, beta=beta, kd_weight=kd_weight,
             ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index, reduction=reduction))
    name, impl = sparse_backend(backend, student_hidden)

    student = _LinearLogits(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
                            logit_scale, softcap)
    n_rows = student.hidden.shape[0]
    needs = (student_hidden.requires_grad, student_weight.requires_grad,
             student_bias is not None and student_bias.requires_grad)
    needs = needs if torch.is_grad_enabled() else (False, False, False)
    # the gradient overwrites the chunk's logits, except with softcap (its derivative needs them)
    rows_inplace = impl.rows_inplace if softcap is None else None
    if chunk_size is None:
        student_bytes = student.dtype.itemsize
        # student logits (+ the kernel's gradient, + its float32 copy for a low-precision
        # lm_head's weight gradient) per vocabulary entry of a row; no teacher logits at all
        per_entry = student_bytes
        if any(needs):
            per_entry += (0 if rows_inplace else student_bytes) + (4 if needs[1] and student_bytes < 4 else 0)
        chunk_size = chunk_rows(n_rows, vocab, per_entry, student_hidden.device.type)
    plan = _Plan(cfg=cfg, reduction=reduction, batch_shape=batch_shape, vocab=vocab, chunk_size=chunk_size,
                 rows_fn=impl.rows,
                 checks_values=True, rows_inplace=rows_inplace)
    scale_dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    grad_scale = reduction_scale(labels_1d, cfg.ignore_index, reduction, n_rows, batch_shape,
                                 student_hidden.device, dtype=scale_dtype)
    if name == "reference":
        _checks.check_finite("student_hidden", student_hidden)
    if any(needs):
        return FusedLinearKDFunction.apply(student.hidden, student_weight, student_bias, student, teacher,
                                           labels_1d, grad_scale, plan, needs)
    row_loss, _ = _run_chunks(plan, student, teacher, labels_1d, grad_scale, needs)
    return reduce_rows(row_loss, grad_scale, reduction, batch_shape)


class FusedLinearSparseKDLoss(nn.Module):
    """Module form of :func:`kdkernels.fused_linear_sparse_kd_loss`; keyword arguments are its options.

    Example::

        criterion = FusedLinearSparseKDLoss(missing_mass="residual", ce_weight=0.5, kd_weight=0.5)
        loss = criterion(student_hidden, student.lm_head.weight, teacher_ids, teacher_logprobs, labels)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = dict(options)
        labels = torch.zeros(1, dtype=torch.long) if self.options.get("ce_weight", 0) else None
        with torch.no_grad():
            fused_linear_sparse_kd_loss(torch.zeros(1, 1), torch.zeros(2, 1), torch.zeros(1, 1, dtype=torch.long),
                                        torch.zeros(1, 1), labels, **{**self.options, "backend": "reference"})

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_values: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                student_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_ids, teacher_values, labels,
                                           student_bias=student_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
