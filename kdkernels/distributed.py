"""Vocabulary-parallel (tensor-parallel) KD losses over torch.distributed, and the DTensor entry
points of ``kd_loss`` (logits sharded along the vocabulary) and ``fused_linear_kd_loss`` (lm_head
weights sharded by FSDP2's ``fully_shard``).

Each rank r of a process group holds the columns [o_r, o_r + V_r) of the student and teacher logits
of the same N rows; the offsets o_r follow the rank order and the shards may be uneven. The row
math is the one of the single-device kernels (csrc/include/kdkernels/divergence.h), split at the
two points where a sum over the whole vocabulary is needed:

  1. statistics (local)  per row, the log-sum-exp of this shard of u = z_s / T and a = z_t / T
                         (and of z_s at T = 1 for the CE blend when T != 1);
  2. collective 1        one all-gather of those [k, N] values and V_r: the global log-sum-exps
                         (log-sum-exp over the ranks) and the vocabulary offsets;
  3. partials (local)    per row, this shard's share of the divergence, of the row constants its
                         gradient needs (C = sum_i c_i; a second one, C2, for skew_kl) and the
                         label's logit (only the rank that holds the label has it);
  4. collective 2        one SUM all-reduce of those [k2, N] values;
  5. gradient (local)    written once, in the forward pass, from the row constants of step 4;
                         backward only scales it. Forward KL's gradient needs no row constant,
                         so it is written in step 3 from the same probabilities (one pass fewer).

Both collectives move O(N) values per rank (never O(N * V)); backward moves nothing. An optional
third, tiny all-gather of call metadata (``check_consistency``) makes ranks that disagree on N,
dtypes, options or labels raise the same error on every rank instead of hanging.
"""

from __future__ import annotations

import math
import sys
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from kdkernels import _checks
from kdkernels._config import KDConfig
from kdkernels.ops.fused import first_order, scale_saved_grads
from kdkernels.ops.reduction import counted_rows, reduce_rows, reduction_scale

# Elements of one float32 [rows, V_r] temporary of the local phases: rows per chunk =
# CHUNK_ELEMENTS // V_r (at least 1). A phase holds up to about ten such temporaries at once, so
# the phases add ~40 MiB to the [N, V_r] gradient whatever N is; at V_r = 32000 a chunk is still
# 32 rows, long enough that the per-operation overhead does not show.
CHUNK_ELEMENTS = 1024 * 1024

# Row constants (C, and C2 for skew_kl) each divergence's gradient needs: divergence.h's kRowSum /
# kSecondRowSum.
ROW_CONSTANTS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 1, "skew_kl": 2, "skew_reverse_kl": 1, "tvd": 1}


# --- the process group -------------------------------------------------------------------------

def _all_gather(output: torch.Tensor, local: torch.Tensor, group) -> None:
    """output [world * local.numel()] <- every rank's `local`, in rank order (looked up at call
    time: torch >= 2.13 names it all_gather_single)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def _group_device(group, tensor: Optional[torch.Tensor]) -> torch.device:
    if isinstance(tensor, torch.Tensor):
        return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- call metadata: every rank must make the same call ------------------------------------------

_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_checks.FLOAT_DTYPES)}


def _labels_fingerprint(labels: Optional[torch.Tensor]) -> int:
    """A position-weighted sum of the labels: equal on every rank iff (almost surely) the labels are."""
    if labels is None:
        return -1
    flat = labels.reshape(-1).long()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device) % 1000003
    return int((flat * weights).sum())


def _options_code(*options) -> int:
    return zlib.crc32(repr(options).encode())


def _agree(group, device: torch.device, names: Sequence[str], values, local_error: Optional[Exception],
           *, differ: Sequence[str] = ()) -> List[List[int]]:
    """All-gathers one small int64 record per rank (a status, then `values`, one per name of
    `names`; a call `values` returns them, only called when `local_error` is None) and raises the
    same error on every rank when a rank rejected its arguments or the ranks disagree on a value
    whose name is not in `differ`. Returns every rank's values, in rank order."""
    world = dist.get_world_size(group)
    width = 1 + len(names)
    own = [1] + [0] * len(names) if local_error is not None else [0] + [int(v) for v in values()]
    record = torch.tensor(own, dtype=torch.int64)
    gathered = torch.empty(world * width, dtype=torch.int64, device=device)
    _all_gather(gathered, record.to(device), group)
    table = gathered.view(world, width).tolist()
    if local_error is not None:
        raise local_error
    failed = [rank for rank, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"rank(s) {failed} of the process group rejected their arguments (see the error "
                         f"raised there); every rank stops instead of waiting for them")
    for column, name in enumerate(names, start=1):
        values = [row[column] for row in table]
        if name not in differ and len(set(values)) > 1:
            raise ValueError(f"the ranks of the process group disagree on {name}: {values} in rank order; "
                             f"every rank must pass the same rows, dtypes, labels and options")
    return [row[1:] for row in table]


