"""The training loop and the student's loss, written against kdkernels' public API only."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import kdkernels
from kdkernels.train import parallel

LOSS_KINDS = ("ce", "kd", "cakd", "dkd")


@dataclass(frozen=True)
class OptimSettings:
    """How one model is trained: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50

    def with_steps(self, steps: int) -> "OptimSettings":
        """These settings for `steps` steps, still evaluating within them (every min(eval_every, steps))."""
        return replace(self, steps=steps, eval_every=max(1, min(self.eval_every, steps)))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class LossSpec:
    """The student's objective.

    ``ce``: cross-entropy on the next token only (no teacher).
    ``kd``: ``(1 - kd_weight) * CE + kd_weight * T^2 * D(p_T || q_T)`` with ``kdkernels.kd_loss``
    (or ``fused_linear_kd_loss`` on the lm_head when this kdkernels has it), ``D`` = ``divergence``.
    ``dkd`` / ``cakd``: ``(1 - kd_weight) * CE + kd_weight * L`` with ``L`` from
    ``kdkernels.dkd_loss`` / ``kdkernels.cakd_loss`` (which include their own T^2).
    A ``feature_align`` other than ``off`` adds ``feature_weight * hint(h_s, h_t)`` on the final
    hidden states (``kdkernels.FeatureAlignmentLoss``, a learned projection).
    """

    kind: str = "kd"
    divergence: str = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 0.5
    beta: float = 0.5
    feature_align: str = "off"
    feature_weight: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    cakd_groups: str = "teacher_topk"
    cakd_k: int = 8
    cakd_mass: float = 0.9

    @property
    def uses_teacher(self) -> bool:
        return self.kind != "ce"


