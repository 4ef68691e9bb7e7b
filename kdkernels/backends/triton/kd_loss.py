"""Fused KD row loss in Triton: one program per row, online softmax over vocabulary tiles, the
gradient written during the forward pass.

Per row (the formulas mirror csrc/include/kdkernels/divergence.h term by term):
  1. statistics pass: running max (a finite sentinel, so -inf logits are masked entries with
     probability 0) and per-lane sums of exponentials of the student at 1/T and, for the CE blend
     at T != 1, at T = 1, and of the teacher at 1/T -> lse(u), lse(z), lse(a); the maxima
     propagate NaN, which flags rows with NaN / +inf;
  2. row-constant pass (every divergence but forward KL): C = sum_i c_i / sum_i q_i (and skew
     KL's second constant) and the divergence;
  3. gradient pass: dL/dz in the student dtype, times grad_scale read from device memory (no host
     synchronisation); forward KL sums its value here.
Each pass walks the tiles in the opposite order of the pass before, so that it starts with the
tiles read last, which are still in L2.

Temperature, beta and the weights are runtime scalars (no recompilation when they change); the
divergence, whether labels / the CE term exist, whether T == 1 (the CE term then reuses the
student's softmax, ``ce_reuses_q``) and whether a gradient is wanted are compile-time switches.

A teacher row that is entirely -inf has no distribution: its KD term is 0 and its CE term stays.
Bad values cost no host synchronisation: a row whose logits contain NaN or +inf, whose label is
neither ``ignore_index`` nor in [0, V), or whose loss the student's -inf entries make +inf or
undefined (the whole row; the label's entry; forward KL's teacher mass on one), or whose reverse
KL the teacher's -inf entries make +inf (student mass on one), gets a NaN loss,
so the error shows in the loss (and trips AMP's inf/NaN check) instead of raising; rows with bad
values also get a NaN gradient row.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from kdkernels._config import DIVERGENCES, KDConfig

# The kernels report bad values in-stream, as NaN row losses (module docstring).
CHECKS_VALUES = True
BAD_INPUT_AS_NAN = True

# Compile-time divergence ids: the same integers as divergence.h's enum Divergence.
_FORWARD_KL = tl.constexpr(DIVERGENCES["forward_kl"])
_REVERSE_KL = tl.constexpr(DIVERGENCES["reverse_kl"])
_JSD = tl.constexpr(DIVERGENCES["jsd"])
_SKEW_KL = tl.constexpr(DIVERGENCES["skew_kl"])
_SKEW_REVERSE_KL = tl.constexpr(DIVERGENCES["skew_reverse_kl"])
_TVD = tl.constexpr(DIVERGENCES["tvd"])

# Finite start of the running maxima: a row of -inf (fully masked) keeps it, exp(-inf - it) = 0.
_NEG_BIG = tl.constexpr(-3.0e38)

# Largest vocabulary tile per loop step (see launch_shape).
MAX_BLOCK = 8192


@triton.jit
def _log_mixture_over(x, y, w_x, w_y):
    """log(m / x) for the mixture m = w_x x + w_y y, exact near m = x and far from it
    (divergence.h log_mixture_over): log(u) t / (u - 1) with t = w_y (y - x) / x and
    u = w_x + w_y y / x, capped so that a denormal x gives a large finite log. x > 0."""
    t = tl.minimum(w_y * ((y - x) / x), 1e30)
    u = tl.minimum(w_x + w_y * (y / x), 1e30)
    return tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))


@triton.jit
def _max_with_nan(a, b):
    # A NaN anywhere makes the maximum NaN: the statistics pass detects bad rows for free.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_tile(student_row, teacher_row, offs, vocab):
    """Student and teacher logits of columns `offs` as fp32; columns past the row read as -inf,
    which every formula treats as a masked entry."""
    in_row = offs < vocab
    z = tl.load(student_row + offs, mask=in_row, other=-float("inf")).to(tl.float32)
    t = tl.load(teacher_row + offs, mask=in_row, other=-float("inf")).to(tl.float32)
    return z, t, in_row


@triton.jit
def _skew_reverse_h(p, q, log_m_over_q, mix_wp, mix_wq):
    """Skew reverse KL's per-element gradient term, shifted by a constant that cancels in h - C
    (divergence.h SkewReverseKL::h_shifted): h' = h + 1 near alpha = 1, h itself near alpha = 0."""
    m = mix_wp * p + mix_wq * q
    return tl.where(mix_wp > 0.5, -log_m_over_q - mix_wq * q / m, mix_wp * p / m - log_m_over_q)