# --- the row math of one chunk of a shard (divergence.h, in float32 PyTorch) ---------------------

def _if_pos(prob: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """prob > 0 ? value : 0 (kd_if_pos): a zero probability contributes 0, never NaN."""
    return torch.where(prob > 0, value, 0.0)


class _Probs:
    """log-probabilities and probabilities of one chunk of this shard, float32 [n, V_r], from the
    global log-sum-exps [n] (finite: dead rows arrive with 0 and are masked by the caller)."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, inv_t: float,
                 lse_student: torch.Tensor, lse_teacher: torch.Tensor) -> None:
        # -lse + z / T in one pass, in float32 whatever the logits' dtype
        self.logq = torch.add(-lse_student[:, None], student, alpha=inv_t)
        self.logp = torch.add(-lse_teacher[:, None], teacher, alpha=inv_t)
        self.q, self.p = self.logq.exp(), self.logp.exp()


def _lse(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    """log-sum-exp of logits / T over the last dimension, in float32."""
    tempered = logits.float()
    return torch.logsumexp(tempered if inv_t == 1.0 else tempered * inv_t, -1)


def _terms(div: str, x: _Probs, wp: float, wq: float) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """This shard's share of the divergence [n] and of its row constants (divergence.h `terms`)."""
    logp, logq, p, q = x.logp, x.logq, x.p, x.q
    if div == "forward_kl":
        # p (log p - log q) with 0 where p = 0 (the NaN of 0 * inf), +inf kept where q = 0 < p
        terms = (logp - logq).mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        return terms.sum(-1), ()
    if div == "reverse_kl":
        kl = (q * _if_pos(q, logq - logp)).sum(-1)
        return kl, (kl,)
    if div == "jsd":
        m = wp * p + wq * q
        kl_q = (q * _if_pos(q, torch.log(q / m))).sum(-1)
        loss = torch.zeros_like(kl_q)
        if wp > 0:
            loss = loss + wp * _if_pos(p, p * torch.log(p / m)).sum(-1)
        if wq > 0:
            loss = loss + wq * kl_q
        return loss, (kl_q,)
    if div == "skew_kl":
        m = wp * p + wq * q
        loss = _if_pos(p, p * torch.log(p / m)).sum(-1)
        return loss, (_if_pos(m, q * p / m).sum(-1), _if_pos(m, wq * q * (p - q) / m).sum(-1))
    if div == "skew_reverse_kl":
        ratio = q / (wp * p + wq * q)
        log_ratio = torch.log(ratio)
        h = _if_pos(q, log_ratio - wq * ratio)
        return _if_pos(q, q * log_ratio).sum(-1), ((q * h).sum(-1),)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1), ((q * _tvd_sigma(p, q)).sum(-1),)
    raise ValueError(f"unknown divergence {div!r}")


