"""The KD row loss in plain PyTorch, differentiable (to any order), written straight from the
definitions (ARCHITECTURE.md lists them), independently of the kernels' streaming formulation."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kdkernels._config import KDConfig, math_dtype


def xlogratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * (log x - log y) with 0 * log 0 = 0, and no NaN gradient from masked entries."""
    live = x > 0
    safe_x = torch.where(live, log_x, torch.zeros_like(log_x))
    safe_y = torch.where(live, log_y, torch.zeros_like(log_y))
    return torch.where(live, x * (safe_x - safe_y), torch.zeros_like(x))


def _log_mixture(w_p: float, logp: torch.Tensor, w_q: float, logq: torch.Tensor) -> torch.Tensor:
    """log(w_p p + w_q q), in log space; -inf where both terms vanish."""
    terms = []
    if w_p > 0:
        terms.append(logp + math.log(w_p))
    if w_q > 0:
        terms.append(logq + math.log(w_q))
    stacked = torch.stack(terms)
    dead = torch.isneginf(stacked).all(0)
    safe = torch.where(dead.unsqueeze(0), torch.zeros_like(stacked), stacked)
    return torch.where(dead, torch.full_like(logp, -math.inf), torch.logsumexp(safe, dim=0))


def divergence_per_row(logp: torch.Tensor, logq: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """D(p || q) per row from teacher/student log-probabilities [N, V] -> [N]."""
    p, q = logp.exp(), logq.exp()
    divergence = cfg.divergence
    w_p, w_q = cfg.mixture_weights
    if divergence == "forward_kl":
        terms = xlogratio(p, logp, logq)
    elif divergence == "reverse_kl":
        terms = xlogratio(q, logq, logp)
    elif divergence == "jsd":
        # JSD(beta) = w_p KL(p || m) + w_q KL(q || m). At beta in {0, 1}, m equals q or p and both
        # terms vanish: JSD is continuous there.
        logm = _log_mixture(w_p, logp, w_q, logq)
        terms = torch.zeros_like(p)
        if w_p > 0:
            terms = terms + w_p * xlogratio(p, logp, logm)
        if w_q > 0:
            terms = terms + w_q * xlogratio(q, logq, logm)
    elif divergence == "skew_kl":
        terms = xlogratio(p, logp, _log_mixture(w_p, logp, w_q, logq))
    elif divergence == "skew_reverse_kl":
        terms = xlogratio(q, logq, _log_mixture(w_p, logp, w_q, logq))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(-1)


def row_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             labels: Optional[torch.Tensor], cfg: KDConfig) -> torch.Tensor:
    """Differentiable per-row loss [N] for [N, V] inputs (see KDConfig).

    Conventions shared with the kernels: an ignored row (label == ignore_index) is never looked
    at (loss 0, gradient 0, whatever it holds); a row whose teacher is entirely -inf has no
    teacher distribution, so its KD term is 0 while its CE term stays."""
    dtype = math_dtype(student_logits.dtype)
    z = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    no_teacher = torch.isneginf(t).all(-1)
    counted = None if labels is None else labels != cfg.ignore_index
    if counted is not None:
        # any finite stand-in for rows not looked at: no NaN reaches the gradient through them
        z = torch.where(counted.unsqueeze(-1), z, zero)
    t = torch.where((no_teacher if counted is None else no_teacher | ~counted).unsqueeze(-1), zero, t)
    T = cfg.temperature
    logq = F.log_softmax(z / T, dim=-1)
    logp = F.log_softmax(t / T, dim=-1)
    loss = torch.where(no_teacher, zero, cfg.kd_scale * divergence_per_row(logp, logq, cfg))
    if torch.is_grad_enabled() and z.requires_grad and not loss.requires_grad:
        # The divergence is constant in the student (jsd at beta = 1, skew_kl at alpha = 1): keep
        # the loss connected so backward gives a zero gradient, as the kernels do, not an error.
        loss = loss + 0.0 * logq.exp().sum(-1)
    if counted is None:
        return loss
    if cfg.ce_weight:
        safe_labels = torch.where(counted, labels, torch.zeros_like(labels)).long()  # any integer dtype
        ce = F.cross_entropy(z, safe_labels, reduction="none")
        loss = loss + cfg.ce_weight * ce
    return torch.where(counted, loss, zero)
