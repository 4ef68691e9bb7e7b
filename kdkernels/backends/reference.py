"""Pure-PyTorch implementation of every loss: the test oracle (run it in float64) and the fallback
when no compiled or GPU kernel is available. Written straight from the definitions in DESIGN.md §3,
independently of the kernels' streaming formulation."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kdkernels._config import KDConfig

CHECKS_VALUES = False


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _xlogratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
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


def divergence_per_row(logp: torch.Tensor, logq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(p || q) per row from teacher/student log-probabilities [N, V] -> [N]."""
    p, q = logp.exp(), logq.exp()
    if divergence == "forward_kl":
        terms = _xlogratio(p, logp, logq)
    elif divergence == "reverse_kl":
        terms = _xlogratio(q, logq, logp)
    elif divergence == "jsd":
        # At beta in {0, 1}, m equals q or p and both terms vanish: JSD is continuous there.
        logm = _log_mixture(beta, logp, 1 - beta, logq)
        terms = torch.zeros_like(p)
        if beta > 0:
            terms = terms + beta * _xlogratio(p, logp, logm)
        if beta < 1:
            terms = terms + (1 - beta) * _xlogratio(q, logq, logm)
    elif divergence == "skew_kl":
        logm = _log_mixture(beta, logp, 1 - beta, logq)
        terms = _xlogratio(p, logp, logm)
    elif divergence == "skew_reverse_kl":
        logm = _log_mixture(1 - beta, logp, beta, logq)
        terms = _xlogratio(q, logq, logm)
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(-1)


def row_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: Optional[torch.Tensor], cfg: KDConfig) -> torch.Tensor:
    """Differentiable per-row loss [N] for [N, V] inputs (see KDConfig)."""
    dtype = _math_dtype(student_logits)
    z = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    T = cfg.temperature
    logq = F.log_softmax(z / T, dim=-1)
    logp = F.log_softmax(t / T, dim=-1)
    loss = cfg.kd_scale * divergence_per_row(logp, logq, cfg.divergence, cfg.beta)
    if torch.is_grad_enabled() and z.requires_grad and not loss.requires_grad:
        # The divergence is constant in the student (jsd at beta = 1, skew_kl at alpha = 1): keep
        # the loss connected so backward gives a zero gradient, as the kernels do, not an error.
        loss = loss + 0.0 * logq.exp().sum(-1)
    if labels is None:
        return loss
    valid = labels != cfg.ignore_index
    if cfg.ce_weight:
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()  # any integer dtype
        ce = F.cross_entropy(z, safe_labels, reduction="none")
        loss = loss + cfg.ce_weight * ce
    return torch.where(valid, loss, torch.zeros_like(loss))


def rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: KDConfig, compute_grad: bool
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The backend contract (kdkernels.backends): row losses and, optionally, their gradient."""
    if not compute_grad:
        with torch.no_grad():
            return row_losses(student_logits, teacher_logits, labels, cfg), None
    with torch.enable_grad():
        student = student_logits.detach().requires_grad_(True)
        loss = row_losses(student, teacher_logits, labels, cfg)
        (grad,) = torch.autograd.grad(loss, student, grad_outputs=grad_scale.to(loss.dtype).expand_as(loss))
    return loss.detach(), grad


def rows_inplace(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """`rows` with the gradient written over the student logits; returns row_loss."""
    row_loss, grad = rows(student_logits, teacher_logits, labels, grad_scale, cfg, True)
    student_logits.copy_(grad)
    return row_loss