def _tvd_sigma(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.sign(q - p)


def _divergence_grad(div: str, x: _Probs, wp: float, wq: float, consts: Sequence[torch.Tensor]) -> torch.Tensor:
    """dD/du [n, V_r] given the global row constants [n] (divergence.h `grad` / `grad2`)."""
    logp, logq, p, q = x.logp, x.logq, x.p, x.q
    c = consts[0][:, None] if consts else None
    if div == "forward_kl":
        return q - p
    if div == "reverse_kl":
        return _if_pos(q, q * (logq - logp - c))
    if div == "jsd":
        if not (wp > 0 and wq > 0):  # beta in {0, 1}: D = 0 for every q
            return torch.zeros_like(q)
        m = wp * p + wq * q
        return wq * _if_pos(q, q * (torch.log(q / m) - c))
    if div == "skew_kl":
        if not wq > 0:
            return torch.zeros_like(q)
        # w - 1 = (1 - alpha)(p - q) / m keeps the precision where w = p / m is near 1 (grad2)
        m = wp * p + wq * q
        w = _if_pos(m, p / m)
        w_minus_1 = _if_pos(m, wq * (p - q) / m)
        gap = torch.where(w > 0.5, consts[1][:, None] - w_minus_1, c - w)
        return wq * q * gap
    if div == "skew_reverse_kl":
        if not wp > 0:  # alpha = 1: m = q, D = 0 for every q
            return torch.zeros_like(q)
        ratio = q / (wp * p + wq * q)
        return _if_pos(q, q * (torch.log(ratio) - wq * ratio - c))
    if div == "tvd":
        return q * (_tvd_sigma(p, q) - c)
    raise ValueError(f"unknown divergence {div!r}")


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


# --- the vocab-parallel rows: the backend contract of kdkernels.backends, over a process group --

def rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: KDConfig, compute_grad: bool, *, group=None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Row losses [N] (float32, equal on every rank) and this shard's gradient [N, V_r] of
    ``grad_scale * row_loss.sum()`` (in the student dtype; None unless ``compute_grad``), from
    this rank's vocabulary shard of the logits [N, V_r] and the full labels [N] (global vocabulary
    ids, or ``cfg.ignore_index``). Two collectives of O(N) values on ``group``; every rank of the
    group must call it with the same N and options. Raises ValueError on every rank for NaN / +inf
    logits, labels outside the global vocabulary, and student rows the loss cannot be defined on."""
    n_rows, vocab = student_logits.shape
    inv_t = 1.0 / cfg.temperature
    wp, wq = cfg.mixture_weights
    with_ce = cfg.ce_weight > 0 and labels is not None
    ce_stats = with_ce and cfg.temperature != 1.0  # at T = 1 the CE softmax is the student's q
    device = student_logits.device

    # 1. local statistics: log-sum-exp of each distribution over this shard, [k, N], then V_r
    n_stats = 3 if ce_stats else 2
    local = torch.empty(n_stats * n_rows + 1, dtype=torch.float32, device=device)
    stats = local[:-1].view(n_stats, n_rows)
    for start, end in _row_chunks(n_rows, vocab):
        stats[0, start:end] = _lse(student_logits[start:end], inv_t)
        stats[1, start:end] = _lse(teacher_logits[start:end], inv_t)
        if ce_stats:
            stats[2, start:end] = _lse(student_logits[start:end], 1.0)
    local[-1] = float(vocab)  # exact in float32 below 2**24

    # 2. collective 1: every rank's statistics; the global log-sum-exps and this shard's offset
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = torch.empty(world * local.numel(), dtype=torch.float32, device=device).view(world, -1)
    _all_gather(gathered.view(-1), local, group)
    lse = torch.logsumexp(gathered[:, :-1].view(world, n_stats, n_rows), dim=0)  # -inf where all -inf
    vocab_sizes = [int(v) for v in gathered[:, -1].tolist()]
    offset, total_vocab = sum(vocab_sizes[:rank]), sum(vocab_sizes)
    # the same checks on every rank, from the same gathered values
    if bool((torch.isnan(lse[1]) | torch.isposinf(lse[1])).any()):
        raise _checks.not_finite_error("teacher_logits")
    if bool((torch.isnan(lse) | torch.isposinf(lse)).any()):
        raise _checks.not_finite_error("student_logits")
    valid = torch.ones(n_rows, dtype=torch.bool, device=device) if labels is None else labels != cfg.ignore_index
    if labels is not None:
        used = labels[valid]
        if used.numel() and (bool((used < 0).any()) or bool((used >= total_vocab).any())):
            raise ValueError(f"labels must lie in [0, {total_vocab}) (the vocabulary of all ranks' shards) "
                             f"or equal ignore_index ({cfg.ignore_index})")
    if bool((torch.isneginf(lse[0]) & valid).any()):
        raise ValueError("student_logits has a row whose every entry is -inf (on every rank's shard); "
                         "such a row has no distribution (ignore it with labels == ignore_index)")
    teacher_alive = ~torch.isneginf(lse[1])  # a teacher row entirely -inf has no KD term
    lse_student = torch.where(torch.isfinite(lse[0]), lse[0], 0.0)
    lse_teacher = torch.where(teacher_alive, lse[1], 0.0)
    lse_ce = (torch.where(torch.isfinite(lse[2]), lse[2], 0.0) if ce_stats else lse_student)

    # the label's logit, on the rank whose shard holds it (0 elsewhere)
    if with_ce:
        local_label = labels.long() - offset
        owned = valid & (local_label >= 0) & (local_label < vocab)
        local_label = local_label.clamp(0, vocab - 1)

    # dL/dz = kd_scale / T * dD/du + ce_weight * (softmax(z) - e_y), per chunk of rows
    n_consts = ROW_CONSTANTS[cfg.divergence]
    grad = None
    if compute_grad:
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        kd_rows = teacher_alive & valid & (cfg.kd_scale > 0)
        kd_coef = torch.where(kd_rows, grad_scale * cfg.kd_grad_scale, 0.0)
        # rows without a KD term may hold inf / NaN terms (no teacher, ignored): zeroed, not scaled
        kd_dead = ~kd_rows if not bool(kd_rows.all()) else None
        ce_coef = torch.where(valid, grad_scale * cfg.ce_weight, 0.0) if with_ce else None

    def write_grad(start: int, end: int, x: _Probs, consts: Sequence[torch.Tensor]) -> None:
        chunk = _divergence_grad(cfg.divergence, x, wp, wq, consts)  # a new tensor
        chunk.mul_(kd_coef[start:end, None])
        if kd_dead is not None:
            chunk.masked_fill_(kd_dead[start:end, None], 0.0)
        if with_ce:
            softmax = x.q if not ce_stats else torch.add(-lse_ce[start:end, None], student_logits[start:end]).exp_()
            chunk.addcmul_(softmax, ce_coef[start:end, None])
            rows_here = torch.arange(end - start, device=device)
            hit = owned[start:end]
            chunk[rows_here[hit], local_label[start:end][hit]] -= ce_coef[start:end][hit]
        grad[start:end] = chunk

    # 3. local partials [k2, N]: divergence, row constants, label logit. A divergence whose
    # gradient needs no row constant (forward KL) has its gradient written here, from the same
    # probabilities, instead of in a pass of its own after collective 2.
    early_grad = compute_grad and n_consts == 0
    partials = torch.zeros(1 + n_consts + with_ce, n_rows, dtype=torch.float32, device=device)
    for start, end in _row_chunks(n_rows, vocab):
        x = _Probs(student_logits[start:end], teacher_logits[start:end], inv_t, lse_student[start:end],
                   lse_teacher[start:end])
        divergence, consts = _terms(cfg.divergence, x, wp, wq)
        partials[0, start:end] = divergence
        for i, const in enumerate(consts, start=1):
            partials[i, start:end] = const
        if early_grad:
            write_grad(start, end, x, ())
        del x
    if with_ce:
        label_logit = student_logits.gather(1, local_label[:, None]).squeeze(1).float()
        partials[-1] = torch.where(owned, label_logit, 0.0)

    # 4. collective 2: the sums over the whole vocabulary
    dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)

    kd_term = torch.where(teacher_alive & (cfg.kd_scale > 0), cfg.kd_scale * partials[0], 0.0)
    row_loss = kd_term
    if with_ce:
        ce_term = cfg.ce_weight * (lse_ce - partials[-1])
        if bool((valid & torch.isinf(ce_term)).any()):
            raise ValueError("student_logits is -inf at a row's label (the CE term would be infinite)")
        row_loss = row_loss + ce_term
    row_loss = torch.where(valid, row_loss, 0.0)
    if cfg.divergence in ("forward_kl", "skew_kl") and bool((valid & torch.isposinf(kd_term)).any()):
        raise ValueError(f"student_logits is -inf where the teacher has probability ({cfg.divergence} "
                         f"would be infinite); mask an entry with -inf in both logits")
    if not compute_grad or early_grad:
        return row_loss, grad

    # 5. the gradient, written once, with the row constants of the whole vocabulary
    consts = [partials[i] for i in range(1, 1 + n_consts)]
    for start, end in _row_chunks(n_rows, vocab):
        x = _Probs(student_logits[start:end], teacher_logits[start:end], inv_t, lse_student[start:end],
                   lse_teacher[start:end])
        write_grad(start, end, x, [c[start:end] for c in consts])
        del x
    return row_loss, grad


# --- autograd: the gradient comes from the forward pass ----------------------------------------

class _VocabParallelKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, scale, cfg, reduction, batch_shape, group):
        row_loss, grad = rows(student_logits, teacher_logits, labels, scale, cfg, True, group=group)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        return reduce_rows(row_loss, scale, reduction, batch_shape)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        with torch.no_grad():  # kdkernels.ops.fused: the saved-gradient rule, first-order only
            (grad,) = scale_saved_grads([grad], grad_output, ctx.per_row)
        return (*first_order([grad]),) + (None,) * 7


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    check_consistency: bool = True,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`kdkernels.kd_loss` on logits split along the vocabulary over the ranks of ``group``.

    Every rank passes its shard of the vocabulary; the shards follow the rank order (rank 0 holds
    the first columns) and may be of different sizes. Returns, on every rank, the loss that
    ``kd_loss`` gives on the gathered logits, and backpropagates this shard's part of its
    gradient. Two collectives of O(N) values per call (an all-gather of per-row log-sum-exps, a
    SUM all-reduce of per-row partial sums), none in backward; with ``check_consistency`` one more,
    tiny all-gather of the call's metadata first.

    Args:
        student_logits: this rank's shard ``[N, V_r]`` or ``[B, S, V_r]`` of the student logits,
            float32 / bfloat16 / float16 / float64; receives this shard's gradient in its dtype.
        teacher_logits: the teacher's shard, same shape and device; never receives a gradient.
            ``-inf`` entries mask vocabulary items.
        labels: integer ``[N]`` / ``[B, S]``, the same on every rank, as global vocabulary ids
            (or ``ignore_index``); required when ``ce_weight > 0``. The rank whose shard holds a
            row's label contributes its logit to the CE term.
        group: the process group whose ranks hold the shards (default: the default group).
        check_consistency: all-gather a few integers per rank first (N, dtypes, a fingerprint of
            the labels and options) so that ranks that disagree raise the same ValueError instead of
            hanging in a collective, and a rank that rejects its arguments makes every rank raise.
            Turn off to save that small collective once the call is known to be consistent.
        divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index, reduction:
            as in :func:`kdkernels.kd_loss`.

    Returns:
        The loss, equal on every rank: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``;
        float32 (float64 for float64 input; the math runs in float32 either way).
    """
    error = None
    try:
        _checks.check_logits_pair(student_logits, teacher_logits)
        batch_shape = tuple(student_logits.shape[:-1])
        labels, reduction, cfg = _checks.check_kd_call(
            labels, batch_shape, student_logits.device, reduction, divergence=divergence, temperature=temperature,
            beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index)
    except (TypeError, ValueError) as exc:
        error = exc
    if check_consistency:
        _agree(group, _group_device(group, student_logits),
               ("the number of rows", "the logits dtypes", "the labels", "the loss options"),
               lambda: (math.prod(batch_shape),
                        _DTYPE_CODES[student_logits.dtype] * 8 + _DTYPE_CODES[teacher_logits.dtype],
                        _labels_fingerprint(labels), _options_code(cfg, reduction, batch_shape)),
               error)
    elif error is not None:
        raise error

    vocab = student_logits.shape[-1]
    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.detach().reshape(-1, vocab)
    labels_1d = None if labels is None else labels.reshape(-1)
    scale = reduction_scale(counted_rows(labels_1d, cfg.ignore_index), reduction, student_2d.shape[0],
                            batch_shape, student_2d.device)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss = _VocabParallelKDFunction.apply(student_2d, teacher_2d, labels_1d, scale, cfg, reduction,
                                              batch_shape, group)
    else:
        row_loss, _ = rows(student_2d, teacher_2d, labels_1d, scale, cfg, False, group=group)
        loss = reduce_rows(row_loss, scale, reduction, batch_shape)
    return loss.to(torch.float64) if student_logits.dtype == torch.float64 else loss


