"""Knowledge distillation in Hugging Face ``transformers``: a ``Trainer`` subclass and a
``compute_loss_func`` for causal language models.

- :class:`KDTrainer` runs the student and the teacher on each batch and computes the loss with
  :func:`kdkernels.fused_linear_kd_loss` from the student's final hidden states (the input of its
  lm_head) and lm_head weight: the ``[tokens, vocab]`` student logits are never materialised
  (the lm_head is asked for logits of zero positions). The teacher's logits are formed chunk by
  chunk inside the same call.
- :func:`kd_loss_func` is a ``compute_loss_func`` for an unchanged ``transformers.Trainer``: it
  reads the student's logits from its outputs, runs the teacher on the same batch and calls
  :func:`kdkernels.kd_loss`.

Both follow transformers' causal LM loss: position ``i`` predicts ``labels[i + 1]`` (the labels
are shifted, the last position predicts nothing; a ``shift_labels`` entry in the batch is used
as it is), ``-100`` marks tokens that are not predicted, and the loss of a batch is the sum over
its predicted tokens divided by ``num_items_in_batch`` (the predicted tokens of the whole
accumulated batch), so N gradient-accumulation micro-steps make the same update as one big step.

Importing this module needs ``transformers`` (and, to train, ``accelerate``); ``import kdkernels``
does not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
import transformers
from transformers.trainer_utils import IntervalStrategy

from kdkernels import _checks, fused_linear_kd_loss, kd_loss
from kdkernels._config import KDConfig

IGNORE_INDEX = -100  # transformers' label for "not a prediction target"


# --- how a model turns its lm_head output into logits -----------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """A model's final logits as a function of its lm_head output ``y``:
    ``softcap * tanh(logit_scale * y / softcap)`` (just ``logit_scale * y`` when ``softcap`` is
    None). Cohere scales by ``config.logit_scale``, Granite divides by ``config.logits_scaling``,
    Gemma 2/3 soft-cap with ``config.final_logit_softcapping``."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def apply(self, lm_head_output: torch.Tensor) -> torch.Tensor:
        logits = lm_head_output * self.logit_scale if self.logit_scale != 1.0 else lm_head_output
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _candidate_transforms(config) -> list:
    """The transforms a model with this config may apply, most specific first."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scales = []
    logit_scale = _number(getattr(text, "logit_scale", None))
    if logit_scale is not None:
        scales.append(logit_scale)
    logits_scaling = _number(getattr(text, "logits_scaling", None))
    if logits_scaling is not None:  # Granite divides by it; some models multiply: the probe decides
        scales += [1.0 / logits_scaling, logits_scaling]
    scales.append(1.0)
    softcap = _number(getattr(text, "final_logit_softcapping", None))
    caps = [softcap, None] if softcap is not None else [None]
    return [LogitTransform(scale, cap) for cap in caps for scale in scales]


def detect_logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The :class:`LogitTransform` of a causal LM: candidates read from its config
    (``logit_scale``, ``logits_scaling``, ``final_logit_softcapping``), the one that reproduces
    the model's own logits on a 4-token probe (eval mode, no gradient). Raises ValueError when
    none does (then pass the transform explicitly)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = (torch.arange(4, device=device) % vocab).unsqueeze(0)  # [1, 4]
    was_training = model.training
    model.eval()
    head = _LMHeadCapture(model, compute_logits=True)
    try:
        with torch.no_grad(), head.capturing():
            logits = model(input_ids=probe).logits.float()
            lm_head_output = head.output
    finally:
        head.remove()
        model.train(was_training)
    eps = torch.finfo(lm_head_output.dtype).eps
    lm_head_output = lm_head_output.float()
    tolerance = 64 * eps * max(1.0, float(logits.abs().max()))
    for candidate in _candidate_transforms(model.config):
        if float((candidate.apply(lm_head_output) - logits).abs().max()) <= tolerance:
            return candidate
    raise ValueError(
        f"{type(model).__name__}'s logits are not softcap(logit_scale * lm_head(hidden)) for any logit_scale / "
        f"softcap in its config; pass the model's LogitTransform explicitly")


# --- the lm_head's input: the final hidden states ---------------------------------------------


@dataclass
class LMHead:
    """A model's final hidden states and lm_head: its logits are
    ``transform.apply(hidden @ weight.T + bias)``.

    hidden: ``[B, S, H]`` the lm_head's input. weight: ``[V, H]``. bias: ``[V]`` or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    transform: LogitTransform