@triton.jit
def _divergence_terms(logp, logq, p, q, mix_wp, mix_wq, DIVERGENCE: tl.constexpr):
    """Per-element loss term, share c_i of the row constant C (divergence.h `terms`) and share
    c2_i of the second row constant that skew KL carries (`second_term`; 0 for the others)."""
    zero = tl.zeros_like(p)
    c2 = zero
    if DIVERGENCE == _FORWARD_KL:  # KL(p || q)
        loss = tl.where(p > 0, p * (logp - logq), zero)
        c = zero
    elif DIVERGENCE == _REVERSE_KL:  # KL(q || p); c = q (log q - log p)
        loss = tl.where(q > 0, q * (logq - logp), zero)
        c = loss
    elif DIVERGENCE == _JSD:  # wp KL(p || m) + wq KL(q || m); c = q log(q / m)
        kl_q = tl.where(q > 0, -q * _log_mixture_over(q, p, mix_wq, mix_wp), zero)
        kl_p = tl.where(p > 0, -p * _log_mixture_over(p, q, mix_wp, mix_wq), zero)
        loss = tl.where(mix_wp > 0, mix_wp * kl_p, zero) + tl.where(mix_wq > 0, mix_wq * kl_q, zero)
        c = kl_q
    elif DIVERGENCE == _SKEW_KL:  # KL(p || m); c = q w, c2 = q (w - 1), w = p / m
        m = mix_wp * p + mix_wq * q
        loss = tl.where(p > 0, -p * _log_mixture_over(p, q, mix_wp, mix_wq), zero)
        c = tl.where(m > 0, q * p / m, zero)
        c2 = tl.where(m > 0, mix_wq * q * (p - q) / m, zero)
    elif DIVERGENCE == _SKEW_REVERSE_KL:  # KL(q || m); c = q h', h' = wp p / m - log(m / q)
        log_m_over_q = _log_mixture_over(q, p, mix_wq, mix_wp)
        loss = tl.where(q > 0, -q * log_m_over_q, zero)
        c = tl.where(q > 0, q * _skew_reverse_h(p, q, log_m_over_q, mix_wp, mix_wq), zero)
    else:  # TVD: 1/2 sum |p - q|; c = q sigma, sigma = 1/2 sign(q - p)
        loss = 0.5 * tl.abs(p - q)
        c = q * tl.where(q > p, 0.5, tl.where(p > q, -0.5, 0.0))
    return loss, c, c2


