"""Argument validation: done once, here, before any backend runs."""

from __future__ import annotations

import math
from typing import Optional

import torch

from kdkernels._config import (CAKD_GROUPS, DIVERGENCES, REDUCTIONS, TEACHER_MASS_WEIGHT, TEMPERATURE_RANGE,
                               CAKDConfig, KDConfig)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Integer options reach the compiled kernels as int64.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {value.dtype}")
    return value


def _check_same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def _check_pair(student_name: str, student, teacher_name: str, teacher, *, min_dim: int, layout: str,
                same, how: str) -> None:
    """Two floating tensors on one device; the student has at least min_dim dims (`layout` says
    which); same(student_shape, teacher_shape) says whether the shapes fit (`how` says how)."""
    check_tensor(student_name, student)
    check_tensor(teacher_name, teacher)
    if student.dim() < min_dim:
        raise ValueError(f"{student_name} must be {layout}, got shape {tuple(student.shape)}")
    if teacher.dim() != student.dim() or not same(student.shape, teacher.shape):
        raise ValueError(f"{teacher_name} shape {tuple(teacher.shape)} must {how} {student_name} shape "
                         f"{tuple(student.shape)}")
    _check_same_device(teacher_name, teacher, student_name, student)


def check_logits_pair(student_logits, teacher_logits) -> None:
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, min_dim=2,
                layout="[N, V] or [B, S, V]", same=lambda a, b: a == b, how="equal")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty vocabulary (last) dimension")


def _check_per_row(name: str, value, batch_shape, device, *, integer: bool, rows: str) -> torch.Tensor:
    """One value per row: an integer (or bool) tensor shaped like the batch dimensions of `rows`."""
    check_tensor(name, value, floating=False)
    dtype = value.dtype
    if integer and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {dtype}")
    if not integer and dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {dtype}")
    if tuple(value.shape) != tuple(batch_shape):
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal the {rows} shape without its last "
                         f"dimension, {tuple(batch_shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the {rows} are on {device}")
    return value


def check_labels(labels, batch_shape, device) -> Optional[torch.Tensor]:
    """Integer labels [*batch] (None: no labels), returned as int64: a narrower or unsigned dtype
    would compare against ignore_index after wrapping it (-100 is 156 in uint8)."""
    if labels is None:
        return None
    labels = _check_per_row("labels", labels, batch_shape, device, integer=True, rows="logits")
    return labels if labels.dtype == torch.int64 else labels.long()


