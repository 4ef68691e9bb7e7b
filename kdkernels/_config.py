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
