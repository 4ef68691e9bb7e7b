"""The validated options of a loss call, and the small rules every layer shares: the T^2 factor,
the divergence ids, the mixture weights and the dtype the math runs in. Each rule is written here
once; the compiled kernels receive its results as arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

# Divergence names and the integer ids the compiled kernels use
# (csrc/include/kdkernels/divergence.h, enum Divergence).
DIVERGENCES = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_kl": 3,
    "skew_reverse_kl": 4,
    "tvd": 5,
}

REDUCTIONS = ("mean", "batchmean", "sum", "none")

# Temperatures outside this range overflow or underflow float32 in 1 / T, T^2 or z / T.
TEMPERATURE_RANGE = (1e-6, 1e6)


def kernel_id(ids: Dict[str, int], option: str) -> property:
    """A config property: the integer id, in ``ids``, that the compiled kernels use for the name
    the config holds in its field ``option``."""
    return property(lambda self: ids[getattr(self, option)],
                    doc=f"The compiled kernels' integer id of ``{option}``.")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is computed, accumulated and returned in: float64 for float64 input,
    float32 for everything else (bf16 / fp16 are loaded and upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _TemperatureOptions:
    """Options every distillation loss on logits shares."""

    temperature: float = 1.0
    scale_by_t2: bool = True
    ignore_index: int = -100

    @property
    def t2(self) -> float:
        """The factor on the divergence that keeps gradient magnitudes independent of T (Hinton
        et al.): T^2, or 1 without scale_by_t2."""
        return self.temperature * self.temperature if self.scale_by_t2 else 1.0


@dataclass(frozen=True)
class KDConfig(_TemperatureOptions):
    """Options of the fused KD row loss

    ``row_loss = ce_weight * CE(z_s, y) + kd_weight * (T^2 if scale_by_t2 else 1) * D(p_T || q_T)``
    where ``p_T``/``q_T`` are the teacher/student softmax at temperature ``T`` and ``D`` the
    divergence named by ``divergence`` (``beta`` is its mixing / skew weight).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    kd_weight: float = 1.0
    ce_weight: float = 0.0

    divergence_id = kernel_id(DIVERGENCES, "divergence")

    @property
    def kd_scale(self) -> float:
        """Factor on the divergence in the loss: kd_weight * t2."""
        return self.kd_weight * self.t2

    @property
    def kd_grad_scale(self) -> float:
        """Factor on dD/du in dL/dz (u = z / T): kd_scale / T."""
        return self.kd_scale / self.temperature

    @property
    def log_q_by_teacher(self) -> bool:
        """Whether the loss weights log q by the teacher's probability (forward KL; skew KL at
        beta = 0), so a student -inf where the teacher has mass makes it infinite."""
        w_p, _ = self.mixture_weights
        teacher_weighted = self.divergence == "forward_kl" or (self.divergence == "skew_kl" and w_p == 0.0)
        return teacher_weighted and self.kd_weight > 0

    @property
    def log_p_by_student(self) -> bool:
        """Whether the loss weights log p by the student's probability with nothing else in the
        log (reverse KL), so a teacher -inf where the student has mass makes it infinite."""
        return self.divergence == "reverse_kl" and self.kd_weight > 0

    @property
    def mixture_weights(self) -> Tuple[float, float]:
        """(w_p, w_q) of the mixture m = w_p p + w_q q that the divergence compares against;
        (0, 0) for divergences without one. Formed in float64 (a Python float), so 1 - beta
        keeps its precision for beta near 1; a kernel casts each weight once."""
        if self.divergence in ("jsd", "skew_kl"):
            return self.beta, 1.0 - self.beta
        if self.divergence == "skew_reverse_kl":
            return 1.0 - self.beta, self.beta
        return 0.0, 0.0


# Rules that choose the strongly correlated set S of a CAKD row, and the integer ids the compiled
# kernels use (csrc/include/kdkernels/cakd.h, enum GroupRule; teacher_top1 runs as top-k, k = 1).
CAKD_GROUPS = {
    "label": 0,
    "teacher_top1": 1,
    "teacher_topk": 1,
    "teacher_mass": 2,
}

# Relative slack of the teacher_mass rule's target (CAKDConfig.mass_target).
MASS_TOLERANCE = 2.0 ** -16

# A group weight given as this string is the teacher's mass on that group, per row.
TEACHER_MASS_WEIGHT = "teacher_mass"


@dataclass(frozen=True)
class CAKDConfig(_TemperatureOptions):
    """Options of the decomposed-KL (CAKD / DKD) row loss

    ``row_loss = t2 * (bcd_weight * BCD + scd_weight * SCD + wcd_weight * WCD)``
    with BCD = KL(b_p || b_q) over {S, W}, SCD / WCD = KL of the distributions renormalised inside
    S / W. ``scd_teacher_mass`` / ``wcd_teacher_mass`` replace those weights by the teacher's mass
    P_S / P_W of the row (then the loss is forward KL).
    """

    groups: str = "teacher_topk"
    top_k: int = 1          # size of S for teacher_top1 / teacher_topk
    mass: float = 0.5       # cumulative teacher mass that S reaches for teacher_mass
    bcd_weight: float = 1.0
    scd_weight: float = 1.0
    wcd_weight: float = 1.0
    scd_teacher_mass: bool = False
    wcd_teacher_mass: bool = False

    # The decomposition of forward KL: a student -inf where the teacher has mass is infinite; no CE.
    log_q_by_teacher = True
    log_p_by_student = False
    ce_weight = 0.0

    group_rule_id = kernel_id(CAKD_GROUPS, "groups")

    @property
    def mass_target(self) -> float:
        """The cumulative teacher mass that the ``teacher_mass`` rule's S must reach: ``mass``
        lowered by a relative 2^-16, so that a prefix whose mass equals ``mass`` in exact arithmetic
        (a uniform teacher at mass 0.5) reaches it on every backend, whatever float32's rounding of
        the probabilities (relative errors ~1e-6) does to the sum."""
        return self.mass * (1.0 - MASS_TOLERANCE)