def _check_number(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value, *, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """An int (not a bool) in [low, high]; the default range is int64's."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_temperature(temperature) -> float:
    low, high = TEMPERATURE_RANGE
    return _check_number("temperature", temperature, low=low, high=high)


def check_weight(name: str, value) -> float:
    """A loss weight: a finite number >= 0."""
    return _check_number(name, value, low=0.0)


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def make_config(*, divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index,
                has_labels: bool) -> KDConfig:
    check_choice("divergence", divergence, DIVERGENCES)
    ce_weight = _check_number("ce_weight", ce_weight, low=0.0)
    if ce_weight > 0 and not has_labels:
        raise ValueError("ce_weight > 0 needs labels (the hard targets of the CE term)")
    check_int("ignore_index", ignore_index)
    beta = _check_number("beta", beta, low=0.0, high=1.0)
    if beta == 0.0 and divergence in SKEW_AT_ZERO:
        # the mixture is the other distribution itself: the plain KL, whose kernels take log p -
        # log q from the logits (the mixture form would need q itself, which can underflow)
        divergence = SKEW_AT_ZERO[divergence]
    return KDConfig(
        divergence=divergence,
        temperature=check_temperature(temperature),
        beta=beta,
        kd_weight=_check_number("kd_weight", kd_weight, low=0.0),
        ce_weight=ce_weight,
        scale_by_t2=check_flag("scale_by_t2", scale_by_t2),
        ignore_index=ignore_index,
    )


# skew KL at beta = 0 is KL(p || q), skew reverse KL at beta = 0 is KL(q || p)
SKEW_AT_ZERO = {"skew_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}


def check_flag(name: str, value) -> bool:
    """A bool option: True or False, not an int or another object read as true or false."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_kd_call(labels, batch_shape, device, reduction, **kd_options):
    """What every dense KD entry point checks once its tensors are checked: labels [*batch_shape] on
    `device` (or None), the reduction, and kd_loss's keyword options (divergence, temperature, beta,
    kd_weight, ce_weight, scale_by_t2, ignore_index) made into a KDConfig.
    Returns (labels, reduction, cfg)."""
    labels = check_labels(labels, batch_shape, device)
    reduction = check_reduction(reduction)
    return labels, reduction, make_config(has_labels=labels is not None, **kd_options)


def _check_group_weight(name: str, value):
    """A CAKD group weight: a number >= 0, or "teacher_mass". Returns (weight, from_teacher)."""
    if isinstance(value, str):
        if value != TEACHER_MASS_WEIGHT:
            raise ValueError(f"{name} must be a number >= 0 or {TEACHER_MASS_WEIGHT!r}, got {value!r}")
        return 1.0, True
    return check_weight(name, value), False


def _option_of_rule(name: str, value, groups: str, rule: str, meaning: str, check, default):
    """An option only one group rule uses: required with that rule, refused with the others."""
    if groups != rule:
        if value is not None:
            raise ValueError(f"{name} is only used with groups={rule!r}, got {name}={value!r} with groups={groups!r}")
        return default
    if value is None:
        raise ValueError(f"groups={rule!r} needs {name} ({meaning})")
    return check(value)


def _check_mass(mass) -> float:
    value = _check_number("mass", mass, low=0.0, low_open=True)
    if value >= 1.0:
        raise ValueError(f"mass must be < 1, got {value}")
    return value


def make_cakd_config(*, groups, k, mass, bcd_weight, scd_weight, wcd_weight, temperature, scale_by_t2,
                     ignore_index, has_labels: bool) -> CAKDConfig:
    check_choice("groups", groups, CAKD_GROUPS)
    if groups == "label" and not has_labels:
        raise ValueError("groups='label' needs labels (S is each row's label class)")
    top_k = _option_of_rule("k", k, groups, "teacher_topk", "the size of S", lambda v: check_int("k", v, low=1), 1)
    mass_value = _option_of_rule("mass", mass, groups, "teacher_mass", "the teacher mass S reaches, in (0, 1)",
                                 _check_mass, 0.5)
    scd, scd_teacher = _check_group_weight("scd_weight", scd_weight)
    wcd, wcd_teacher = _check_group_weight("wcd_weight", wcd_weight)
    return CAKDConfig(
        groups=groups,
        top_k=top_k,
        mass=mass_value,
        bcd_weight=check_weight("bcd_weight", bcd_weight),
        scd_weight=scd,
        wcd_weight=wcd,
        scd_teacher_mass=scd_teacher,
        wcd_teacher_mass=wcd_teacher,
        temperature=check_temperature(temperature),
        scale_by_t2=check_flag("scale_by_t2", scale_by_t2),
        ignore_index=check_int("ignore_index", ignore_index),
    )


def check_finite(name: str, logits: torch.Tensor) -> None:
    """Logits may hold -inf (masked entries), never NaN or +inf."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise not_finite_error(name)


def not_finite_error(name: str) -> ValueError:
    return ValueError(f"{name} contains NaN or +inf")


def check_values(teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], vocab: int,
                 ignore_index: int) -> None:
    """Data checks for backends whose kernels do not make them in-stream (the compiled CPU kernel
    does): NaN/+inf teacher logits and labels outside [0, V). Rows whose label is ignore_index
    are never looked at."""
    counted = None if labels is None else labels != ignore_index
    check_finite("teacher_logits", teacher_logits if counted is None else teacher_logits[counted])
    if labels is not None:
        used = labels[counted]
        if used.numel() and (bool((used < 0).any()) or bool((used >= vocab).any())):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index ({ignore_index})")


def check_student_support(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: Optional[torch.Tensor], ignore_index: int, *, log_q_by_teacher: bool,
                          ce_weight: float, log_p_by_student: bool = False) -> None:
    """Student logits [N, V]: no NaN / +inf, and no counted row (label not ignore_index) whose loss
    would be +inf or undefined because of the student's -inf entries: a row entirely -inf where
    the teacher's is not; when
    the loss weights log q by the teacher's probability (log_q_by_teacher: forward KL and its
    decompositions), a finite teacher logit where the student's is -inf; with a CE term, the
    label on a student -inf entry. Entries -inf on both sides are masking. When the loss weights
    log p by the student's probability (log_p_by_student: reverse KL), a teacher -inf where the
    student's logit is finite raises too, naming teacher_logits."""
    counted = None if labels is None else labels != ignore_index
    if counted is not None:
        student_logits, teacher_logits, labels = student_logits[counted], teacher_logits[counted], labels[counted]
    check_finite("student_logits", student_logits)
    student_masked = torch.isneginf(student_logits)
    teacher_live = ~torch.isneginf(teacher_logits)
    # a row -inf on both sides is fully masked (no KD term); the student alone leaves q undefined
    bad = student_masked.all(-1) & teacher_live.any(-1)
    if log_q_by_teacher:
        bad |= (student_masked & teacher_live).any(-1)
    if labels is not None and ce_weight > 0:
        bad |= student_masked.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    # (a teacher row entirely -inf has no distribution and no KD term)
    if log_p_by_student and bool(((~teacher_live & ~student_masked).any(-1) & teacher_live.any(-1)).any()):
        raise ValueError("teacher_logits is -inf where the student has probability, so the reverse KL would be "
                         "+inf; mask an entry on both sides (student_logits -inf there too)")
    if bool(bad.any()):
        raise ValueError("student_logits make a row's loss infinite: a row that counts is -inf everywhere while "
                         "the teacher's is not, or -inf where the teacher has probability (forward KL, CAKD/DKD) "
                         "or at its label (CE); mask an entry on both sides")


