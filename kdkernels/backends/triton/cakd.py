"""Fused decomposed KL (CAKD / DKD: kdkernels.cakd_loss, kdkernels.dkd_loss) in Triton: one program
per row, the gradient written during the forward pass. The math mirrors
csrc/include/kdkernels/cakd.h (notation there: groups S and W, masses P_g / Q_g, the renormalised
p̂ / q̂, BCD / SCD / WCD).

Per row:
  0. S is chosen without sorting the row. ``label``: S = {label}. ``teacher_topk`` (and
     ``teacher_top1``) and ``teacher_mass``: S is the prefix of the classes in teacher rank order
     (larger logit first, the lower class index first among equal logits, as the CPU kernel and
     the reference rank them) whose weight reaches a target: weight 1 per class and target k, or
     the teacher probability at 1/T and target ``mass`` (the class that crosses it included).
     That prefix is {key > K} plus the classes with key == K up to class index J, where key is an
     order-preserving int32 image of the teacher logit. K is found by a radix-16 search over the
     2^32 keys (8 passes over the teacher row, which stays in L2, each weighing 16 thresholds;
     k = 1 takes one max pass instead), J by one pass with a running sum over the classes tied
     at K;
  1. statistics: per group, online max and per-lane sums of exp((x - max) / T) for the student
     and the teacher; the raw maxima propagate NaN, which flags rows with NaN / +inf;
  2. the row constants (in float64, as the C++ kernel computes them), then one pass for the SCD /
     WCD terms and the gradient.

Bad values cost no host synchronisation: a row whose logits hold NaN or +inf, whose label is
neither ``ignore_index`` nor in [0, V), or whose loss the student's -inf entries make +inf (the
teacher has mass on them, or the whole student row is -inf under a live teacher) gets a NaN loss,
NaN components and a NaN gradient row; kdkernels.ops.route turns that into the ValueError of the
other backends. A teacher row that is entirely -inf has no distribution: loss 0, gradient 0.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kdkernels._config import CAKD_GROUPS, CAKDConfig
from kdkernels.backends.triton.kd_loss import (_NEG_BIG, _load_tile, _max_with_nan, _unit_column_stride,
                                               launch_over_rows, leading_kernel_args, this_row, zero_ignored_row)

# Compile-time selection rules: the ids of kdkernels._config.CAKD_GROUPS (cakd.h enum GroupRule).
_LABEL = tl.constexpr(CAKD_GROUPS["label"])
_TOP_K = tl.constexpr(CAKD_GROUPS["teacher_topk"])
_MASS = tl.constexpr(CAKD_GROUPS["teacher_mass"])

# Keys below every key of a float (the int32 range): K = _BELOW_ALL_KEYS puts every class in S.
_BELOW_ALL_KEYS = tl.constexpr(-(2 ** 31) - 1)
# Buckets per pass of the selection's key search.
_RADIX = tl.constexpr(16)

# Largest vocabulary tile per loop step.
MAX_BLOCK = 4096


@triton.jit
def _rank_key(t):
    """Order-preserving int32 image of fp32 teacher logits: a larger logit has a larger key, -0 and
    +0 share one, NaN ranks as -inf (its row is reported by the statistics pass)."""
    t = tl.where(t != t, -float("inf"), t)
    t = tl.where(t == 0.0, 0.0, t)
    bits = t.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _selection_weight(t, in_row, inv_temperature, lse_a, RULE: tl.constexpr):
    """A class's weight in the selection: its teacher probability at 1/T (mass rule), else 1."""
    if RULE == _MASS:
        w = tl.exp(t * inv_temperature - lse_a)
    else:
        w = tl.full(t.shape, 1.0, tl.float32)
    return tl.where(in_row, w, 0.0)


