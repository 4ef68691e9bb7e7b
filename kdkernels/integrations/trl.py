"""TRL's GKD loss on kdkernels' fused kernels: swap one import.

``GKDTrainer.generalized_jsd_loss`` (TRL, Agarwal et al., "On-Policy Distillation of Language
Models", Eq. 1) is, per token, with p = softmax(teacher / T), q = softmax(student / T):

    beta = 0:        KL(p || q)                                   (forward KL)
    beta = 1:        KL(q || p)                                   (reverse KL)
    0 < beta < 1:    beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q

with no T^2 factor. kdkernels' ``jsd`` divergence is the same mixture and the same weights (so
the same beta), but taken literally at the ends, where it is 0; TRL switches to the two KLs
there. So: beta = 0 runs ``forward_kl``, beta = 1 runs ``reverse_kl``, anything between runs
``jsd`` with that beta, all with ``scale_by_t2=False``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from kdkernels import _checks, kd_loss

IGNORE_INDEX = -100  # TRL's label for positions that do not count


def gkd_divergence(beta: float) -> str:
    """kdkernels' divergence for TRL's beta: forward KL at 0, reverse KL at 1, JSD(beta) between."""
    if beta == 0:
        return "forward_kl"
    if beta == 1:
        return "reverse_kl"
    return "jsd"


def _elementwise(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                 temperature: float) -> torch.Tensor:
    """The per-vocabulary-entry terms whose sum over the last dimension is the row's divergence
    (reduction="none" returns them, as TRL does). Entries of zero probability contribute 0."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)

    def kl_terms(log_a, log_b):  # a (log a - log b), 0 where a = 0
        return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_b), 0.0)

    if beta == 0:
        return kl_terms(log_p, log_q)
    if beta == 1:
        return kl_terms(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), 0)
    return beta * kl_terms(log_p, log_m) + (1 - beta) * kl_terms(log_q, log_m)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """TRL GKD's generalized JSD loss (``GKDTrainer.generalized_jsd_loss``), computed by the fused
    kernel of :func:`kdkernels.kd_loss` (see the module docstring for the formula).

    Args:
        student_logits: ``[B, S, V]`` (or ``[N, V]``), float32 / bfloat16 / float16; gets the gradient.
        teacher_logits: same shape; no gradient.
        labels: ``[B, S]`` (or ``[N]``) token ids; positions with ``-100`` do not count. Already
            aligned with the logits (TRL passes shifted labels); optional.
        beta: in [0, 1]: 0 is forward KL(teacher || student), 1 reverse KL(student || teacher),
            between them the generalized JSD with mixture ``beta * teacher + (1 - beta) * student``.
        temperature: ``T``, divides both logits; the loss is not multiplied by ``T^2``.
        reduction: ``"batchmean"``: the sum over counted positions divided by their number (with
            labels) or by ``student_logits.size(0)`` (without); ``"sum"``; ``"mean"``: the sum over
            counted positions divided by their number times ``V`` (a mean over vocabulary entries);
            ``"none"``: the per-entry terms, ``[..., V]`` for the counted positions (flattened to
            ``[n, V]`` with labels), computed in PyTorch (their size is the logits' own).
        num_items_in_batch: when given, the loss is the sum over counted positions divided by it
            (whatever ``reduction`` says), for gradient accumulation.
        backend: kdkernels' backend (``"auto"``, ``"cpu"``, ``"triton"``, ``"cuda"``, ``"reference"``).

    Returns:
        A float32 scalar (``"none"``: float32 terms). Unlike TRL, a batch whose positions are all
        ``-100`` gives 0 for ``"mean"`` too (TRL: NaN).
    """
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got {reduction!r}")
    divergence = gkd_divergence(beta)
    if reduction == "none" and num_items_in_batch is None:
        _checks.check_logits_pair(student_logits, teacher_logits)
        _checks.check_labels(labels, tuple(student_logits.shape[:-1]), student_logits.device)
        _checks.make_config(divergence=divergence, temperature=temperature, beta=beta, kd_weight=1.0, ce_weight=0.0,
                            scale_by_t2=False, ignore_index=IGNORE_INDEX, has_labels=labels is not None)
        terms = _elementwise(student_logits, teacher_logits.detach(), beta, temperature)
        return terms if labels is None else terms[labels != IGNORE_INDEX]
    total = kd_loss(student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature,
                    beta=beta, scale_by_t2=False, ignore_index=IGNORE_INDEX, reduction="sum", backend=backend)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        positions = (labels != IGNORE_INDEX).sum()
    else:
        positions = torch.tensor(math.prod(student_logits.shape[:-1]), device=total.device)
    if reduction == "batchmean":
        return total / (positions.clamp(min=1) if labels is not None else max(student_logits.shape[0], 1))
    return total / (positions * student_logits.shape[-1]).clamp(min=1)


__all__ = ["generalized_jsd_loss", "gkd_divergence"]
