"""The validated options of a KD loss call, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class KDConfig:
    """Options of the fused KD row loss

    ``row_loss = ce_weight * CE(z_s, y) + kd_weight * (T^2 if scale_by_t2 else 1) * D(p_T || q_T)``
    where ``p_T``/``q_T`` are the teacher/student softmax at temperature ``T`` and ``D`` the
    divergence named by ``divergence`` (``beta`` is its mixing / skew weight).
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    scale_by_t2: bool = True
    ignore_index: int = -100

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES[self.divergence]

    @property
    def kd_scale(self) -> float:
        """Factor on the divergence in the loss: kd_weight * T^2 (or kd_weight)."""
        t2 = self.temperature * self.temperature if self.scale_by_t2 else 1.0
        return self.kd_weight * t2


# Rules that choose the strongly correlated set S of a CAKD row, and the integer ids the compiled
# kernels use (csrc/include/kdkernels/cakd.h, enum GroupRule; teacher_top1 runs as top-k, k = 1).
CAKD_GROUPS = {
    "label": 0,
    "teacher_top1": 1,
    "teacher_topk": 1,
    "teacher_mass": 2,
}

# A group weight given as this string is the teacher's mass on that group, per row.
TEACHER_MASS_WEIGHT = "teacher_mass"


@dataclass(frozen=True)
class CAKDConfig:
    """Options of the decomposed-KL (CAKD / DKD) row loss

    ``row_loss = (T^2 if scale_by_t2 else 1) * (bcd_weight * BCD + scd_weight * SCD + wcd_weight * WCD)``
    with BCD = KL(b_p || b_q) over {S, W}, SCD / WCD = KL of the distributions renormalised inside
    S / W (DESIGN.md §3). ``scd_teacher_mass`` / ``wcd_teacher_mass`` replace those weights by the
    teacher's mass P_S / P_W of the row (then the loss is forward KL).
    """

    groups: str = "teacher_topk"
    top_k: int = 1          # size of S for teacher_top1 / teacher_topk
    mass: float = 0.5       # cumulative teacher mass that S reaches for teacher_mass
    bcd_weight: float = 1.0
    scd_weight: float = 1.0
    wcd_weight: float = 1.0
    scd_teacher_mass: bool = False
    wcd_teacher_mass: bool = False
    temperature: float = 1.0
    scale_by_t2: bool = True
    ignore_index: int = -100

    @property
    def group_rule_id(self) -> int:
        return CAKD_GROUPS[self.groups]

    @property
    def t2(self) -> float:
        return self.temperature * self.temperature if self.scale_by_t2 else 1.0

