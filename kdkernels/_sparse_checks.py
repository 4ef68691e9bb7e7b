"""The options and inputs of the sparse-teacher losses (kdkernels.sparse): validated once, here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from kdkernels import _checks
from kdkernels._config import TEMPERATURE_RANGE, KDConfig, kernel_id

# Names and the integer ids the compiled kernels use (csrc/include/kdkernels/sparse.h).
TEACHER_KINDS = {"logprobs": 0, "logits": 1, "probs": 2}
MISSING_MASS = {"renormalize": 0, "residual": 1, "support": 2}


@dataclass(frozen=True)
class SparseConfig:
    """Options of the sparse-teacher row loss: the dense options (``kd``) plus how the teacher's
    values are read (``teacher_kind`` at ``teacher_temperature``), what happens to the mass outside
    the support (``missing_mass``) and which id pads a row (``pad_id``)."""

    kd: KDConfig
    teacher_kind: str = "logprobs"
    teacher_temperature: float = 1.0
    missing_mass: str = "renormalize"
    pad_id: int = -1

    @property
    def ignore_index(self) -> int:
        return self.kd.ignore_index

    teacher_kind_id = kernel_id(TEACHER_KINDS, "teacher_kind")
    missing_mass_id = kernel_id(MISSING_MASS, "missing_mass")


class SparseTeacher(NamedTuple):
    """A teacher on a sparse support: ``ids`` ``[N, k]`` int64 (``pad_id`` for unused slots) and
    ``values`` ``[N, k]`` float32 (float64 for float64 students), of the kind the config names.
    Passed where the dense losses pass teacher logits."""

    ids: torch.Tensor
    values: torch.Tensor

    def detach(self) -> "SparseTeacher":
        return self  # built detached: the teacher never receives a gradient

    @property
    def needs_buffer(self) -> bool:  # the fused-linear chunk loop's teacher interface
        return False

    def chunk(self, start: int, end: int, buffer=None) -> "SparseTeacher":
        return SparseTeacher(self.ids[start:end], self.values[start:end])

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:  # saved for a backward that recomputes
        return self.ids, self.values

    def with_tensors(self, tensors) -> "SparseTeacher":
        return SparseTeacher(*tensors)


def make_sparse_config(*, teacher_kind, teacher_temperature, missing_mass, pad_id, divergence, temperature,
                       beta, kd_weight, ce_weight, scale_by_t2, ignore_index, has_labels: bool) -> SparseConfig:
    kd = _checks.make_config(divergence=divergence, temperature=temperature,
                             beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, has_labels=has_labels)
    _checks.check_choice("teacher_kind", teacher_kind, TEACHER_KINDS)
    _checks.check_choice("missing_mass", missing_mass, MISSING_MASS)
    low, high = TEMPERATURE_RANGE  # the range kd_loss allows its temperature
    teacher_temperature = _checks._check_number("teacher_temperature", teacher_temperature, low=low, high=high)
    if teacher_kind == "probs" and teacher_temperature != 1.0:
        raise ValueError("teacher_temperature re-tempers log-prob / logit values; probabilities are used as "
                         f"given: leave it 1.0 with teacher_kind='probs', got {teacher_temperature}")
    if missing_mass == "renormalize" and divergence != "forward_kl":
        raise ValueError(f"missing_mass='renormalize' is defined for divergence='forward_kl' only, got "
                         f"{divergence!r}; use missing_mass='residual' or 'support' for other divergences")
    if missing_mass == "residual" and teacher_kind == "logits":
        raise ValueError("missing_mass='residual' needs the teacher's mass outside the support, which logits "
                         "on the support do not carry: pass teacher_kind='logprobs' or 'probs', or use "
                         "missing_mass='renormalize' / 'support'")
    _checks.check_int("pad_id", pad_id)
    return SparseConfig(kd=kd, teacher_kind=teacher_kind, teacher_temperature=teacher_temperature,
                        missing_mass=missing_mass, pad_id=pad_id)


def check_student(name: str, student_logits) -> None:
    _checks.check_tensor(name, student_logits)
    if student_logits.dim() < 2:
        raise ValueError(f"{name} must be [N, V] or [B, S, V], got shape {tuple(student_logits.shape)}")
    if student_logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary (last) dimension")


def check_sparse_teacher(teacher_ids, teacher_values, batch_shape: Tuple[int, ...], vocab: int,
                         device: torch.device, cfg: SparseConfig, math_dtype: torch.dtype) -> SparseTeacher:
    """Validates the sparse teacher against the student's token shape and vocabulary; returns it
    as [N, k] int64 ids and [N, k] values in `math_dtype`, detached."""
    _checks.check_tensor("teacher_ids", teacher_ids, floating=False)
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {teacher_ids.dtype}")
    _checks.check_tensor("teacher_values", teacher_values)
    expected = f"[{', '.join(map(str, batch_shape))}, k]"
    if teacher_ids.dim() != len(batch_shape) + 1 or tuple(teacher_ids.shape[:-1]) != tuple(batch_shape) \
            or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids must be {expected} (the student's token dimensions, k >= 1), got shape "
                         f"{tuple(teacher_ids.shape)}")
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(f"teacher_values shape {tuple(teacher_values.shape)} must equal teacher_ids shape "
                         f"{tuple(teacher_ids.shape)}")
    for name, value in (("teacher_ids", teacher_ids), ("teacher_values", teacher_values)):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the student is on {device}")
    k = teacher_ids.shape[-1]
    ids = teacher_ids.detach().reshape(-1, k).long()
    values = teacher_values.detach().reshape(-1, k)
    used = ids != cfg.pad_id
    # every rule as one flag, read back in one host synchronisation
    rules = [
        (used & ((ids < 0) | (ids >= vocab)), f"teacher_ids must lie in [0, {vocab}) or equal pad_id ({cfg.pad_id})"),
    ]
    if k > 1:
        ordered = ids.sort(dim=-1).values
        rules.append(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != cfg.pad_id),
                      "teacher_ids has a duplicate id within a row; each id may appear once per row"))
    rules += [(used & torch.isnan(values), "teacher_values contains NaN"),
              (used & torch.isposinf(values), "teacher_values contains +inf")]
    if cfg.teacher_kind == "probs":
        rules.append((used & (values < 0),
                      "teacher_values must be >= 0 with teacher_kind='probs' (probabilities or weights)"))
    if cfg.teacher_kind == "logprobs":
        rules.append((used & (values > 0),
                      "teacher_values must be <= 0 with teacher_kind='logprobs' (log-probabilities)"))
    broken = torch.stack([mask.any() for mask, _ in rules]).tolist()
    for (_, message), bad in zip(rules, broken):
        if bad:
            raise ValueError(message)
    return SparseTeacher(ids.contiguous(), values.to(math_dtype).contiguous())


def check_label_range(labels: Optional[torch.Tensor], vocab: int, ignore_index: int) -> None:
    if labels is None:
        return
    used = labels[labels != ignore_index]
    if used.numel() and (bool((used < 0).any()) or bool((used >= vocab).any())):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index ({ignore_index})")


def effective_labels(labels: Optional[torch.Tensor], teacher: SparseTeacher, cfg: SparseConfig) -> torch.Tensor:
    """[N] labels in which rows whose support is all padding are ignore_index: such a row counts
    as ignored (loss 0, gradient 0, not in the mean). Rows get label 0 when no labels are given
    (no CE term then: ce_weight is 0 without labels). Without labels nothing is ignored but the
    all-padding rows, so the call must pass a config whose ignore_index is not 0 (see
    `config_without_labels`)."""
    has_support = (teacher.ids != cfg.pad_id).any(dim=-1)
    if labels is None:
        assert cfg.ignore_index != 0, "config_without_labels keeps label 0 apart from ignore_index"
        base = torch.zeros_like(has_support, dtype=torch.long)
    else:
        base = labels.reshape(-1).long()
    return torch.where(has_support, base, torch.full_like(base, cfg.ignore_index))


def config_without_labels(cfg: SparseConfig) -> SparseConfig:
    """Without labels, ignore_index marks only the rows `effective_labels` ignores; the rows it
    keeps get label 0, so an ignore_index of 0 is moved to -100 (a no-label call never reads it)."""
    if cfg.ignore_index != 0:
        return cfg
    return dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, ignore_index=-100))