# --- tensor-parallel fused lm_head + KD --------------------------------------------------------

class VocabParallelRoute:
    """The part of kdkernels.ops.route.Route that the fused lm_head loss uses, running the
    vocab-parallel rows over `group`: float32 rows, values checked by the rows themselves (on the
    whole vocabulary), no in-place kernel."""

    dtype = torch.float32
    has_inplace = False

    def __init__(self, group) -> None:
        self.group = group

    def check_values(self, student_logits, teacher_logits, labels, cfg) -> None:
        """Nothing here: `rows` checks values and labels against every rank's shard."""

    def rows(self, student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad):
        row_loss, grad = rows(student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad,
                              group=self.group)
        return row_loss, None, grad


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks of `group` (the input side of a
    column-parallel linear: every rank's lm_head shard contributes to dL/d(hidden))."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # a new buffer: the incoming gradient may be one a later backward reads again
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def vocab_parallel_fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    check_consistency: bool = True,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`kdkernels.fused_linear_kd_loss` with the lm_heads split along the vocabulary over the
    ranks of ``group`` (tensor parallelism): each rank holds the full hidden states and the rows
    ``[o_r, o_r + V_r)`` of the student's (and teacher's) lm_head, in rank order, shards possibly
    uneven. Equal, on every rank, to ``fused_linear_kd_loss`` on the gathered lm_heads.

    Per chunk of tokens: this shard's logits GEMMs, the vocab-parallel rows of
    :func:`vocab_parallel_kd_loss` (two collectives of O(chunk) values), the gradient GEMMs; the
    weight and bias gradients are this shard's, exact without communication. ``dL/d(student_hidden)``
    is the sum over the ranks of each shard's ``g @ W_r``: one SUM all-reduce of ``[N, H]`` in
    backward, as a column-parallel linear's backward does (so do not also wrap the hidden states in
    a copy-to-tensor-parallel-region op). With ``reduction="none"`` backward recomputes the chunks,
    and with them their collectives.

    Args:
        student_hidden: ``[N, H_s]`` / ``[B, S, H_s]``, the same on every rank.
        student_weight: this rank's lm_head shard ``[V_r, H_s]``; receives its shard's gradient.
        teacher_hidden, teacher_weight: the teacher's hidden states and lm_head shard ``[V_r, H_t]``
            (the same vocabulary split as the student's), or
        teacher_logits: this rank's shard ``[N, V_r]`` of ready teacher logits instead.
        labels: ``[N]`` / ``[B, S]`` global vocabulary ids or ``ignore_index``, the same on every rank.
        student_bias, teacher_bias: this rank's bias shards ``[V_r]``.
        group, check_consistency: as in :func:`vocab_parallel_kd_loss`; the metadata all-gather
            also chooses the default ``chunk_size`` from the largest shard, so that every rank runs
            the same chunks: with ``check_consistency=False`` pass ``chunk_size`` (the same on
            every rank).
        chunk_size, softcap, logit_scale, divergence, temperature, beta, kd_weight, ce_weight,
        scale_by_t2, ignore_index, reduction: as in :func:`kdkernels.fused_linear_kd_loss`.
    """
    from kdkernels.ops import fused_linear

    error = None
    try:
        labels, reduction, cfg, chunk_size, softcap, logit_scale = _checks.check_lm_head_call(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
            teacher_logits, labels, reduction, chunk_size, softcap, logit_scale, divergence=divergence,
            temperature=temperature, beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
            ignore_index=ignore_index)
        batch_shape = tuple(student_hidden.shape[:-1])
        vocab = student_weight.shape[0]
        teacher_vocab = teacher_weight.shape[0] if teacher_logits is None else teacher_logits.shape[-1]
        if teacher_vocab != vocab:
            raise ValueError(f"the teacher's vocabulary shard ({teacher_vocab} ids) must be the student's "
                             f"({vocab} ids, student_weight.shape[0]): both lm_heads split alike")
        if chunk_size is None and not check_consistency:
            raise ValueError("check_consistency=False needs chunk_size (the same on every rank): the default "
                             "chunk size comes from the metadata all-gather")
    except (TypeError, ValueError) as exc:
        error = exc
    wanted = fused_linear.Wanted.none()
    if error is None:  # the arguments are checked: their requires_grad can be read
        wanted = fused_linear.Wanted.of(student_hidden, student_weight, student_bias)
    if check_consistency:
        table = _agree(group, _group_device(group, student_hidden),
                       ("the number of rows", "the hidden dtype", "the labels", "the loss options",
                        "the vocabulary shard"),
                       lambda: (math.prod(batch_shape), _DTYPE_CODES[student_hidden.dtype],
                                _labels_fingerprint(labels),
                                _options_code(cfg, reduction, chunk_size, softcap, logit_scale, batch_shape,
                                              teacher_logits is None, student_bias is None,
                                              teacher_bias is None, tuple(wanted)),
                                vocab),
                       error, differ=("the vocabulary shard",))
        if chunk_size is None:
            per_entry = student_hidden.dtype.itemsize * (2 if any(wanted) else 1) + (
                teacher_logits.dtype.itemsize if teacher_logits is not None else teacher_hidden.dtype.itemsize)
            chunk_size = fused_linear.chunk_rows(math.prod(batch_shape), max(row[-1] for row in table),
                                                 per_entry, student_hidden.device.type)
    elif error is not None:
        raise error

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    if wanted.hidden:
        hidden = _SumGradOverRanks.apply(hidden, group)
    student = fused_linear._LinearLogits(hidden, student_weight, student_bias, logit_scale, softcap)
    if teacher_logits is not None:
        teacher = fused_linear._GivenLogits(teacher_logits.detach().reshape(-1, vocab), vocab)
    else:
        teacher = fused_linear._LinearLogits(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
                                             teacher_weight.detach(),
                                             None if teacher_bias is None else teacher_bias.detach(),
                                             logit_scale, softcap)
    labels_1d = None if labels is None else labels.reshape(-1)
    plan = fused_linear._Plan(cfg=cfg, reduction=reduction, batch_shape=batch_shape, vocab=vocab,
                              chunk_size=chunk_size, route=VocabParallelRoute(group), inplace=False,
                              headroom=fused_linear.gradient_headroom(cfg, student_weight.dtype))
    grad_scale = reduction_scale(counted_rows(labels_1d, cfg.ignore_index), reduction, hidden.shape[0],
                                 batch_shape, hidden.device)
    if any(wanted):
        return fused_linear.FusedLinearKDFunction.apply(hidden, student_weight, student_bias, student, teacher,
                                                        labels_1d, grad_scale, plan, wanted)
    row_loss, _ = fused_linear._run_chunks(plan, student, teacher, labels_1d, grad_scale, wanted)
    return reduce_rows(row_loss, grad_scale, reduction, batch_shape)


# --- DTensor entry points -----------------------------------------------------------------------

def is_dtensor(value) -> bool:
    """Whether `value` is a DTensor (without importing torch.distributed.tensor: no DTensor can
    exist before it is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def dtensor_kd_loss(student_logits, teacher_logits, labels=None, *, backend: str = "auto", **options):
    """``kd_loss`` on DTensor logits over a 1-D device mesh (what :func:`kdkernels.kd_loss` calls for
    them): placed ``Shard(-1)`` (the vocabulary split over the mesh, e.g. by a tensor-parallel
    ``ColwiseParallel`` lm_head with ``use_local_output=False``), it runs
    :func:`vocab_parallel_kd_loss` on the local shards over the mesh's process group; placed
    ``Replicate()``, it runs ``kd_loss`` locally (``backend`` applies there). The loss comes back
    as a DTensor placed ``Replicate()``; the gradient reaches the student DTensor with its own
    placement. ``labels`` may be a plain tensor (the same on every rank) or a DTensor."""
    from torch.distributed.tensor import DTensor, Replicate

    from kdkernels.functional import kd_loss

    if not is_dtensor(teacher_logits):
        raise TypeError("student_logits is a DTensor, so teacher_logits must be one too (with the same mesh "
                        f"and placement), got {type(teacher_logits).__name__}")
    mesh, placements = student_logits.device_mesh, tuple(student_logits.placements)
    if mesh.ndim != 1:
        raise ValueError(f"DTensor logits must live on a 1-D device mesh, got a {mesh.ndim}-D mesh; "
                         f"pass the local shards to kdkernels.distributed.vocab_parallel_kd_loss with the group")
    if teacher_logits.device_mesh != mesh or tuple(teacher_logits.placements) != placements:
        raise ValueError(f"teacher_logits must be placed like student_logits ({placements} on the same mesh), "
                         f"got {tuple(teacher_logits.placements)}")
    if is_dtensor(labels):
        labels = labels.full_tensor()
    placement = placements[0]
    if placement.is_replicate():
        loss = kd_loss(student_logits.to_local(), teacher_logits.to_local(), labels, backend=backend, **options)
    elif placement.is_shard() and placement.dim % student_logits.dim() == student_logits.dim() - 1:
        loss = vocab_parallel_kd_loss(student_logits.to_local(), teacher_logits.to_local(), labels,
                                      group=mesh.get_group(), **options)
    else:
        raise ValueError(f"DTensor logits must be placed Shard(-1) (vocabulary split) or Replicate(), got "
                         f"{placement}; for rows split over ranks call kd_loss on the local tensors")
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def gather_sharded_weights(*weights):
    """The lm_head weights / biases of ``fused_linear_kd_loss`` as plain tensors: a DTensor on a 1-D
    mesh placed ``Shard(0)`` (FSDP2's ``fully_shard``) or ``Replicate()`` is gathered once, here,
    for the whole call (``full_tensor()``); other arguments pass through. Its gradient goes back
    through DTensor's autograd as ``Partial("avg")``, i.e. reduce-scattered to the parameter's
    placement and averaged over the ranks as FSDP2 averages the other parameters' gradients (each
    rank's loss is over its own tokens). The gathered tensor is freed when the loss returns: the
    fused loss computes its gradients in the forward pass and keeps no reference to it (except
    with ``reduction="none"``, whose backward recomputes the logits)."""
    if not any(is_dtensor(w) for w in weights):
        return weights
    from torch.distributed.tensor import Partial

    gathered = []
    for weight in weights:
        if not is_dtensor(weight):
            gathered.append(weight)
            continue
        placements = tuple(weight.placements)
        if weight.device_mesh.ndim != 1 or not (placements[0].is_replicate()
                                                or (placements[0].is_shard() and placements[0].dim == 0)):
            raise ValueError(f"a DTensor lm_head weight must be placed Shard(0) (FSDP2) or Replicate() on a 1-D "
                             f"mesh, got {placements} on a {weight.device_mesh.ndim}-D mesh; for a vocabulary "
                             f"split with the full hidden states on every rank use "
                             f"kdkernels.distributed.vocab_parallel_fused_linear_kd_loss")
        gathered.append(weight.full_tensor(grad_placements=[Partial("avg")]))
    return tuple(gathered)
