"""The decomposed KL (CAKD / DKD) row loss in plain PyTorch, differentiable.

Written from the definitions, with whole-row masked softmaxes, independently of
the kernels' streaming formulation. Notation: u = z_s/T, a = z_t/T, q = softmax(u),
p = softmax(a); S is the strongly correlated set of a row, W the rest; P_g / Q_g are the teacher /
student mass of group g and p̂, q̂ the distributions renormalised inside each group:

    BCD = KL([P_S, P_W] || [Q_S, Q_W]),   SCD = KL(p̂_S || q̂_S),   WCD = KL(p̂_W || q̂_W)
    row_loss = t2 * (w_b BCD + w_s SCD + w_w WCD)

Conventions shared with the kernels: a group without teacher mass has SCD/WCD = 0 (the
decomposition KL = BCD + P_S SCD + P_W WCD still holds); a row whose teacher is masked (-inf)
everywhere has loss 0 (no teacher distribution); an ignored row is never looked at (loss 0,
gradient 0, whatever it holds). A counted row whose student makes the loss infinite is refused
before this formula runs (kdkernels._checks.check_student_support).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kdkernels._config import CAKDConfig, math_dtype
from kdkernels.backends.reference.kd import xlogratio


def teacher_rank_order(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Class indices of each row from the teacher's most to least probable; ties: lower index first."""
    return torch.sort(teacher_logits, dim=-1, descending=True, stable=True).indices


def correlated_set(teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], cfg: CAKDConfig
                   ) -> torch.Tensor:
    """Boolean [N, V] membership of the strongly correlated set S of each row."""
    n_rows, vocab = teacher_logits.shape
    if cfg.groups == "label":
        safe_labels = torch.where(labels == cfg.ignore_index, torch.zeros_like(labels), labels)
        return F.one_hot(safe_labels, vocab).bool()
    order = teacher_rank_order(teacher_logits)
    if cfg.groups in ("teacher_top1", "teacher_topk"):
        in_set_sorted = torch.arange(vocab, device=order.device).expand(n_rows, vocab) < cfg.top_k
    else:  # teacher_mass: the class whose cumulative mass crosses cfg.mass is included
        probs = torch.softmax(teacher_logits.to(torch.float64) / cfg.temperature, dim=-1)
        sorted_probs = probs.gather(-1, order)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        in_set_sorted = mass_before < cfg.mass_target
    return torch.zeros_like(in_set_sorted).scatter(-1, order, in_set_sorted)


def _group_logsumexp(x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """logsumexp of x over member entries per row; -inf (with zero, not NaN, gradient) when the
    group holds no finite entry."""
    live = member & (x > -math.inf)
    any_live = live.any(-1, keepdim=True)
    safe = torch.where(any_live, torch.where(live, x, torch.full_like(x, -math.inf)), torch.zeros_like(x))
    lse = torch.logsumexp(safe, dim=-1)
    return torch.where(any_live.squeeze(-1), lse, torch.full_like(lse, -math.inf))


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _group_kl(logp: torch.Tensor, logq: torch.Tensor, member: torch.Tensor, log_pg: torch.Tensor,
              log_qg: torch.Tensor) -> torch.Tensor:
    """KL(p̂_g || q̂_g) per row: p̂ = p / P_g and q̂ = q / Q_g on the group's members; 0 when P_g = 0."""
    log_phat = logp - _finite_or_zero(log_pg).unsqueeze(-1)
    log_qhat = logq - _finite_or_zero(log_qg).unsqueeze(-1)
    off = torch.full_like(logp, -math.inf)
    log_phat = torch.where(member, log_phat, off)
    log_qhat = torch.where(member, log_qhat, off)
    return xlogratio(log_phat.exp(), log_phat, log_qhat).sum(-1)


def components(student_logits: torch.Tensor, teacher_logits: torch.Tensor, in_s: torch.Tensor,
               temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(BCD, SCD, WCD, P_S, P_W) per row, differentiable in the student; rows whose teacher or
    student is entirely -inf give zeros."""
    u = student_logits / temperature
    a = teacher_logits / temperature
    empty_row = torch.isneginf(u).all(-1, keepdim=True) | torch.isneginf(a).all(-1, keepdim=True)
    u = torch.where(empty_row, torch.zeros_like(u), u)
    a = torch.where(empty_row, torch.zeros_like(a), a)
    logq = F.log_softmax(u, dim=-1)
    logp = F.log_softmax(a, dim=-1)
    in_w = ~in_s
    log_ps, log_pw = _group_logsumexp(logp, in_s), _group_logsumexp(logp, in_w)
    log_qs, log_qw = _group_logsumexp(logq, in_s), _group_logsumexp(logq, in_w)
    p_s, p_w = log_ps.exp(), log_pw.exp()
    bcd = xlogratio(p_s, log_ps, log_qs) + xlogratio(p_w, log_pw, log_qw)
    scd = _group_kl(logp, logq, in_s, log_ps, log_qs)
    wcd = _group_kl(logp, logq, in_w, log_pw, log_qw)
    keep = ~empty_row.squeeze(-1)
    zero = torch.zeros_like(bcd)
    return (torch.where(keep, bcd, zero), torch.where(keep, scd, zero), torch.where(keep, wcd, zero),
            torch.where(keep, p_s, zero), torch.where(keep, p_w, zero))


def row_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
             cfg: CAKDConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-row loss [N] and the per-row components [N, 3] = (BCD, SCD, WCD), the
    latter unweighted and without T^2, for [N, V] inputs (see CAKDConfig)."""
    dtype = math_dtype(student_logits.dtype)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    if labels is not None:
        # any finite stand-in for rows not looked at: no NaN reaches the gradient through them
        counted = (labels != cfg.ignore_index).unsqueeze(-1)
        zero = torch.zeros((), dtype=dtype, device=student.device)
        student, teacher = torch.where(counted, student, zero), torch.where(counted, teacher, zero)
    in_s = correlated_set(teacher, labels, cfg)
    bcd, scd, wcd, p_s, p_w = components(student, teacher, in_s, cfg.temperature)
    w_s = p_s if cfg.scd_teacher_mass else cfg.scd_weight
    w_w = p_w if cfg.wcd_teacher_mass else cfg.wcd_weight
    loss = cfg.t2 * (cfg.bcd_weight * bcd + w_s * scd + w_w * wcd)
    parts = torch.stack([bcd, scd, wcd], dim=-1)
    if labels is not None:
        valid = labels != cfg.ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        parts = torch.where(valid.unsqueeze(-1), parts, torch.zeros_like(parts))
    return loss, parts