@triton.jit
def _divergence_grad(logp, logq, p, q, mix_wp, mix_wq, row_c, row_c2, DIVERGENCE: tl.constexpr):
    """dD/du_i, the derivative with respect to the tempered student logit (divergence.h `grad`,
    and `grad2` for skew KL)."""
    zero = tl.zeros_like(p)
    if DIVERGENCE == _FORWARD_KL:  # q - p
        g = q - p
    elif DIVERGENCE == _REVERSE_KL:  # q (log q - log p - C)
        g = tl.where(q > 0, q * (logq - logp - row_c), zero)
    elif DIVERGENCE == _JSD:  # wq q (log(q / m) - C); 0 at beta in {0, 1}
        g = tl.where((mix_wp > 0) & (mix_wq > 0) & (q > 0),
                     mix_wq * q * (-_log_mixture_over(q, p, mix_wq, mix_wp) - row_c), zero)
    elif DIVERGENCE == _SKEW_KL:  # wq q (W - w); near w = 1 as wq q (C2 - (w - 1)), C2 = W - 1
        m = mix_wp * p + mix_wq * q
        w = tl.where(m > 0, p / m, zero)
        w_minus_1 = tl.where(m > 0, mix_wq * (p - q) / m, zero)
        gap = tl.where(w > 0.5, row_c2 - w_minus_1, row_c - w)
        g = tl.where(mix_wq > 0, mix_wq * q * gap, zero)
    elif DIVERGENCE == _SKEW_REVERSE_KL:  # q (h' - C); 0 at alpha = 1, where m = q
        h = _skew_reverse_h(p, q, _log_mixture_over(q, p, mix_wq, mix_wp), mix_wp, mix_wq)
        g = tl.where((mix_wp > 0) & (q > 0), q * (h - row_c), zero)
    else:  # TVD: q (sigma - C)
        g = q * (tl.where(q > p, 0.5, tl.where(p > q, -0.5, 0.0)) - row_c)
    return g


@triton.jit
def _ce_grad(z, q, max_z, log_sum_z, offs, label, ce_grad_coef, CE_REUSES_Q: tl.constexpr):
    """The CE blend's gradient ce_weight (softmax(z) - onehot(y)) on columns `offs` (ce_grad_coef
    carries ce_weight and grad_scale); at T == 1 softmax(z) is the student's q."""
    if CE_REUSES_Q:
        softmax_z = q
    else:
        softmax_z = tl.exp(z - max_z - log_sum_z)
    return ce_grad_coef * (softmax_z - tl.where(offs == label, 1.0, 0.0))


