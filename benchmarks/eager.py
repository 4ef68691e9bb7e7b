"""The eager PyTorch formulas the benchmarks compare against: what a user writes by hand for each
divergence, and what ``torch.compile`` is given as the "same eager code".

Every function takes ``[N, V]`` logits, works in their dtype (as user code does), applies the
temperature to both, and returns ``T^2 * D(p_teacher || q_student)`` summed over the vocabulary and
averaged over rows ("batchmean"), the value of
``kdkernels.kd_loss(student, teacher, divergence=name, temperature=T, beta=beta, reduction="batchmean")``.
``beta`` is the JSD mixing weight / the skew weight, with kdkernels' meaning (see that docstring).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    # The Hinton et al. idiom: KL(p || q) with p the teacher.
    T = temperature
    return F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                    reduction="batchmean") * (T * T)


def _distributions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   normalise: Callable[..., torch.Tensor] = F.softmax):
    """(p_teacher, q_student) at the temperature; their logs with ``normalise=F.log_softmax``."""
    return normalise(teacher_logits / temperature, dim=-1), normalise(student_logits / temperature, dim=-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    # KL(q || p): kl_div(input=log p, target=log q) with both in log space.
    log_p, log_q = _distributions(student_logits, teacher_logits, temperature, F.log_softmax)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
        beta: float = 0.5) -> torch.Tensor:
    # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, log m by logsumexp.
    # Needs 0 < beta < 1 (log of the weights).
    log_p, log_q = _distributions(student_logits, teacher_logits, temperature, F.log_softmax)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_p_m = F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
    kl_q_m = F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)
    return (beta * kl_p_m + (1 - beta) * kl_q_m) * temperature**2


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            beta: float = 0.5) -> torch.Tensor:
    # KL(p || beta p + (1 - beta) q), the mixture formed in probability space.
    p, q = _distributions(student_logits, teacher_logits, temperature)
    return F.kl_div((beta * p + (1 - beta) * q).log(), p, reduction="batchmean") * temperature**2


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    beta: float = 0.5) -> torch.Tensor:
    # KL(q || (1 - beta) p + beta q), the mixture formed in probability space.
    p, q = _distributions(student_logits, teacher_logits, temperature)
    return F.kl_div(((1 - beta) * p + beta * q).log(), q, reduction="batchmean") * temperature**2


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
        beta: float = 0.5) -> torch.Tensor:
    # 1/2 sum |p - q|, averaged over rows.
    p, q = _distributions(student_logits, teacher_logits, temperature)
    return 0.5 * (p - q).abs().sum() / student_logits.shape[0] * temperature**2


def lm_head_forward_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                       teacher_weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """forward_kl on two lm_heads' logits ``hidden @ weight.T``, the teacher's computed without a
    graph: the eager peer of the fused lm_head losses, which never materialise these logits."""
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.t()
    return forward_kl(student_hidden @ student_weight.t(), teacher_logits, temperature)


EAGER_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}
