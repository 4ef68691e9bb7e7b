"""Feature-alignment losses: the student matches the teacher's hidden states, not only its outputs.

* Hint loss (FitNets, Romero et al. 2015): a learned projection ``r`` maps the student's hidden
  states into the teacher's width, and the loss compares ``r(h_s)`` with ``h_t`` per token:
  ``mse``:    mean_d (r(h_s)_d - h_t_d)^2
  ``cosine``: 1 - <r(h_s), h_t> / (max(|r(h_s)|, eps) * max(|h_t|, eps))
* Attention transfer (Zagoruyko & Komodakis 2017): each sample's features are pooled over
  channels into a map ``Q = mean_c |F_c|^p``, flattened and L2-normalised; the loss per sample is
  ``|Q_s / |Q_s| - Q_t / |Q_t| |^2``. Only the non-channel sizes must agree, so no projection.

The teacher never receives a gradient (its features are detached). Low-precision inputs are
upcast: the loss is computed and returned in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels import _checks

FEATURE_KINDS = ("mse", "cosine")

# Floor on the vector norms in the cosine and the attention-map normalisation (a zero vector then
# has cosine 0 with anything, and a zero map stays zero), as F.cosine_similarity / F.normalize.
NORM_EPS = 1e-8

Projection = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _reduce_tokens(token_loss: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """token_loss: [*batch]. mean: over the tokens the mask keeps (0 when none);
    batchmean: sum / size(0); sum; none: [*batch] with masked tokens at 0."""
    if mask is not None:
        token_loss = token_loss * mask.to(token_loss.dtype)
    if reduction == "none":
        return token_loss
    total = token_loss.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(token_loss.shape[0], 1)
    if mask is None:
        return total / max(token_loss.numel(), 1)
    return total / mask.sum().clamp(min=1).to(token_loss.dtype)


def _project(student_hidden: torch.Tensor, projection: Projection,
             projection_bias: Optional[torch.Tensor]) -> torch.Tensor:
    if projection is None:
        if projection_bias is not None:
            raise ValueError("projection_bias needs a projection weight")
        return student_hidden
    if isinstance(projection, torch.Tensor):
        _checks.check_projection(projection, projection_bias, student_hidden)
        return F.linear(student_hidden, projection, projection_bias)
    if not callable(projection):
        raise TypeError(f"projection must be None, a weight tensor or a callable, got {type(projection).__name__}")
    if projection_bias is not None:
        raise ValueError("projection_bias is only used with a projection weight tensor")
    return projection(student_hidden)


def feature_alignment_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: Projection = None,
    *,
    projection_bias: Optional[torch.Tensor] = None,
    kind: str = "mse",
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hint loss between projected student hidden states and teacher hidden states.

    Args:
        student_hidden: ``[..., D_s]`` floating (e.g. ``[B, S, D_s]`` or ``[N, D_s]``).
        teacher_hidden: ``[..., D_t]`` with the same leading sizes; detached (no gradient).
        projection: ``None`` (then ``D_s`` must equal ``D_t``), a weight ``[D_t, D_s]`` applied as
            ``h W^T + projection_bias``, or a callable (e.g. an ``nn.Linear``) from ``[..., D_s]``
            to ``[..., D_t]``. The weight/callable receives the gradient: it is learned.
        projection_bias: ``[D_t]``, only with a weight tensor.
        kind: ``mse`` (mean over the feature dimension of the squared difference) or ``cosine``
            (``1 - cos``); see the module docstring for the formulas.
        mask: optional bool ``[...]`` (the leading sizes): tokens where it is False count for
            nothing (e.g. padding).
        reduction: ``mean`` (over counted tokens; 0 when none), ``batchmean`` (sum / size(0)),
            ``sum``, or ``none`` (one value per token, shaped like the leading sizes).

    Returns:
        float32 loss (float64 for float64 input): a scalar, or ``[...]`` for ``reduction="none"``.
    """
    _checks.check_feature_pair(student_hidden, teacher_hidden)
    kind = _checks.check_choice("kind", kind, FEATURE_KINDS)
    reduction = _checks.check_reduction(reduction)
    mask = _checks.check_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    projected = _project(student_hidden, projection, projection_bias)
    _checks.check_projected(projected, teacher_hidden)

    dtype = _loss_dtype(projected)
    projected = projected.to(dtype)
    target = teacher_hidden.detach().to(dtype)
    if kind == "mse":
        token_loss = (projected - target).pow(2).mean(dim=-1)
    else:
        dot = (projected * target).sum(dim=-1)
        norms = projected.norm(dim=-1).clamp(min=NORM_EPS) * target.norm(dim=-1).clamp(min=NORM_EPS)
        token_loss = 1.0 - dot / norms
    return _reduce_tokens(token_loss, mask, reduction)