@triton.jit
def _teacher_tile(teacher_row, tile, vocab, BLOCK: tl.constexpr):
    """(columns, which of them are in the row, teacher logits as fp32, -inf past the row) of the
    row's tile number `tile`, BLOCK columns wide."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < vocab
    return offs, in_row, tl.load(teacher_row + offs, mask=in_row, other=-float("inf")).to(tl.float32)


@triton.jit
def _weighted_tile(teacher_row, tile, vocab, inv_temperature, lse_a, RULE: tl.constexpr, BLOCK: tl.constexpr):
    """(teacher logits, selection weights; 0 past the row) of the row's tile number `tile`."""
    _, in_row, t = _teacher_tile(teacher_row, tile, vocab, BLOCK)
    return t, _selection_weight(t, in_row, inv_temperature, lse_a, RULE)


@triton.jit
def _weight_from(teacher_row, vocab, threshold, inv_temperature, lse_a, RULE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Total selection weight of the classes whose key is >= threshold (int64)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for tile in range(0, tl.cdiv(vocab, BLOCK)):
        t, w = _weighted_tile(teacher_row, tile, vocab, inv_temperature, lse_a, RULE, BLOCK)
        acc += tl.where(_rank_key(t) >= threshold, w, 0.0)
    return tl.sum(acc, 0)


@triton.jit
def _weights_from_thresholds(teacher_row, vocab, lo, width, inv_temperature, lse_a, RULE: tl.constexpr,
                             SEL_BLOCK: tl.constexpr):
    """[_RADIX] total selection weight of the classes whose key is >= lo + j * width, for every j:
    one pass over the row, in narrower tiles (each column is compared with every threshold)."""
    thresholds = lo + tl.arange(0, _RADIX).to(tl.int64) * width
    acc = tl.zeros([_RADIX], tl.float32)
    for tile in range(0, tl.cdiv(vocab, SEL_BLOCK)):
        t, w = _weighted_tile(teacher_row, tile, vocab, inv_temperature, lse_a, RULE, SEL_BLOCK)
        above = _rank_key(t)[:, None] >= thresholds[None, :]
        acc += tl.sum(tl.where(above, w[:, None], 0.0), 0)
    return acc


@triton.jit
def _select_prefix(teacher_row, vocab, target, inv_temperature, lse_a, RULE: tl.constexpr,
                   BLOCK: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """(K, J): S = {key > K} + {key == K, class <= J}, the shortest prefix in teacher rank order
    whose selection weight reaches `target` (all classes when the row's total falls short)."""
    n_tiles = tl.cdiv(vocab, BLOCK)
    # Invariant: weight(key >= lo) >= target > weight(key >= hi).
    lo = tl.full([], -(2 ** 31), tl.int64)
    hi = tl.full([], 2 ** 31, tl.int64)
    total = _weight_from(teacher_row, vocab, lo, inv_temperature, lse_a, RULE, BLOCK)
    if RULE == _TOP_K and target == 1.0:  # top-1: K is the largest key
        best = tl.full([BLOCK], -(2 ** 31), tl.int64)
        for tile in range(0, n_tiles):
            _, in_row, t = _teacher_tile(teacher_row, tile, vocab, BLOCK)
            best = tl.maximum(best, tl.where(in_row, _rank_key(t), -(2 ** 31)))
        lo = tl.max(best, 0)
    else:
        # Radix-16 search: each pass splits [lo, hi) into 16 buckets and keeps the one where the
        # weight from its start still reaches target; 2^32 keys take 8 passes.
        steps = tl.arange(0, _RADIX).to(tl.int64)
        for _ in range(0, 8):
            width = tl.maximum((hi - lo + (_RADIX - 1)) // _RADIX, 1)
            weights = _weights_from_thresholds(teacher_row, vocab, lo, width, inv_temperature, lse_a, RULE,
                                               SEL_BLOCK)
            start = lo + tl.max(tl.where(weights >= target, steps, 0), 0) * width  # weights[0] >= target
            hi = tl.minimum(hi, start + width)
            lo = start
    kth = lo
    # The classes tied at K join S in class order while the weight before each is short of target:
    # J is the first tied class at which the running weight reaches it.
    running = _weight_from(teacher_row, vocab, kth + 1, inv_temperature, lse_a, RULE, BLOCK)
    last = tl.full([], 0, tl.int64) + vocab
    for tile in range(0, n_tiles):
        offs, in_row, t = _teacher_tile(teacher_row, tile, vocab, BLOCK)
        tied = in_row & (_rank_key(t) == kth)
        w = tl.where(tied, _selection_weight(t, in_row, inv_temperature, lse_a, RULE), 0.0)
        reached = tied & (running + tl.cumsum(w, 0) >= target)
        last = tl.minimum(last, tl.min(tl.where(reached, offs, vocab), 0).to(tl.int64))
        running += tl.sum(w, 0)
    take_all = total < target
    return tl.where(take_all, _BELOW_ALL_KEYS, kth), last


@triton.jit
def _in_s(offs, t, label, kth, last, RULE: tl.constexpr):
    """Whether columns `offs` (teacher logits t) belong to S."""
    if RULE == _LABEL:
        member = offs == label
    else:
        key = _rank_key(t)
        member = (key > kth) | ((key == kth) & (offs <= last))
    return member


@triton.jit
def _grouped_tile(student_row, teacher_row, tile, vocab, label, kth, last, RULE: tl.constexpr, BLOCK: tl.constexpr):
    """(student and teacher logits as fp32, which columns belong to S, the columns, which of them
    are in the row) of the row's tile number `tile`."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    z, t, in_row = _load_tile(student_row, teacher_row, offs, vocab)
    return z, t, _in_s(offs, t, label, kth, last, RULE), offs, in_row


@triton.jit
def _online_group(x, member, running_max, running_sum, inv_temperature):
    """One tile into a group's online softmax statistics (max of the raw logits, per-lane sums of
    exp((x - max) / T)); the max starts at a finite sentinel, so -inf lanes add exp(-inf) = 0."""
    xg = tl.where(member, x, -float("inf"))
    new_max = tl.maximum(running_max, tl.max(xg, 0))
    running_sum = running_sum * tl.exp((running_max - new_max) * inv_temperature) + tl.exp(
        (xg - new_max) * inv_temperature)
    return new_max, running_sum


@triton.jit
def _softplus64(x):
    """log(1 + e^x) in float64: max(x, 0) + log1p(e^-|x|), exact at +-inf; log1p as
    log(y) * e / (y - 1), y = 1 + e, which keeps full precision for tiny e."""
    e = tl.exp(-tl.abs(x))
    y = 1.0 + e
    log1p = tl.where(y == 1.0, e, tl.log(y) * (e / (y - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _group_lse64(running_max, sums, inv_temperature):
    """A group's log-sum-exp at 1/T in float64; -inf for a group without finite logits."""
    has = running_max > _NEG_BIG
    lse = running_max.to(tl.float64) * inv_temperature + tl.log(tl.sum(sums, 0).to(tl.float64))
    return tl.where(has, lse, -float("inf"))


@triton.jit
def _xlogratio64(x, log_x, log_y):
    return tl.where(x > 0.0, x * (log_x - log_y), 0.0)


@triton.jit
def _group_log_norm(running_max, sums):
    """(shift, log normaliser) of a group: log p̂_i = (x_i - shift) / T - log normaliser. A group
    without finite logits uses (0, 0), so its (all -inf) members give p̂ = 0 rather than NaN."""
    has = running_max > _NEG_BIG
    return tl.where(has, running_max, 0.0), tl.where(has, tl.log(tl.sum(sums, 0)), 0.0)


@triton.jit
def _cakd_fwd_kernel(
    # the [N, V] student and teacher logits, the [N] labels, the [N, V] gradient out, the [N] row
    # losses out, the [] gradient factor: as _kd_loss_fwd_kernel's
    student_ptr, teacher_ptr, labels_ptr, grad_ptr, row_loss_ptr, grad_scale_ptr,
    components_ptr,  # [N, 3] out: float32 (BCD, SCD, WCD), unweighted and without T^2
    student_row_stride, teacher_row_stride, vocab,
    selection_target,  # k (top-k rule) or mass (mass rule), as float
    inv_temperature,  # 1/T
    t2,  # T^2 when scale_by_t2, else 1: multiplies the loss
    grad_coef,  # t2 / T: multiplies dL/du in dL/dz
    bcd_weight,
    scd_weight,
    wcd_weight,
    scd_teacher_mass,  # 1: w_S = P_S of the row instead of scd_weight
    wcd_teacher_mass,  # 1: w_W = P_W of the row instead of wcd_weight
    ignore_index,
    RULE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SEL_BLOCK: tl.constexpr,  # vocabulary tile of the selection's search passes (BLOCK / _RADIX)
):
    row, student_row, teacher_row, grad_row, label, active, bad_label = this_row(
        student_ptr, teacher_ptr, grad_ptr, labels_ptr, student_row_stride, teacher_row_stride, vocab, ignore_index,
        HAS_LABELS)
    n_tiles = tl.cdiv(vocab, BLOCK)
    if active:
        # ---- 0. S: the teacher's log-sum-exp first when the mass rule needs probabilities ----
        kth = tl.full([], 0, tl.int64)
        last = tl.full([], 0, tl.int64)
        if RULE != _LABEL:
            lse_a = tl.zeros([], tl.float32)
            if RULE == _MASS:
                max_t = tl.full([], _NEG_BIG, tl.float32)
                sum_t = tl.zeros([BLOCK], tl.float32)
                for tile in range(0, n_tiles):
                    _, in_row, t = _teacher_tile(teacher_row, tile, vocab, BLOCK)
                    max_t, sum_t = _online_group(t, in_row, max_t, sum_t, inv_temperature)
                lse_a = tl.where(max_t > _NEG_BIG, max_t * inv_temperature + tl.log(tl.sum(sum_t, 0)), 0.0)
            kth, last = _select_prefix(teacher_row, vocab, selection_target, inv_temperature, lse_a, RULE, BLOCK,
                                       SEL_BLOCK)

        # ---- 1. statistics per group ----
        raw_max_z = tl.full([], _NEG_BIG, tl.float32)  # NaN-propagating, over the whole row
        raw_max_t = tl.full([], _NEG_BIG, tl.float32)
        max_us = tl.full([], _NEG_BIG, tl.float32)
        max_uw = tl.full([], _NEG_BIG, tl.float32)
        max_as = tl.full([], _NEG_BIG, tl.float32)
        max_aw = tl.full([], _NEG_BIG, tl.float32)
        sum_us = tl.zeros([BLOCK], tl.float32)
        sum_uw = tl.zeros([BLOCK], tl.float32)
        sum_as = tl.zeros([BLOCK], tl.float32)
        sum_aw = tl.zeros([BLOCK], tl.float32)
        for tile in range(0, n_tiles):
            z, t, in_s, _, _ = _grouped_tile(student_row, teacher_row, tile, vocab, label, kth, last, RULE, BLOCK)
            raw_max_z = _max_with_nan(raw_max_z, tl.reduce(z, 0, _max_with_nan))
            raw_max_t = _max_with_nan(raw_max_t, tl.reduce(t, 0, _max_with_nan))
            max_us, sum_us = _online_group(z, in_s, max_us, sum_us, inv_temperature)
            max_uw, sum_uw = _online_group(z, ~in_s, max_uw, sum_uw, inv_temperature)
            max_as, sum_as = _online_group(t, in_s, max_as, sum_as, inv_temperature)
            max_aw, sum_aw = _online_group(t, ~in_s, max_aw, sum_aw, inv_temperature)

        poisoned = (raw_max_z != raw_max_z) | (raw_max_z == float("inf")) | (raw_max_t != raw_max_t)
        poisoned = poisoned | (raw_max_t == float("inf")) | bad_label
        has_teacher = raw_max_t > _NEG_BIG
        has_student = raw_max_z > _NEG_BIG
        # A live teacher against a student row that is entirely -inf: KL(p || q) is +inf.
        poisoned = poisoned | (has_teacher & ~has_student)

        # ---- 2. row constants (cakd.h cakd_row_constants), in float64 ----
        lse_us = _group_lse64(max_us, sum_us, inv_temperature)
        lse_uw = _group_lse64(max_uw, sum_uw, inv_temperature)
        lse_as = _group_lse64(max_as, sum_as, inv_temperature)
        lse_aw = _group_lse64(max_aw, sum_aw, inv_temperature)
        d_a = lse_aw - lse_as
        d_u = lse_uw - lse_us
        log_ps = -_softplus64(d_a)
        log_pw = -_softplus64(-d_a)
        log_qs = -_softplus64(d_u)
        log_qw = -_softplus64(-d_u)
        p_s = tl.exp(log_ps)
        p_w = tl.exp(log_pw)
        q_s = tl.exp(log_qs)
        q_w = tl.exp(log_qw)
        # Q_S - P_S = P_W - Q_W, taken from the smaller group (no difference of numbers near 1).
        delta_s = tl.where(d_a + d_u > 0.0, q_s - p_s, p_w - q_w)
        w_s = tl.where(max_as > _NEG_BIG, tl.where(scd_teacher_mass != 0, p_s, scd_weight), 0.0)
        w_w = tl.where(max_aw > _NEG_BIG, tl.where(wcd_teacher_mass != 0, p_w, wcd_weight), 0.0)
        bcd = (_xlogratio64(p_s, log_ps, log_qs) + _xlogratio64(p_w, log_pw, log_qw)).to(tl.float32)
        coef = tl.load(grad_scale_ptr).to(tl.float64) * grad_coef
        grad_bcd_s = (coef * bcd_weight * delta_s).to(tl.float32)
        grad_kl_s = (coef * w_s).to(tl.float32)
        grad_kl_w = (coef * w_w).to(tl.float32)
        shift_us, log_norm_us = _group_log_norm(max_us, sum_us)
        shift_uw, log_norm_uw = _group_log_norm(max_uw, sum_uw)
        shift_as, log_norm_as = _group_log_norm(max_as, sum_as)
        shift_aw, log_norm_aw = _group_log_norm(max_aw, sum_aw)
        live = has_teacher & ~poisoned

        # ---- 3. the group KL terms and the gradient ----
        scd_acc = tl.zeros([BLOCK], tl.float32)
        wcd_acc = tl.zeros([BLOCK], tl.float32)
        for tile in range(0, n_tiles):
            z, t, in_s, offs, in_row = _grouped_tile(student_row, teacher_row, tile, vocab, label, kth, last, RULE,
                                                     BLOCK)
            log_phat = (t - tl.where(in_s, shift_as, shift_aw)) * inv_temperature - tl.where(
                in_s, log_norm_as, log_norm_aw)
            log_qhat = (z - tl.where(in_s, shift_us, shift_uw)) * inv_temperature - tl.where(
                in_s, log_norm_us, log_norm_uw)
            phat = tl.exp(log_phat)
            qhat = tl.exp(log_qhat)
            # masked entries (p̂ = q̂ = 0) give 0 whatever log p̂ - log q̂ is (NaN for -inf - -inf)
            kl = tl.where(phat > 0, phat * (log_phat - log_qhat), 0.0)
            scd_acc += tl.where(in_s, kl, 0.0)
            wcd_acc += tl.where(in_s, 0.0, kl)
            if COMPUTE_GRAD:
                # dL/dz_i = grad_bcd_g q̂_i + grad_kl_g (q̂_i - p̂_i), grad_bcd_W = -grad_bcd_S
                g = tl.where(in_s, grad_bcd_s, -grad_bcd_s) * qhat + tl.where(in_s, grad_kl_s, grad_kl_w) * (
                    qhat - phat)
                g = tl.where(live, g, 0.0)
                g = tl.where(poisoned, float("nan"), g)
                tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        scd = tl.sum(scd_acc, 0)
        wcd = tl.sum(wcd_acc, 0)
        # A component is +inf only where the teacher has mass on student -inf entries.
        poisoned = poisoned | (has_teacher & ((bcd == float("inf")) | (scd == float("inf")) | (wcd == float("inf"))))
        row_loss = t2 * (bcd_weight * bcd + w_s.to(tl.float32) * scd + w_w.to(tl.float32) * wcd)
        row_loss = tl.where(has_teacher, row_loss, 0.0)
        bcd = tl.where(has_teacher, bcd, 0.0)
        scd = tl.where(has_teacher, scd, 0.0)
        wcd = tl.where(has_teacher, wcd, 0.0)
        nan = float("nan")
        tl.store(row_loss_ptr + row, tl.where(poisoned, nan, row_loss))
        tl.store(components_ptr + 3 * row, tl.where(poisoned, nan, bcd))
        tl.store(components_ptr + 3 * row + 1, tl.where(poisoned, nan, scd))
        tl.store(components_ptr + 3 * row + 2, tl.where(poisoned, nan, wcd))
    else:  # ignored row: loss 0, components 0, gradient 0, nothing read
        tl.store(row_loss_ptr + row, 0.0)
        tl.store(components_ptr + 3 * row, 0.0)
        tl.store(components_ptr + 3 * row + 1, 0.0)
        tl.store(components_ptr + 3 * row + 2, 0.0)
        if COMPUTE_GRAD:
            zero_ignored_row(grad_row, vocab, BLOCK)


def launch_shape(vocab: int) -> Tuple[int, int]:
    """(BLOCK, num_warps): vocabulary tile per loop step and warps per program. The selection and
    the four group sums keep more values per column live than the KD kernel, hence the smaller
    largest tile. Untuned without a GPU."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 1)))
    return block, max(4, min(16, block // 256))


def selection_block(block: int) -> int:
    """The search passes compare each column with 16 thresholds at once: a tile of BLOCK / 16
    columns keeps [columns, 16] at the size of one BLOCK tile (but at least min(BLOCK, 16) columns)."""
    return max(min(block, 16), block // 16)


def cakd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
              grad_scale: torch.Tensor, cfg: CAKDConfig, compute_grad: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The backend contract's decomposed KL (kdkernels.backends):
    (row_loss [N], components [N, 3] = BCD, SCD, WCD, grad [N, V] in the student dtype or None)."""
    student = _unit_column_stride(student_logits)
    teacher = _unit_column_stride(teacher_logits)
    n_rows, vocab = student.shape
    device = student.device
    components = torch.empty((n_rows, 3), dtype=torch.float32, device=device)
    grad = torch.empty(student.shape, dtype=student.dtype, device=device) if compute_grad else None

    def launch(row_loss: torch.Tensor) -> None:
        rule = cfg.group_rule_id
        target = float(cfg.mass_target) if rule == CAKD_GROUPS["teacher_mass"] else float(cfg.top_k)
        block, num_warps = launch_shape(vocab)
        _cakd_fwd_kernel[(n_rows,)](
            *leading_kernel_args(student, teacher, labels, grad, row_loss, grad_scale), components,
            student.stride(0), teacher.stride(0), vocab, target,
            1.0 / cfg.temperature, cfg.t2, cfg.t2 / cfg.temperature,
            cfg.bcd_weight, cfg.scd_weight, cfg.wcd_weight,
            int(cfg.scd_teacher_mass), int(cfg.wcd_teacher_mass), cfg.ignore_index,
            RULE=rule, HAS_LABELS=labels is not None, COMPUTE_GRAD=compute_grad,
            BLOCK=block, SEL_BLOCK=selection_block(block), num_warps=num_warps,
        )

    return launch_over_rows(student, launch), components, grad