def _head(model: nn.Module, vocab: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The lm_head's weight [vocab, D] and bias, cut to the vocabulary both models share."""
    bias = model.lm_head.bias
    return model.lm_head.weight[:vocab], (bias[:vocab] if bias is not None else None)


def _blended(loss_fn, student_logits, teacher_logits, labels, spec: LossSpec, **options) -> torch.Tensor:
    """``(1 - λ) CE + λ L``: in one call when the loss takes ce_weight/kd_weight, else CE apart."""
    params = inspect.signature(loss_fn).parameters
    if "ce_weight" in params and "kd_weight" in params:
        return loss_fn(student_logits, teacher_logits, labels, ce_weight=1.0 - spec.kd_weight,
                       kd_weight=spec.kd_weight, **options)
    distill = loss_fn(student_logits, teacher_logits, labels, **options)
    return (1.0 - spec.kd_weight) * F.cross_entropy(student_logits, labels) + spec.kd_weight * distill


def _kd_options(spec: LossSpec) -> dict:
    return dict(divergence=spec.divergence, temperature=spec.temperature, beta=spec.beta,
                kd_weight=spec.kd_weight, ce_weight=1.0 - spec.kd_weight)


def _loss_on_logits(spec: LossSpec, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """The distillation loss with its CE blend from ``[N, V]`` logits and ``[N]`` labels."""
    if spec.kind == "kd":
        return kdkernels.kd_loss(student_logits, teacher_logits, labels, **_kd_options(spec))
    if spec.kind == "dkd":
        return _blended(kdkernels.dkd_loss, student_logits, teacher_logits, labels, spec,
                        alpha=spec.dkd_alpha, beta=spec.dkd_beta, temperature=spec.temperature)
    if spec.kind == "cakd":
        k = spec.cakd_k if spec.cakd_groups == "teacher_topk" else None
        mass = spec.cakd_mass if spec.cakd_groups == "teacher_mass" else None
        return _blended(kdkernels.cakd_loss, student_logits, teacher_logits, labels, spec,
                        groups=spec.cakd_groups, k=k, mass=mass, temperature=spec.temperature)
    raise ValueError(f"kind must be one of {LOSS_KINDS[1:]} for a distillation loss, got {spec.kind!r}")


def check_loss_spec(spec: LossSpec) -> None:
    """Raises the loss's own ValueError/TypeError for options it rejects, before any training."""
    if spec.kind == "ce":
        return
    probe = torch.zeros(1, max(2, spec.cakd_k + 1))  # room for CAKD's top-k set
    with torch.no_grad():
        _loss_on_logits(spec, probe, probe, torch.zeros(1, dtype=torch.long))


def fused_linear_available() -> bool:
    return hasattr(kdkernels, "fused_linear_kd_loss")


def student_objective(spec: LossSpec, student: nn.Module, teacher: Optional[nn.Module],
                      inputs: torch.Tensor, targets: torch.Tensor,
                      align: Optional[nn.Module] = None) -> torch.Tensor:
    """The student's training loss on one batch: ``inputs``/``targets`` are ``[B, S]`` token ids."""
    hidden = student.hidden_states(inputs)  # [B, S, D_s]
    labels = targets.reshape(-1)  # [B*S]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # [B*S, D_s]
    if spec.kind == "ce":
        return F.cross_entropy(student.lm_head(hidden_2d), labels)

    with torch.no_grad():
        teacher_hidden = teacher.hidden_states(inputs)  # [B, S, D_t]
    teacher_2d = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    vocab = min(student.vocab_size, teacher.vocab_size)
    student_weight, student_bias = _head(student, vocab)
    teacher_weight, teacher_bias = _head(teacher, vocab)
    if spec.kind == "kd" and parallel.mode() != "none":  # the lm_heads split over ranks (--parallel)
        loss = parallel.fused_linear_kd_loss(student, teacher, hidden_2d, teacher_2d, labels, **_kd_options(spec))
    elif spec.kind == "kd" and fused_linear_available():
        # The logits [B*S, V] are never materialised: the head GEMMs run chunk by chunk inside the loss.
        loss = kdkernels.fused_linear_kd_loss(hidden_2d, student_weight, teacher_2d, teacher_weight, labels,
                                              student_bias=student_bias, teacher_bias=teacher_bias,
                                              **_kd_options(spec))
    else:
        student_logits = F.linear(hidden_2d, student_weight, student_bias)  # [B*S, V]
        with torch.no_grad():
            teacher_logits = F.linear(teacher_2d, teacher_weight, teacher_bias)
        loss = _loss_on_logits(spec, student_logits, teacher_logits, labels)
    if align is not None:
        loss = loss + spec.feature_weight * align(hidden, teacher_hidden)
    return loss


@dataclass
class Evaluation:
    val_loss: float
    top1_agreement: Optional[float]  # fraction of tokens where student and teacher argmax agree


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, teacher_top1: Optional[torch.Tensor] = None,
             batch_size: int = 64) -> Evaluation:
    """Mean next-token CE over ``windows`` ``[N, S + 1]``, and agreement with ``teacher_top1`` ``[N, S]``."""
    was_training = model.training
    model.eval()
    total_loss, agree, tokens = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        logits = model(batch[:, :-1])  # [b, S, V]
        total_loss += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1), reduction="sum"))
        tokens += batch[:, 1:].numel()
        if teacher_top1 is not None:
            agree += int((logits.argmax(-1) == teacher_top1[start:start + batch_size]).sum())
    model.train(was_training)
    return Evaluation(total_loss / tokens, agree / tokens if teacher_top1 is not None else None)


@torch.no_grad()
def top1_predictions(model: nn.Module, windows: torch.Tensor, vocab: int, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(windows[i:i + batch_size, :-1])[..., :vocab].argmax(-1)
                      for i in range(0, len(windows), batch_size)])


@dataclass
class FitResult:
    curve: List[Tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    final: Optional[Evaluation] = None
    seconds: float = 0.0


def fit(model: nn.Module, extra_parameters: Iterable[nn.Parameter], batch_loss: Callable, batches: Iterable,
        optim: OptimSettings, evaluate_fn: Callable[[], Evaluation], *, desc: str,
        progress: bool = True) -> FitResult:
    """Trains ``model`` (and ``extra_parameters``, e.g. a feature projection) on ``batches`` of
    ``[B, S + 1]`` token windows with ``batch_loss(inputs, targets)``; evaluates every
    ``optim.eval_every`` steps and at the end."""
    parameters = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
    # Decay matrices only, as is usual for transformers (not norms, biases).
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95))
    result = FitResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(batches, total=optim.steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step)
        loss = batch_loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, optim.grad_clip)
        optimizer.step()
        done = step + 1
        if done % optim.eval_every == 0 or done == optim.steps:
            result.final = evaluate_fn()
            result.curve.append((done, result.final.val_loss))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{result.final.val_loss:.3f}")
        elif done % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