def attention_map(features: torch.Tensor, *, p: float = 2.0, channel_dim: int = -1) -> torch.Tensor:
    """``[B, ..., C, ...] -> [B, M]``: mean over the channel dimension of ``|F|^p``, flattened over
    the other non-batch dimensions and L2-normalised per sample."""
    pooled = features.abs().pow(p).mean(dim=channel_dim).reshape(features.shape[0], -1)
    return F.normalize(pooled, dim=1, eps=NORM_EPS)


def attention_transfer_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    p: float = 2.0,
    channel_dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Attention transfer: squared distance of the normalised channel-pooled maps, per sample.

    Args:
        student_features: ``[B, ...]`` floating, e.g. ``[B, S, D_s]`` hidden states (channels last)
            or ``[B, C_s, H, W]`` feature maps (``channel_dim=1``).
        teacher_features: same rank, same sizes except along ``channel_dim``; detached.
        p: exponent of the pooling, > 0 (2 in the paper).
        channel_dim: the dimension pooled away; not the batch dimension 0.
        reduction: ``mean``/``batchmean`` (over samples), ``sum`` or ``none`` (``[B]``).
    """
    _checks.check_attention_pair(student_features, teacher_features, channel_dim)
    p = _checks.check_exponent(p)
    reduction = _checks.check_reduction(reduction)
    dtype = _loss_dtype(student_features)
    student_map = attention_map(student_features.to(dtype), p=p, channel_dim=channel_dim)
    teacher_map = attention_map(teacher_features.detach().to(dtype), p=p, channel_dim=channel_dim)
    sample_loss = (student_map - teacher_map).pow(2).sum(dim=1)
    return _reduce_tokens(sample_loss, None, "mean" if reduction == "batchmean" else reduction)


class FeatureAlignmentLoss(nn.Module):
    """Hint loss with its learned projection ``nn.Linear(student_dim, teacher_dim)``.

    Add this module's parameters to the optimizer next to the student's. With equal widths and
    ``project=False`` there is no projection (the student's states are compared as they are).

    Example::

        align = FeatureAlignmentLoss(student_dim=128, teacher_dim=256, kind="cosine")
        optimizer = torch.optim.AdamW([*student.parameters(), *align.parameters()])
        loss = kd + 0.1 * align(student_hidden, teacher_hidden)
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse", *, bias: bool = True,
                 project: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        student_dim = _checks.check_positive_int("student_dim", student_dim)
        teacher_dim = _checks.check_positive_int("teacher_dim", teacher_dim)
        self.kind = _checks.check_choice("kind", kind, FEATURE_KINDS)
        self.reduction = _checks.check_reduction(reduction)
        if not project and student_dim != teacher_dim:
            raise ValueError(f"project=False needs student_dim == teacher_dim, got {student_dim} and {teacher_dim}")
        self.projection = nn.Linear(student_dim, teacher_dim, bias=bias) if project else None

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return feature_alignment_loss(student_hidden, teacher_hidden, self.projection, kind=self.kind,
                                      mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`attention_transfer_loss` (no parameters)."""

    def __init__(self, *, p: float = 2.0, channel_dim: int = -1, reduction: str = "mean") -> None:
        super().__init__()
        self.p = _checks.check_exponent(p)
        self.channel_dim = channel_dim
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return attention_transfer_loss(student_features, teacher_features, p=self.p,
                                       channel_dim=self.channel_dim, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"p={self.p}, channel_dim={self.channel_dim}, reduction={self.reduction!r}"