@triton.jit
def this_row(student_ptr, teacher_ptr, grad_ptr, labels_ptr, student_row_stride, teacher_row_stride, vocab,
             ignore_index, HAS_LABELS: tl.constexpr):
    """This program's row (one program per row): (row, its student, teacher and gradient rows (the
    gradient is contiguous [N, V]), label, active, bad_label). The row is active unless its label
    is ignore_index; bad_label: the label lies outside [0, V). Without labels: label -1, active."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = label != ignore_index
        bad_label = (label < 0) | (label >= vocab)
    else:
        label = -1
        active = True
        bad_label = False
    return (row, student_ptr + row * student_row_stride, teacher_ptr + row * teacher_row_stride,
            grad_ptr + row * vocab, label, active, bad_label)


@triton.jit
def zero_ignored_row(grad_row, vocab, BLOCK: tl.constexpr):
    """Zeros one [V] gradient row (an ignored row's), tile by tile."""
    cols = tl.arange(0, BLOCK)
    for tile in range(0, tl.cdiv(vocab, BLOCK)):
        offs = tile * BLOCK + cols
        tl.store(grad_row + offs, tl.zeros([BLOCK], grad_row.dtype.element_ty), mask=offs < vocab)


@triton.jit
def _kd_loss_fwd_kernel(
    student_ptr,  # [N, V] student logits z (fp32 / bf16 / fp16), unit column stride
    teacher_ptr,  # [N, V] teacher logits, unit column stride
    labels_ptr,  # [N] integer labels (read only when HAS_LABELS)
    grad_ptr,  # [N, V] out, contiguous: dL/dz in the student dtype (written only when COMPUTE_GRAD)
    row_loss_ptr,  # [N] out: float32 row losses
    grad_scale_ptr,  # [] float32: factor on the gradient (the reduction's 1/count)
    student_row_stride,
    teacher_row_stride,
    vocab,  # V
    inv_temperature,  # 1/T
    kd_scale,  # kd_weight * T^2 (or kd_weight): multiplies D in the loss
    kd_coef,  # kd_scale / T: multiplies dD/du in dL/dz
    ce_weight,
    mix_wp,  # m = wp p + wq q for the mixture divergences (divergence.h mixture_for)
    mix_wq,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    USE_CE: tl.constexpr,  # labels given and ce_weight > 0
    CE_REUSES_Q: tl.constexpr,  # T == 1: softmax(z) is the student's q (ce_reuses_q)
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, student_row, teacher_row, grad_row, label, active, bad_label = this_row(
        student_ptr, teacher_ptr, grad_ptr, labels_ptr, student_row_stride, teacher_row_stride, vocab, ignore_index,
        HAS_LABELS)
    cols = tl.arange(0, BLOCK)
    n_tiles = tl.cdiv(vocab, BLOCK)
    if active:
        # ---- 1. statistics: NaN-propagating running maxima, per-lane sums of exponentials ----
        max_z = tl.full([], _NEG_BIG, tl.float32)  # max of the raw row; max of u = z/T is max_z/T
        max_t = tl.full([], _NEG_BIG, tl.float32)
        sum_u = tl.zeros([BLOCK], tl.float32)  # sum exp(u - max_z / T)
        sum_z = tl.zeros([BLOCK], tl.float32)  # sum exp(z - max_z), the CE lse at T = 1
        sum_a = tl.zeros([BLOCK], tl.float32)  # sum exp(a - max_t / T)
        for tile in range(0, n_tiles):
            z, t, _ = _load_tile(student_row, teacher_row, tile * BLOCK + cols, vocab)
            new_max_z = _max_with_nan(max_z, tl.reduce(z, 0, _max_with_nan))
            new_max_t = _max_with_nan(max_t, tl.reduce(t, 0, _max_with_nan))
            sum_u = sum_u * tl.exp((max_z - new_max_z) * inv_temperature) + tl.exp(
                (z - new_max_z) * inv_temperature)
            if USE_CE and not CE_REUSES_Q:
                sum_z = sum_z * tl.exp(max_z - new_max_z) + tl.exp(z - new_max_z)
            sum_a = sum_a * tl.exp((max_t - new_max_t) * inv_temperature) + tl.exp(
                (t - new_max_t) * inv_temperature)
            max_z = new_max_z
            max_t = new_max_t

        # A teacher row entirely -inf has no distribution: no KD term (the CE term stays).
        has_student = max_z > _NEG_BIG
        has_teacher = max_t > _NEG_BIG
        # NaN or +inf in either row (the maxima propagate NaN), or a label outside [0, V).
        poisoned = (max_z != max_z) | (max_z == float("inf")) | (max_t != max_t) | (max_t == float("inf"))
        poisoned = poisoned | bad_label
        # A student row entirely -inf has no distribution: the loss is undefined unless the teacher
        # row is masked too and there is no CE term (a fully masked row: loss 0, gradient 0).
        if USE_CE:
            poisoned = poisoned | (max_z <= _NEG_BIG)
        else:
            poisoned = poisoned | ((max_z <= _NEG_BIG) & has_teacher)
        # log-softmax as (x - max) / T - log(sum): the shifted logit is exact and the normaliser
        # small, which keeps precision when the logits are large.
        log_sum_u = tl.where(has_student, tl.log(tl.sum(sum_u)), 0.0)
        log_sum_a = tl.where(has_teacher, tl.log(tl.sum(sum_a)), 0.0)
        if USE_CE and not CE_REUSES_Q:
            log_sum_z = tl.where(has_student, tl.log(tl.sum(sum_z)), 0.0)
        else:
            log_sum_z = log_sum_u

        # ---- 2. row constant C and the divergence (every divergence but forward KL) ----
        divergence = tl.zeros([BLOCK], tl.float32)
        row_c = tl.zeros([], tl.float32)
        row_c2 = tl.zeros([], tl.float32)
        if DIVERGENCE != _FORWARD_KL:
            c_sum = tl.zeros([BLOCK], tl.float32)
            c2_sum = tl.zeros([BLOCK], tl.float32)
            q_sum = tl.zeros([BLOCK], tl.float32)
            for step in range(0, n_tiles):  # reverse order: the last tiles read are still in L2
                z, t, _ = _load_tile(student_row, teacher_row, (n_tiles - 1 - step) * BLOCK + cols, vocab)
                logq = (z - max_z) * inv_temperature - log_sum_u
                logp = (t - max_t) * inv_temperature - log_sum_a
                q = tl.exp(logq)
                loss, c, c2 = _divergence_terms(logp, logq, tl.exp(logp), q, mix_wp, mix_wq, DIVERGENCE)
                divergence += loss
                c_sum += c
                c2_sum += c2
                q_sum += q
            # C = sum q x / sum q: the same as sum q x (sum q = 1), but rounding in sum q no longer
            # leaks into the gradient q (x - C), which then sums to 0 as the exact one does.
            q_total = tl.sum(q_sum)
            row_c = tl.sum(c_sum) / q_total
            row_c2 = tl.sum(c2_sum) / q_total

        if USE_CE:  # read before pass 3, which may write the gradient over the student row (in place)
            z_label = tl.load(student_row + label, mask=(label >= 0) & (label < vocab),
                              other=0.0).to(tl.float32)
            poisoned = poisoned | (z_label == -float("inf"))  # the label on a student -inf entry: CE = +inf

        # ---- 3. gradient (and forward KL's value), tiles in the opposite order of the pass before ----
        if COMPUTE_GRAD or DIVERGENCE == _FORWARD_KL:
            grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
            kd_grad_coef = kd_coef * grad_scale
            ce_grad_coef = ce_weight * grad_scale
            for step in range(0, n_tiles):
                if DIVERGENCE == _FORWARD_KL:
                    offs = (n_tiles - 1 - step) * BLOCK + cols
                else:
                    offs = step * BLOCK + cols
                z, t, in_row = _load_tile(student_row, teacher_row, offs, vocab)
                logq = (z - max_z) * inv_temperature - log_sum_u
                logp = (t - max_t) * inv_temperature - log_sum_a
                p = tl.exp(logp)
                q = tl.exp(logq)
                if DIVERGENCE == _FORWARD_KL:
                    loss, _, _ = _divergence_terms(logp, logq, p, q, mix_wp, mix_wq, DIVERGENCE)
                    divergence += loss
                if COMPUTE_GRAD:
                    g = tl.where(has_teacher, kd_grad_coef * _divergence_grad(
                        logp, logq, p, q, mix_wp, mix_wq, row_c, row_c2, DIVERGENCE), 0.0)
                    if USE_CE:
                        g += _ce_grad(z, q, max_z, log_sum_z, offs, label, ce_grad_coef, CE_REUSES_Q)
                    g = tl.where(poisoned, float("nan"), g)
                    tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)

        divergence_total = tl.sum(divergence)
        # forward KL is +inf only where the teacher has mass on a student -inf entry, reverse KL
        # only where the student has mass on a teacher -inf entry
        if (DIVERGENCE == _FORWARD_KL) or (DIVERGENCE == _REVERSE_KL):
            poisoned = poisoned | (has_teacher & (divergence_total == float("inf")))
        row_loss = tl.where(has_teacher, kd_scale * divergence_total, 0.0)
        if USE_CE:  # CE(z, y) = lse(z) - z_y = (max - z_y) + log sum exp(z - max)
            row_loss += ce_weight * ((max_z - z_label) + log_sum_z)
        row_loss = tl.where(poisoned, float("nan"), row_loss)
        tl.store(row_loss_ptr + row, row_loss)
    else:  # ignored row: loss 0, gradient 0, nothing read
        tl.store(row_loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_ignored_row(grad_row, vocab, BLOCK)


def ce_reuses_q(temperature: float) -> bool:
    """T == 1: the CE term's softmax(z) is the student's q, so the kernel computes no second
    log-sum-exp (divergence.h KDParams::ce_reuses_q)."""
    return temperature == 1.0


def launch_shape(vocab: int) -> Tuple[int, int]:
    """(BLOCK, num_warps): vocabulary tile per loop step and warps per program.

    8 columns per thread at the largest tile (8192 columns, 32 warps): one 16-byte load per
    tensor per bf16 tile, at most 64 registers on sm_90 without spills (ptxas; 16 warps spill),
    and one program per SM, which keeps the rows in flight, whose re-reads should hit L2, fewest.
    Untuned without a GPU: `python -m benchmarks.gpu_bench --sweep` times the alternatives."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 1)))
    num_warps = max(4, min(32, block // 256))
    return block, num_warps


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: KDConfig, compute_grad: bool, *,
         block: Optional[int] = None, num_warps: Optional[int] = None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The backend contract (kdkernels.backends), with an optional launch shape (block: a power of
    two; the default is launch_shape's)."""
    student = _unit_column_stride(student_logits)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if compute_grad else None
    return _row_losses(student, teacher_logits, labels, grad, grad_scale, cfg, block, num_warps), grad


def rows_inplace(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """``rows`` with the gradient written over the contiguous student logits: every program reads
    a tile of its row before it writes that tile's gradient, and the label's logit before the
    gradient pass."""
    if not student_logits.is_contiguous():
        raise ValueError("student_logits must be contiguous to take the gradient in place")
    return _row_losses(student_logits, teacher_logits, labels, student_logits, grad_scale, cfg)


def _row_losses(student, teacher_logits, labels, grad, grad_scale, cfg: KDConfig, block: Optional[int] = None,
                num_warps: Optional[int] = None) -> torch.Tensor:
    """Launches the kernel over every row (gradient into `grad` when given); returns row_loss."""
    def launch(row_loss: torch.Tensor) -> None:
        default_block, default_warps = launch_shape(student.shape[1])
        _launch(student, _unit_column_stride(teacher_logits), labels, grad, row_loss, grad_scale, cfg,
                block or default_block, num_warps or default_warps)

    return launch_over_rows(student, launch)


def launch_over_rows(student: torch.Tensor, launch: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """A float32 row_loss [N] for the rows of `student`, filled by ``launch(row_loss)`` on the
    tensors' device; nothing is launched for zero rows."""
    row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    if row_loss.numel():
        with _on_device(student.device):
            launch(row_loss)
    return row_loss


def leading_kernel_args(student, teacher, labels, grad, row_loss, grad_scale) -> tuple:
    """The first six arguments of the dense row kernels (student, teacher, labels, grad, row_loss,
    grad_scale), with placeholder pointers for absent labels (never read) or gradient (never
    written)."""
    return (student, teacher, labels if labels is not None else row_loss, grad if grad is not None else student,
            row_loss, grad_scale.to(device=student.device, dtype=torch.float32))


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(student, teacher, labels, grad, row_loss, grad_scale, cfg: KDConfig, block: int,
            num_warps: int) -> None:
    n_rows, vocab = student.shape
    mix_wp, mix_wq = cfg.mixture_weights  # formed in float64 (kdkernels._config)
    _kd_loss_fwd_kernel[(n_rows,)](
        *leading_kernel_args(student, teacher, labels, grad, row_loss, grad_scale),
        student.stride(0), teacher.stride(0), vocab,
        1.0 / cfg.temperature, cfg.kd_scale, cfg.kd_scale / cfg.temperature, cfg.ce_weight,
        mix_wp, mix_wq, cfg.ignore_index,
        DIVERGENCE=cfg.divergence_id,
        HAS_LABELS=labels is not None,
        USE_CE=labels is not None and cfg.ce_weight > 0,
        CE_REUSES_Q=ce_reuses_q(cfg.temperature),
        COMPUTE_GRAD=grad is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