def check_logit_values(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                       ignore_index: int, log_q_by_teacher: bool, ce_weight: float,
                       log_p_by_student: bool = False) -> None:
    """Every value rule of a loss on logits [N, V], [N, V], [N]: teacher and labels first, then the
    student (check_values, check_student_support)."""
    check_values(teacher_logits, labels, teacher_logits.shape[-1], ignore_index)
    check_student_support(student_logits, teacher_logits, labels, ignore_index, log_q_by_teacher=log_q_by_teacher,
                          ce_weight=ce_weight, log_p_by_student=log_p_by_student)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, low=1)


def check_exponent(p) -> float:
    return _check_number("p", p, low=0.0, low_open=True)


def check_feature_pair(student_hidden, teacher_hidden) -> None:
    """Hidden states [..., D_s] and [..., D_t]: same leading sizes, same device."""
    _check_pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden, min_dim=2,
                layout="[..., D] with at least 2 dims", same=lambda a, b: a[:-1] == b[:-1],
                how="match in every dimension but the last")


def check_counted_finite(name: str, features: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """features [..., D]: no NaN / inf in the tokens the mask counts (all tokens without a mask).
    A look at values on the host: skipped under torch.compile."""
    if torch.compiler.is_compiling():
        return
    counted = features if mask is None else features[mask]
    if not bool(torch.isfinite(counted).all()):
        raise ValueError(f"{name} contains NaN or inf" + ("" if mask is None else " in a token the mask counts"))


def check_projection(weight, bias, student_hidden) -> None:
    """A projection weight [D_t, D_s] (and bias [D_t]) applied to student_hidden [..., D_s]."""
    check_tensor("projection", weight)
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"projection must be a [D_t, D_s={student_hidden.shape[-1]}] weight, got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_tensor("projection_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"projection_bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    for name, value in (("projection", weight), ("projection_bias", bias)):
        if value is not None and value.dtype != student_hidden.dtype:
            raise TypeError(f"{name} dtype {value.dtype} must equal student_hidden dtype {student_hidden.dtype} "
                            "(it is applied to student_hidden as a linear layer)")


def check_projected(projected, teacher_hidden) -> None:
    if not isinstance(projected, torch.Tensor) or projected.shape != teacher_hidden.shape:
        shape = tuple(projected.shape) if isinstance(projected, torch.Tensor) else type(projected).__name__
        raise ValueError(f"the projection must map student_hidden to teacher_hidden's shape "
                         f"{tuple(teacher_hidden.shape)}, got {shape}")


def check_mask(mask, batch_shape, device) -> Optional[torch.Tensor]:
    """A bool mask [*batch] of the tokens that count (None: all count)."""
    return None if mask is None else _check_per_row("mask", mask, batch_shape, device, integer=False,
                                                    rows="features")


def check_attention_pair(student_features, teacher_features, channel_dim) -> None:
    """Feature maps [B, ...] pooled over channel_dim: equal sizes except along channel_dim."""
    check_int("channel_dim", channel_dim)
    rank = student_features.dim() if isinstance(student_features, torch.Tensor) else 0
    if rank >= 3 and (not -rank <= channel_dim < rank or channel_dim % rank == 0):
        raise ValueError(f"channel_dim must name a non-batch dimension of a rank-{rank} tensor, got {channel_dim}")

    def same_but_channels(a, b) -> bool:
        others = [d for d in range(len(a)) if d != channel_dim % len(a)]
        return [a[d] for d in others] == [b[d] for d in others]

    _check_pair("student_features", student_features, "teacher_features", teacher_features, min_dim=3,
                layout="[B, ...] with at least 3 dims (batch, channels and positions)", same=same_but_channels,
                how=f"match (but along channel_dim={channel_dim})")


# --- fused lm_head + KD loss (kdkernels.fused_linear) ---------------------------------------------

def check_linear_head(hidden_name: str, hidden, weight_name: str, weight, bias_name: str, bias) -> None:
    """An lm_head: hidden [..., H] (at least 2 dims), weight [V, H], optional bias [V]; one dtype and
    one device for the three."""
    check_tensor(hidden_name, hidden)
    check_tensor(weight_name, weight)
    if hidden.dim() < 2:
        raise ValueError(f"{hidden_name} must be [N, H] or [B, S, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must be [V, H] with V >= 1 and H = {hidden_name}.shape[-1] = "
                         f"{hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    def same_dtype_and_device(name: str, value: torch.Tensor) -> None:
        if value.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {value.dtype} must equal {hidden_name} dtype {hidden.dtype}")
        _check_same_device(name, value, hidden_name, hidden)

    same_dtype_and_device(weight_name, weight)
    if bias is not None:
        check_tensor(bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must be [V] = [{weight.shape[0]}] like {weight_name}'s rows, "
                             f"got shape {tuple(bias.shape)}")
        same_dtype_and_device(bias_name, bias)


def check_teacher_source(teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                         student_hidden: torch.Tensor) -> None:
    """The teacher of a fused lm_head KD loss: teacher_hidden + teacher_weight (+ teacher_bias), or
    ready teacher_logits [..., V_t], with the student's leading (token) dimensions."""
    if teacher_weight is not None and teacher_logits is not None:
        raise ValueError("pass either teacher_weight (with teacher_hidden) or teacher_logits, not both")
    if teacher_weight is None and teacher_logits is None:
        raise ValueError("the teacher is missing: pass teacher_weight (with teacher_hidden) or teacher_logits")
    tokens = tuple(student_hidden.shape[:-1])
    if teacher_logits is not None:
        for name, value in (("teacher_hidden", teacher_hidden), ("teacher_bias", teacher_bias)):
            if value is not None:
                raise ValueError(f"{name} is only used with teacher_weight; leave it None with teacher_logits")
        check_tensor("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:-1]) != tokens or teacher_logits.dim() != len(tokens) + 1 \
                or teacher_logits.shape[-1] == 0:
            raise ValueError(f"teacher_logits must be [{', '.join(map(str, tokens))}, V_t] (student_hidden's "
                             f"token dimensions), got shape {tuple(teacher_logits.shape)}")
        _check_same_device("teacher_logits", teacher_logits, "student_hidden", student_hidden)
        return
    if teacher_hidden is None:
        raise ValueError("teacher_weight needs teacher_hidden (the teacher's final hidden states)")
    check_linear_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias",
                      teacher_bias)
    if tuple(teacher_hidden.shape[:-1]) != tokens:
        raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} must match student_hidden shape "
                         f"{tuple(student_hidden.shape)} in every dimension but the last (hidden size)")
    _check_same_device("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)


def check_lm_head_options(chunk_size, softcap, logit_scale):
    """(chunk_size or None, softcap or None, logit_scale): chunk_size >= 1, softcap > 0, logit_scale > 0."""
    chunk = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    cap = None if softcap is None else _check_number("softcap", softcap, low=0.0, low_open=True)
    return chunk, cap, _check_number("logit_scale", logit_scale, low=0.0, low_open=True)


def check_lm_head_call(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       teacher_logits, labels, reduction, chunk_size, softcap, logit_scale, **kd_options):
    """Every check of a fused lm_head KD call (fused_linear_kd_loss and its vocab-parallel form): the
    student's lm_head, the teacher (lm_head or logits), the chunk options, then check_kd_call.
    Returns (labels, reduction, cfg, chunk_size, softcap, logit_scale)."""
    check_linear_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    check_teacher_source(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, student_hidden)
    lm_head_options = check_lm_head_options(chunk_size, softcap, logit_scale)
    labels, reduction, cfg = check_kd_call(labels, tuple(student_hidden.shape[:-1]), student_hidden.device, reduction,
                                           **kd_options)
    return (labels, reduction, cfg) + lm_head_options
