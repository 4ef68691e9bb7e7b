"""Pure-PyTorch sparse-teacher KD loss (kdkernels.sparse_kd_loss): the fallback and the "eager
PyTorch at this dtype" of the tests; float64-capable and differentiable to any order. Follows
the bucket definitions of csrc/include/kdkernels/sparse.h, written with whole-tensor ops:

    renormalize: D = Σ_S p̂ (log p̂ − log q)                 (q over the full vocabulary)
    support:     D(p̂ ‖ q̂) on S, q̂ = softmax_S(z / T)
    residual:    D over S ∪ {rest}: teacher (1 − r_t) p̂ and r_t, student q and
                 r_s = exp(LSE_{V∖S}(z / T) − LSE_V(z / T))
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kdkernels._config import math_dtype
from kdkernels._sparse_checks import SparseConfig, SparseTeacher
from kdkernels.backends.reference.kd import divergence_per_row, xlogratio

_NEG_INF = -math.inf


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x <= 0, accurate near 0 and far from it; -inf at x = 0."""
    near = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(x > -math.log(2), near, far)


def teacher_buckets(values: torch.Tensor, used: torch.Tensor, rest_exists: torch.Tensor, cfg: SparseConfig
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P [N, k] (-inf at padding), log P_rest [N] (-inf when there is no rest bucket), has_mass [N]).
    has_mass is False where the teacher has nothing to compare (no mass on S, outside residual)."""
    residual = cfg.missing_mass == "residual"
    with_rest = rest_exists if residual else torch.zeros_like(rest_exists)
    neg_inf = torch.full_like(values, _NEG_INF)
    if cfg.teacher_kind == "probs":
        weights = torch.where(used, values, torch.zeros_like(values))
        total = weights.sum(-1)
        keep = with_rest & (total < 1)  # the weights are probabilities leaving mass outside S
        log_norm = torch.where(keep, torch.zeros_like(total), total.log())
        logp = torch.where(used & (weights > 0), weights.log() - log_norm[:, None], neg_inf)
        log_rest = torch.where(keep, torch.log1p(-total.clamp(max=1)), torch.full_like(total, _NEG_INF))
        empty = ~(total > 0)
    else:
        tempered = torch.where(used, values * (cfg.teacher_temperature / cfg.kd.temperature), neg_inf)
        lse = torch.logsumexp(tempered, -1)
        empty = torch.isneginf(lse)
        logp = tempered - torch.where(empty, torch.zeros_like(lse), lse)[:, None]
        log_rest = torch.full_like(lse, _NEG_INF)
        if residual and cfg.teacher_kind == "logprobs":
            # the mass on S at T_gen stays the teacher's; only its shape inside S is re-tempered
            # in float64: the rest mass 1 − Σ exp(v) may be below float32's resolution of Σ exp(v)
            log_inside = torch.logsumexp(torch.where(used, values, neg_inf).double(), -1).clamp(max=0)
            log_inside = torch.where(with_rest & ~empty, log_inside, torch.zeros_like(log_inside))
            logp = logp + log_inside[:, None].to(logp.dtype)
            log_rest = torch.where(with_rest, _log1m_exp(log_inside).to(log_rest.dtype), log_rest)
    # no mass on S: residual puts it all in the rest bucket; the other modes have no teacher
    log_rest = torch.where(empty & with_rest, torch.zeros_like(log_rest), log_rest)
    logp = torch.where(empty[:, None], neg_inf, logp)
    return logp, log_rest, ~empty | with_rest


def row_loss(student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
               cfg: SparseConfig) -> torch.Tensor:
    """Differentiable per-row loss [N] for student logits [N, V] and a sparse teacher [N, k];
    rows whose label is ignore_index give 0 (callers mark all-padding rows so)."""
    dtype = math_dtype(student_logits.dtype)
    z = student_logits.to(dtype)
    vocab = z.shape[-1]
    used = teacher.ids != cfg.pad_id
    ids = torch.where(used, teacher.ids, torch.zeros_like(teacher.ids))
    u = z / cfg.kd.temperature
    lse = torch.logsumexp(u, -1)
    u_support = torch.where(used, u.gather(-1, ids), torch.full_like(ids, _NEG_INF, dtype=dtype))
    rest_exists = used.sum(-1) < vocab

    logp, logp_rest, has_mass = teacher_buckets(teacher.values.to(dtype), used, rest_exists, cfg)
    if cfg.missing_mass == "support":
        norm = torch.logsumexp(u_support, -1)
        student_masks_support = torch.isneginf(norm)
        logq = u_support - torch.where(student_masks_support, torch.zeros_like(norm), norm)[:, None]
    else:
        student_masks_support = torch.zeros_like(rest_exists)
        logq = u_support - lse[:, None]
    # rows without a teacher compare the student with itself: D = 0 with a zero (not NaN) gradient
    logp = torch.where(has_mass[:, None], logp, logq.detach())

    if cfg.missing_mass == "renormalize":
        divergence = xlogratio(logp.exp(), logp, logq).sum(-1)
    elif cfg.missing_mass == "support":
        divergence = divergence_per_row(logp, logq, cfg.kd)
    else:
        # scatter_add: the padding slots (id 0 here) must not clear a real id 0
        in_support = ids.new_zeros(u.shape).scatter_add(-1, ids, used.long()) > 0
        logq_rest = torch.logsumexp(u.masked_fill(in_support, _NEG_INF), -1) - lse
        logp_rest = torch.where(has_mass, logp_rest, logq_rest.detach())
        divergence = divergence_per_row(torch.cat([logp, logp_rest[:, None]], -1),
                                        torch.cat([logq, logq_rest[:, None]], -1), cfg.kd)
    divergence = torch.where(student_masks_support & has_mass, torch.full_like(divergence, math.inf), divergence)
    loss = cfg.kd.kd_scale * divergence
    if torch.is_grad_enabled() and z.requires_grad and not loss.requires_grad:
        loss = loss + 0.0 * z.sum(-1)  # keep the graph (a constant divergence): zero gradient, not an error
    if labels is None:
        return loss
    valid = labels != cfg.ignore_index
    if cfg.kd.ce_weight:
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        loss = loss + cfg.kd.ce_weight * F.cross_entropy(z, safe_labels, reduction="none")
    return torch.where(valid, loss, torch.zeros_like(loss))


def check_row_loss(row_loss: torch.Tensor) -> None:
    """The ValueError of a row whose loss is infinite or undefined: NaN / +inf student logits (the
    teacher was checked at the public call), or mass on entries the student masks."""
    if not bool(torch.isfinite(row_loss).all()):
        raise ValueError("student_logits contains NaN or +inf, or a row's loss is infinite: the teacher or the "
                         "label puts mass on an entry the student masks with -inf (or the whole row is -inf)")