class _LMHeadCapture:
    """Hooks on ``model``'s output embeddings (its lm_head) that, inside :meth:`capturing`, record
    its input and output; unless ``compute_logits``, the lm_head is then handed zero positions of
    its input, so the model computes no ``[B, S, V]`` logits (its softcap / scaling run on an empty
    tensor). Outside :meth:`capturing` the model runs unchanged. The hooks stay registered (until
    :meth:`remove`): adding and removing them every step would make a compiled model recompile."""

    def __init__(self, model: torch.nn.Module, compute_logits: bool = False) -> None:
        self.module = model.get_output_embeddings()
        if self.module is None or not hasattr(self.module, "weight"):
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) with a weight")
        self.compute_logits = compute_logits
        self.active = False
        self.hidden: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.handles = [self.module.register_forward_pre_hook(self._pre_hook),
                        self.module.register_forward_hook(self._hook)]

    def _pre_hook(self, module, args):
        if not self.active:
            return None
        (hidden, *rest) = args
        self.hidden = hidden
        if not self.compute_logits:
            return (hidden.narrow(-2, 0, 0), *rest)
        return None

    def _hook(self, module, args, output):
        if self.active:
            self.output = output

    @contextlib.contextmanager
    def capturing(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self.hidden = self.output = None  # the caller keeps what it took, nothing more

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self, transform: LogitTransform) -> LMHead:
        if self.hidden is None:
            raise RuntimeError("the model's forward never called its output embeddings module (lm_head), so its "
                               "final hidden states could not be read")
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        hidden = self.hidden
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(weight.dtype)  # what the lm_head's own matmul would need
        return LMHead(hidden, weight, bias, transform)


# --- labels -----------------------------------------------------------------------------------


