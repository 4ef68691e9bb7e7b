"""Feature-alignment losses per token (per sample), in plain PyTorch (autograd gives the gradients).

* Hint loss (FitNets, Romero et al. 2015): a learned projection ``r`` maps the student's hidden
  states into the teacher's width, and the loss compares ``r(h_s)`` with ``h_t`` per token:
  ``mse``:    mean_d (r(h_s)_d - h_t_d)^2
  ``cosine``: 1 - <r(h_s), h_t> / (max(|r(h_s)|, eps) * max(|h_t|, eps))
* Attention transfer (Zagoruyko & Komodakis 2017): each sample's features are pooled over
  channels into a map ``Q = mean_c |F_c|^p``, flattened and L2-normalised; the loss per sample is
  ``|Q_s / |Q_s| - Q_t / |Q_t| |^2``. Only the non-channel sizes must agree, so no projection.

The teacher never receives a gradient (its features are detached). Low-precision inputs are
upcast: the losses are computed in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from kdkernels import _checks
from kdkernels._config import math_dtype

FEATURE_KINDS = ("mse", "cosine")

# Floor on the vector norms in the cosine and the attention-map normalisation (a zero vector then
# has cosine 0 with anything, and a zero map stays zero), as F.cosine_similarity / F.normalize.
NORM_EPS = 1e-8

Projection = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def project(student_hidden: torch.Tensor, projection: Projection,
            projection_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """r(h_s): the student's hidden states [..., D_s] in the teacher's width [..., D_t]."""
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


def hint_token_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: Projection,
                    projection_bias: Optional[torch.Tensor], kind: str,
                    mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[..., D_s] x [..., D_t] -> [...]: the hint loss of each token (module docstring). Tokens the
    mask drops are replaced by zeros before anything reads them, so whatever they hold reaches
    neither the loss nor any gradient (a product with a 0 weight would turn inf into NaN)."""
    if mask is not None:
        keep = mask.unsqueeze(-1)
        student_hidden = torch.where(keep, student_hidden, torch.zeros((), dtype=student_hidden.dtype,
                                                                       device=student_hidden.device))
        teacher_hidden = torch.where(keep, teacher_hidden, torch.zeros((), dtype=teacher_hidden.dtype,
                                                                       device=teacher_hidden.device))
    projected = project(student_hidden, projection, projection_bias)
    _checks.check_projected(projected, teacher_hidden)
    dtype = math_dtype(projected.dtype)
    projected = projected.to(dtype)
    target = teacher_hidden.detach().to(dtype)
    if kind == "mse":
        return (projected - target).pow(2).mean(dim=-1)
    dot = (projected * target).sum(dim=-1)
    norms = projected.norm(dim=-1).clamp(min=NORM_EPS) * target.norm(dim=-1).clamp(min=NORM_EPS)
    return 1.0 - dot / norms


def attention_map(features: torch.Tensor, *, p: float = 2.0, channel_dim: int = -1) -> torch.Tensor:
    """``[B, ..., C, ...] -> [B, M]``: mean over the channel dimension of ``|F|^p``, flattened over
    the other non-batch dimensions and L2-normalised per sample."""
    pooled = features.abs().pow(p).mean(dim=channel_dim)
    pooled = pooled.reshape(pooled.shape[0], math.prod(pooled.shape[1:]))  # -1 cannot be inferred at B = 0
    return F.normalize(pooled, dim=1, eps=NORM_EPS)


def attention_sample_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float,
                          channel_dim: int) -> torch.Tensor:
    """[B]: squared distance of the normalised attention maps of each sample."""
    dtype = math_dtype(student_features.dtype)
    student_map = attention_map(student_features.to(dtype), p=p, channel_dim=channel_dim)
    teacher_map = attention_map(teacher_features.detach().to(dtype), p=p, channel_dim=channel_dim)
    return (student_map - teacher_map).pow(2).sum(dim=1)