def next_token_labels(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prediction target of each position, ``[B, S]``: ``labels[:, i + 1]`` at position ``i``,
    ``-100`` at the last (transformers' causal LM shift); ``shift_labels`` when given."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("the batch has no `labels` (the token ids to predict, -100 where none is predicted); "
                         "KD on a causal LM needs them to choose the positions that count")
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _tokens(targets: torch.Tensor, num_items_in_batch) -> Any:
    """The loss divisor: transformers' num_items_in_batch, else this batch's predicted tokens."""
    if num_items_in_batch is not None:
        return num_items_in_batch
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def _match_vocab(teacher_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Teacher logits cut (or -inf padded) to the student's vocabulary of ``vocab`` ids."""
    if teacher_logits.shape[-1] >= vocab:
        return teacher_logits[..., :vocab]
    return F.pad(teacher_logits, (0, vocab - teacher_logits.shape[-1]), value=-math.inf)


# --- KD options and teachers ------------------------------------------------------------------


@dataclass(frozen=True)
class KDOptions:
    """The options of the KD loss a trainer fixes for a run: the validated :class:`KDConfig`
    (per token ``ce_weight * CE + kd_weight * T^2 * D(teacher || student)``), the backend and the
    fused lm_head's chunk size (None: kdkernels' default)."""

    config: KDConfig
    backend: str = "auto"
    chunk_size: Optional[int] = None

    @classmethod
    def make(cls, *, backend: str = "auto", chunk_size: Optional[int] = None, **loss_options) -> "KDOptions":
        """From :func:`kdkernels.kd_loss`'s keyword options (divergence, temperature, beta,
        kd_weight, ce_weight, scale_by_t2), validated; ignore_index is transformers' -100."""
        options = {**asdict(KDConfig()), **loss_options, "ignore_index": IGNORE_INDEX}
        return cls(_checks.make_config(has_labels=True, **options), backend, chunk_size)

    def loss_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of kd_loss (and of fused_linear_kd_loss, with ``chunk_size``)."""
        return dict(asdict(self.config), backend=self.backend)


class TeacherSource(Protocol):
    """What :class:`KDTrainer` asks of a teacher. A causal LM (any ``torch.nn.Module``) is wrapped
    in :class:`ModelTeacher`; another source (e.g. a cache of the teacher's top-k log-probs that
    the data collator puts in each batch) passes an object with ``kd_loss_sum`` and, optionally,
    ``batch_keys`` (the batch entries it reads, kept out of the student's forward) and
    ``to(device, dtype)``."""

    batch_keys: Tuple[str, ...] = ()

    def kd_loss_sum(self, student: LMHead, targets: torch.Tensor, batch: Mapping[str, Any],
                    options: KDOptions) -> torch.Tensor:
        """The loss summed over the predicted tokens (``targets != -100``) of this batch.
        student: the student's final hidden states and lm_head; targets: ``[B, S]`` next-token
        labels; batch: the student's forward inputs plus the ``batch_keys`` entries (no labels)."""
        ...


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout), no parameter requires grad."""
    model.eval()
    model.requires_grad_(False)
    return model


class ModelTeacher:
    """A frozen causal LM teacher, run on each batch of the student (eval mode, no gradient).

    Its vocabulary is matched to the student's: lm_head rows past the student's vocabulary
    (padding or tokens the student lacks) are dropped; a shorter teacher vocabulary is padded
    with ``-inf`` logits (probability 0). ``transform``: the model's :class:`LogitTransform`; default:
    detected with :func:`detect_logit_transform`."""

    def __init__(self, model: torch.nn.Module, transform: Optional[LogitTransform] = None) -> None:
        self.model = freeze(model)
        self.transform = transform or detect_logit_transform(self.model)
        self._head = _LMHeadCapture(self.model)

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "ModelTeacher":
        self.model.to(device=device, dtype=dtype)
        return self

    def kd_loss_sum(self, student: LMHead, targets: torch.Tensor, batch: Mapping[str, Any],
                    options: KDOptions) -> torch.Tensor:
        with torch.no_grad(), self._head.capturing():
            self.model(**batch)
            teacher = self._head.result(self.transform)
        vocab = student.weight.shape[0]
        weight, bias, hidden = teacher.weight[:vocab], teacher.bias, teacher.hidden
        bias = None if bias is None else bias[:vocab]
        cap, scale = student.transform.softcap, student.transform.logit_scale
        kwargs = dict(student_bias=student.bias, softcap=cap, logit_scale=scale, chunk_size=options.chunk_size,
                      reduction="sum", **options.loss_kwargs())
        if teacher.transform.softcap == cap:
            # fused_linear_kd_loss applies one (logit_scale, softcap) to both lm_heads: fold the
            # teacher's own scale into its hidden states (and bias), exactly
            ratio = teacher.transform.logit_scale / scale
            if ratio != 1.0:
                hidden = hidden * ratio
                bias = None if bias is None else bias * ratio
            return fused_linear_kd_loss(student.hidden, student.weight, hidden, weight, targets,
                                        teacher_bias=bias, **kwargs)
        # different soft caps: the teacher's logits are formed here, [B, S, V_t], without gradient
        with torch.no_grad():
            logits = teacher.transform.apply(F.linear(hidden, weight, bias))
        return fused_linear_kd_loss(student.hidden, student.weight, labels=targets, teacher_logits=logits,
                                    **kwargs)


# --- the Trainer --------------------------------------------------------------------------------


@dataclass
class _LossParts:
    """The unweighted KD and CE terms of the optimizer step about to be logged (sums of the
    micro-steps' per-token means, as the loss)."""

    step: int
    values: Dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value)


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher`` into the student ``model`` (causal LMs).

    Per batch: the student's forward (its lm_head computes no logits), the teacher's forward
    (no gradient), then one :func:`kdkernels.fused_linear_kd_loss` call over the predicted tokens:
    ``loss = sum_tokens(ce_weight * CE + kd_weight * T^2 * D(teacher || student)) /
    num_items_in_batch``. Each model's ``logit_scale`` / ``logits_scaling`` /
    ``final_logit_softcapping`` (found with :func:`detect_logit_transform`) is applied to its
    logits. The logs carry ``kd_loss`` (``T^2 * D``) and ``ce_loss`` (the student's cross-entropy),
    per token, of the last optimizer step before each log, beside ``loss``.

    Args:
        model: the student, a causal LM (``...ForCausalLM``); trained.
        args: ``transformers.TrainingArguments``.
        teacher: the teacher, a causal LM over the same tokenizer (frozen here: eval mode, no
            gradients; moved to the student's device and cast to ``teacher_dtype``), or a
            :class:`TeacherSource` (its ``batch_keys`` entries of each batch go to it, not to the
            student; with a ``datasets.Dataset`` pass ``remove_unused_columns=False``).
            Vocabularies may differ in size: the teacher's is cut or ``-inf`` padded to the
            student's.
        divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, backend: the loss
            options of :func:`kdkernels.kd_loss`.
        chunk_size: tokens per chunk of the fused lm_head loss (None: kdkernels' default).
        teacher_dtype: the teacher's parameter dtype; default: the student's.
        student_logit_transform, teacher_logit_transform: override the detected
            :class:`LogitTransform` of each model.
        log_loss_parts: log ``kd_loss`` / ``ce_loss``. With both weights > 0 this costs one more
            forward pass of the student lm_head (no gradient) on the steps that are logged.
        **trainer_kwargs: everything else ``transformers.Trainer`` takes (``train_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``, ...).

    Batches need ``labels`` (or ``shift_labels``), as for transformers' causal LM loss.
    """

    def __init__(self, model=None, args=None, *, teacher=None, divergence: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 scale_by_t2: bool = True, backend: str = "auto", chunk_size: Optional[int] = None,
                 teacher_dtype: Optional[torch.dtype] = None,
                 student_logit_transform: Optional[LogitTransform] = None,
                 teacher_logit_transform: Optional[LogitTransform] = None,
                 log_loss_parts: bool = True, **trainer_kwargs) -> None:
        if teacher is None:
            raise ValueError("KDTrainer needs a teacher: a causal LM or a TeacherSource")
        self.kd_options = KDOptions.make(divergence=divergence, temperature=temperature, beta=beta,
                                         kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
                                         backend=backend, chunk_size=chunk_size)
        super().__init__(model=model, args=args, **trainer_kwargs)
        # The loss is normalised by num_items_in_batch: have transformers count it (it does so for
        # models whose forward takes loss kwargs, or for a compute_loss_func), over the shifted
        # labels (it does so only for models it knows as causal LMs), and treat the loss as
        # already scaled for gradient accumulation when it is given (and divide it otherwise).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        parameter = next(self.model.parameters())
        if isinstance(teacher, torch.nn.Module):
            teacher = ModelTeacher(teacher, teacher_logit_transform)
        if hasattr(teacher, "to"):
            teacher.to(parameter.device, teacher_dtype or parameter.dtype)
        self.teacher = teacher
        self.student_logit_transform = student_logit_transform or detect_logit_transform(self.model)
        self._student_head = _LMHeadCapture(self.model)
        self.log_loss_parts = log_loss_parts
        self._loss_parts: Optional[_LossParts] = None

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = next_token_labels(inputs.pop("labels", None), inputs.pop("shift_labels", None))
        teacher_entries = {key: inputs.pop(key) for key in getattr(self.teacher, "batch_keys", ())}
        with self._student_head.capturing():
            outputs = model(**inputs)
            student = self._student_head.result(self.student_logit_transform)
        tokens = _tokens(targets, num_items_in_batch)
        loss = self.teacher.kd_loss_sum(student, targets, {**inputs, **teacher_entries}, self.kd_options) / tokens
        if self.log_loss_parts and model.training and self._logged_after_this_step():
            self._record_loss_parts(loss.detach(), student, targets, tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens while the gradients are averaged
            # over the processes (as transformers' own compute_loss does)
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size)
        return (loss, outputs) if return_outputs else loss

    def _logged_after_this_step(self) -> bool:
        """Whether transformers logs after the optimizer step this micro-step belongs to."""
        args, state = self.args, self.state
        step = state.global_step + 1
        if args.logging_first_step and step == 1:
            return True
        if args.logging_strategy == IntervalStrategy.STEPS:
            return bool(state.logging_steps) and step % state.logging_steps == 0
        return args.logging_strategy == IntervalStrategy.EPOCH

    def _record_loss_parts(self, loss: torch.Tensor, student: LMHead, targets: torch.Tensor, tokens) -> None:
        options = self.kd_options.config
        if self._loss_parts is None or self._loss_parts.step != self.state.global_step:
            self._loss_parts = _LossParts(self.state.global_step)
        if options.kd_weight == 0:
            if options.ce_weight > 0:
                self._loss_parts.add("ce_loss", loss / options.ce_weight)
            return
        ce = torch.zeros(())
        if options.ce_weight > 0:
            with torch.no_grad():  # CE only: the student against itself with kd_weight 0
                hidden, weight = student.hidden.detach(), student.weight.detach()
                bias = None if student.bias is None else student.bias.detach()
                ce = fused_linear_kd_loss(hidden, weight, hidden, weight, targets, student_bias=bias,
                                          teacher_bias=bias, softcap=student.transform.softcap,
                                          logit_scale=student.transform.logit_scale,
                                          chunk_size=self.kd_options.chunk_size, reduction="sum",
                                          **{**self.kd_options.loss_kwargs(), "kd_weight": 0.0,
                                             "ce_weight": 1.0}) / tokens
            self._loss_parts.add("ce_loss", ce)
        self._loss_parts.add("kd_loss", (loss.cpu() - options.ce_weight * ce.cpu()) / options.kd_weight)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts is not None:
            logs = {**logs, **self._loss_parts.values}
            self._loss_parts = None
        super().log(logs, *args, **kwargs)


# --- compute_loss_func for an unchanged Trainer -------------------------------------------------


class KDLossFunc:
    """``compute_loss_func(outputs, labels, num_items_in_batch)`` distilling ``teacher`` into
    ``student``; made by :func:`kd_loss_func`. A forward pre-hook on the student keeps the inputs
    of its latest forward, on which the teacher is run; :meth:`remove` takes the hook off."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, options: KDOptions,
                 teacher_dtype: Optional[torch.dtype]) -> None:
        self.teacher = freeze(teacher)
        self.teacher.to(dtype=teacher_dtype or next(student.parameters()).dtype)
        self.options = options
        self._inputs: Optional[tuple] = None
        self._handle = student.register_forward_pre_hook(self._remember_inputs, with_kwargs=True)

    def _remember_inputs(self, module, args, kwargs) -> None:
        # the loss kwargs transformers may add are the student's business, not the teacher's
        kwargs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        self._inputs = (args, kwargs)

    def remove(self) -> None:
        self._handle.remove()

    def __call__(self, outputs, labels: Optional[torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError("the student has not run a forward pass since this loss function was made")
        student_logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]  # [B, S, V]
        args, kwargs = self._inputs
        self._inputs = None
        device = student_logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_outputs = self.teacher(*args, **kwargs)
        teacher_logits = teacher_outputs["logits"] if isinstance(teacher_outputs, Mapping) else teacher_outputs[0]
        targets = next_token_labels(labels)
        loss = kd_loss(student_logits, _match_vocab(teacher_logits, student_logits.shape[-1]), targets,
                       reduction="sum", **self.options.loss_kwargs())
        return loss / _tokens(targets, num_items_in_batch)


def kd_loss_func(teacher: torch.nn.Module, student: torch.nn.Module, *, divergence: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 scale_by_t2: bool = True, backend: str = "auto",
                 teacher_dtype: Optional[torch.dtype] = None) -> KDLossFunc:
    """A ``compute_loss_func`` for ``transformers.Trainer`` that distils ``teacher`` into
    ``student`` with :func:`kdkernels.kd_loss` on the student's logits (which the model computes
    as usual, with its own soft cap / logit scale)::

        trainer = Trainer(model=student, args=args, train_dataset=...,
                          compute_loss_func=kd_loss_func(teacher, student, temperature=2.0))

    The teacher is frozen (eval mode, no gradients), cast to ``teacher_dtype`` (default: the
    student's dtype) and moved to the student's device at the first call; its vocabulary is cut
    or ``-inf`` padded to the student's. The labels are shifted as transformers' causal LM loss
    does, and the summed loss is divided by ``num_items_in_batch``. transformers counts that over
    the shifted labels only for models it knows as causal LMs (``model.loss_type ==
    "ForCausalLM"``, e.g. Llama); for others its count includes each sequence's first label:
    :class:`KDTrainer` counts exactly for every model.

    Args: teacher, student: causal LMs over the same tokenizer; the loss options as in
    :func:`kdkernels.kd_loss`.
    """
    options = KDOptions.make(divergence=divergence, temperature=temperature, beta=beta, kd_weight=kd_weight,
                             ce_weight=ce_weight, scale_by_t2=scale_by_t2, backend=backend)
    return KDLossFunc(teacher, student, options, teacher_dtype)


__all__ = ["KDTrainer", "kd_loss_func", "KDLossFunc", "KDOptions", "LMHead", "LogitTransform", "ModelTeacher",
           "TeacherSource", "detect_logit_transform", "next_token_labels"]
