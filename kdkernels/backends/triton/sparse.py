"""Sparse-teacher KD row loss in Triton (kdkernels.sparse_kd_loss on GPU tensors): one program per
row; the math mirrors csrc/include/kdkernels/sparse.h, and the per-bucket divergence terms are the
dense kernel's (kd_loss.py), evaluated on the k (+1) buckets.

Per row:
  1. one pass over the student row in vocabulary tiles: online max and per-lane sums of
     exp((z − max) / T) (and at T = 1 for the CE blend at T != 1); for `residual`, the same sum
     over the non-support columns (each tile's columns compared with the row's k ids), which
     gives the student's rest mass without cancellation;
  2. the k support logits gathered, the teacher's buckets, the bucket divergence, and the row
     constant c_row (sparse.h);
  3. the gradient: q_j · c_row (+ the CE blend) in every tile, then the k support columns
     overwritten with their own values (a barrier orders the two writes).
Bad values cost no host synchronisation: a student row with NaN / +inf, or whose loss is
infinite (the teacher or the label on a masked entry), gets a NaN loss, which kdkernels._reports
checks (a device assertion on GPU by default; the ValueError the CPU kernel raises in strict mode
and on CPU tensors). Teacher ids and values are validated at the public call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kdkernels import _reports
from kdkernels._sparse_checks import SparseConfig, SparseTeacher
from kdkernels.backends.triton.kd_loss import (_NEG_BIG, _ce_grad, _divergence_grad, _divergence_terms,
                                               _max_with_nan, ce_reuses_q, launch_over_rows, zero_ignored_row)

_LOGPROBS = tl.constexpr(0)
_PROBS = tl.constexpr(2)
_RENORMALIZE = tl.constexpr(0)
_RESIDUAL = tl.constexpr(1)
_SUPPORT = tl.constexpr(2)

# Vocabulary tile: residual compares each tile's columns with the k ids ([BLOCK, K_BLOCK] at once).
MAX_BLOCK = 2048


@triton.jit
def _lse(x, mask):
    """log Σ exp(x) over the masked lanes of a vector; -inf when none is finite."""
    x = tl.where(mask, x, -float("inf"))
    m = tl.max(x, 0)
    safe = tl.where(m > -float("inf"), m, 0.0)
    return tl.where(m > -float("inf"), safe + tl.log(tl.sum(tl.exp(x - safe), 0)), -float("inf"))


@triton.jit
def _sparse_kd_fwd_kernel(
    student_ptr,  # [N, V] student logits z (fp32 / bf16 / fp16), unit column stride
    ids_ptr,  # [N, K] int64 teacher ids (pad_id in unused slots)
    values_ptr,  # [N, K] float32 teacher values
    labels_ptr,  # [N] int64 labels (ignore_index for ignored and all-padding rows)
    grad_ptr,  # [N, V] out: dL/dz in the student dtype (written only when COMPUTE_GRAD)
    row_loss_ptr,  # [N] out: float32
    grad_scale_ptr,  # [] float32
    student_row_stride,
    vocab,
    k,
    pad_id,
    inv_temperature,
    value_scale,  # T_gen / T
    kd_scale,
    kd_coef,
    ce_weight,
    mix_wp, mix_wq,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    KIND: tl.constexpr,
    MISSING: tl.constexpr,
    USE_CE: tl.constexpr,
    CE_REUSES_Q: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    grad_row = grad_ptr + row * vocab
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, K_BLOCK)
    n_tiles = tl.cdiv(vocab, BLOCK)

    label = tl.load(labels_ptr + row).to(tl.int64)
    ids = tl.load(ids_ptr + row * k + slots, mask=slots < k, other=pad_id).to(tl.int64)
    used = (slots < k) & (ids != pad_id)
    n_support = tl.sum(used.to(tl.int32), 0)
    active = (label != ignore_index) & (n_support > 0)

    if active:
        # ---- 1. statistics over the dense row ----
        max_z = tl.full([], _NEG_BIG, tl.float32)
        sum_u = tl.zeros([BLOCK], tl.float32)  # Σ exp((z − max) / T)
        sum_z = tl.zeros([BLOCK], tl.float32)  # Σ exp(z − max), the CE normaliser at T != 1
        sum_rest = tl.zeros([BLOCK], tl.float32)  # Σ over the non-support columns
        for tile in range(0, n_tiles):
            offs = tile * BLOCK + cols
            z = tl.load(student_row + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
            new_max = _max_with_nan(max_z, tl.reduce(z, 0, _max_with_nan))
            shrink = tl.exp((max_z - new_max) * inv_temperature)
            e = tl.exp((z - new_max) * inv_temperature)
            sum_u = sum_u * shrink + e
            if USE_CE and not CE_REUSES_Q:
                sum_z = sum_z * tl.exp(max_z - new_max) + tl.exp(z - new_max)
            if MISSING == _RESIDUAL:
                member = tl.max(((offs[:, None] == ids[None, :]) & used[None, :]).to(tl.int32), 1) > 0
                sum_rest = sum_rest * shrink + tl.where(member, 0.0, e)
            max_z = new_max
        poisoned = (max_z != max_z) | (max_z == float("inf")) | (max_z <= _NEG_BIG)
        log_z = tl.log(tl.sum(sum_u, 0))  # LSE_V(u) − max / T
        if USE_CE and not CE_REUSES_Q:
            log_z1 = tl.log(tl.sum(sum_z, 0))
        else:
            log_z1 = log_z
        rest_exists = n_support < vocab
        logq_rest = tl.log(tl.sum(sum_rest, 0)) - log_z  # -inf when the rest is empty or masked

        # ---- 2. the support, the teacher's buckets, the bucket divergence ----
        z_raw = tl.load(student_row + ids, mask=used, other=-float("inf")).to(tl.float32) - max_z
        u_s = z_raw * inv_temperature
        values = tl.load(values_ptr + row * k + slots, mask=used, other=0.0)
        with_rest = rest_exists & (MISSING == _RESIDUAL)
        if KIND == _PROBS:
            weights = tl.where(used, values, 0.0)
            total = tl.sum(weights, 0)
            keep = with_rest & (total < 1.0)
            log_norm = tl.where(keep, 0.0, tl.log(total))
            logp = tl.where(used & (weights > 0.0), tl.log(weights) - log_norm, -float("inf"))
            logp_rest = tl.where(keep, tl.log(1.0 - tl.minimum(total, 1.0)), -float("inf"))
            empty = total <= 0.0
        else:
            tempered = tl.where(used, values * value_scale, -float("inf"))
            lse_a = _lse(tempered, used)
            empty = lse_a == -float("inf")
            logp = tempered - tl.where(empty, 0.0, lse_a)
            logp_rest = tl.full([], -float("inf"), tl.float32)
            if MISSING == _RESIDUAL and KIND == _LOGPROBS:
                # in float64: the rest mass 1 − Σ exp(v) may be below float32's resolution of Σ exp(v)
                log_inside_64 = tl.minimum(_lse(values.to(tl.float64), used), 0.0)
                rest_64 = -(tl.exp(log_inside_64) - 1.0)  # no cancellation left to fear in float64
                log_inside = log_inside_64.to(tl.float32)
                log_inside = tl.where(with_rest & (lse_a > -float("inf")), log_inside, 0.0)
                logp = logp + log_inside
                logp_rest = tl.where(with_rest & (rest_64 > 0.0), tl.log(rest_64).to(tl.float32), logp_rest)
        logp_rest = tl.where(empty & with_rest, 0.0, logp_rest)
        logp = tl.where(empty, -float("inf"), logp)
        has_teacher = (empty == 0) | with_rest

        if MISSING == _SUPPORT:
            norm = _lse(u_s, used)
        else:
            norm = log_z
        logq = tl.where(used, u_s - norm, -float("inf"))
        q = tl.exp(logq)
        p = tl.exp(logp)
        if MISSING == _RENORMALIZE:
            divergence = tl.sum(tl.where(p > 0, p * (logp - logq), 0.0), 0)
            d = q - p
            c_row = 1.0
        else:
            terms, _, _ = _divergence_terms(logp, logq, p, q, mix_wp, mix_wq, DIVERGENCE)
            # G_b = dD/du at row constants 0: the same multiple of Q_b for every bucket, which
            # cancels (skew KL's second constant is W − 1, so -1 keeps it in its one-constant form)
            g = tl.where(used, _divergence_grad(logp, logq, p, q, mix_wp, mix_wq, 0.0, -1.0, DIVERGENCE), 0.0)
            divergence = tl.sum(tl.where(used, terms, 0.0), 0)
            sum_g = tl.sum(g, 0)
            q_rest = tl.exp(logq_rest)
            p_rest = tl.exp(logp_rest)
            rest_term, _, _ = _divergence_terms(logp_rest, logq_rest, p_rest, q_rest, mix_wp, mix_wq,
                                                DIVERGENCE)
            g_rest = _divergence_grad(logp_rest, logq_rest, p_rest, q_rest, mix_wp, mix_wq, 0.0, -1.0,
                                      DIVERGENCE)
            divergence += tl.where(with_rest, rest_term, 0.0)
            sum_g += tl.where(with_rest, g_rest, 0.0)
            d = g - q * sum_g
            c_row = tl.where(with_rest, tl.where(q_rest > 0, g_rest / tl.where(q_rest > 0, q_rest, 1.0), 0.0)
                             - sum_g, 0.0)
        if MISSING == _SUPPORT:
            # the student masks all of S while the teacher has mass there: infinite
            divergence = tl.where(norm == -float("inf"), float("inf"), divergence)
        divergence = tl.where(has_teacher, divergence, 0.0)
        d = tl.where(has_teacher, d, 0.0)
        c_row = tl.where(has_teacher, c_row, 0.0)

        row_loss = kd_scale * divergence
        if USE_CE:
            z_label = tl.load(student_row + label, mask=(label >= 0) & (label < vocab), other=0.0).to(tl.float32)
            row_loss += ce_weight * ((max_z - z_label) + log_z1)
        poisoned = poisoned | (row_loss != row_loss) | (row_loss == float("inf"))
        row_loss = tl.where(poisoned, float("nan"), row_loss)
        tl.store(row_loss_ptr + row, row_loss)

        # ---- 3. the gradient ----
        if COMPUTE_GRAD:
            grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
            dense_coef = kd_coef * grad_scale * c_row
            ce_coef = ce_weight * grad_scale
            for tile in range(0, n_tiles):
                offs = tile * BLOCK + cols
                z = tl.load(student_row + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
                q_tile = tl.exp((z - max_z) * inv_temperature - log_z)
                g_tile = dense_coef * q_tile
                if USE_CE:
                    g_tile += _ce_grad(z, q_tile, max_z, log_z1, offs, label, ce_coef, CE_REUSES_Q)
                g_tile = tl.where(poisoned, float("nan"), g_tile)
                tl.store(grad_row + offs, g_tile.to(grad_ptr.dtype.element_ty), mask=offs < vocab)
            tl.debug_barrier()  # the support columns below overwrite what the tiles wrote
            g_support = kd_coef * grad_scale * d
            if USE_CE:
                g_support += ce_coef * (tl.exp(z_raw - log_z1) - tl.where(ids == label, 1.0, 0.0))
            g_support = tl.where(poisoned, float("nan"), g_support)
            tl.store(grad_row + ids, g_support.to(grad_ptr.dtype.element_ty), mask=used)
    else:
        tl.store(row_loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zero_ignored_row(grad_row, vocab, BLOCK)


def _launch(student: torch.Tensor, teacher: SparseTeacher, labels: torch.Tensor, grad: Optional[torch.Tensor],
            grad_scale: torch.Tensor, cfg: SparseConfig, block: Optional[int] = None) -> torch.Tensor:
    if student.stride(-1) != 1:
        student = student.contiguous()

    def launch(row_loss: torch.Tensor) -> None:
        n_rows, vocab = student.shape
        kd = cfg.kd
        k = teacher.ids.shape[-1]
        mix_wp, mix_wq = kd.mixture_weights
        tile = block or min(MAX_BLOCK, triton.next_power_of_2(vocab))
        _sparse_kd_fwd_kernel[(n_rows,)](
            student, teacher.ids.contiguous(), teacher.values.float().contiguous(), labels.long().contiguous(),
            grad if grad is not None else student, row_loss,
            grad_scale.to(device=student.device, dtype=torch.float32),
            student.stride(0), vocab, k, cfg.pad_id, 1.0 / kd.temperature,
            cfg.teacher_temperature / kd.temperature, kd.kd_scale, kd.kd_scale / kd.temperature, kd.ce_weight,
            mix_wp, mix_wq, kd.ignore_index,
            DIVERGENCE=kd.divergence_id, KIND=cfg.teacher_kind_id, MISSING=cfg.missing_mass_id,
            USE_CE=kd.ce_weight > 0, CE_REUSES_Q=ce_reuses_q(kd.temperature), COMPUTE_GRAD=grad is not None,
            BLOCK=tile, K_BLOCK=triton.next_power_of_2(k), num_warps=4 if tile <= 1024 else 8)

    return launch_over_rows(student, launch)


def _raise_bad_student() -> None:
    raise ValueError("student_logits contains NaN or +inf, or a row's loss is infinite: the teacher or the "
                     "label puts mass on an entry the student masks with -inf")


def _check(row_loss: torch.Tensor) -> torch.Tensor:
    # NaN rows: a device assertion on GPU by default, the ValueError in strict mode (kdkernels._reports)
    _reports.raise_reported(row_loss, _raise_bad_student)
    return row_loss


def sparse_rows(student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
         grad_scale: torch.Tensor, cfg: SparseConfig, compute_grad: bool, *, block: Optional[int] = None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The backend contract (kdkernels.backends) with a SparseTeacher; `labels` are the effective
    labels kdkernels.sparse passes (never None)."""
    grad = torch.empty(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device) \
        if compute_grad else None
    return _check(_launch(student_logits, teacher, labels, grad, grad_scale, cfg, block)), grad


def sparse_rows_inplace(student_logits: torch.Tensor, teacher: SparseTeacher, labels: Optional[torch.Tensor],
                 grad_scale: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """`rows` with the gradient written over the contiguous student logits (each program gathers
    its row's support and label logits before it writes)."""
    if not student_logits.is_contiguous():
        raise ValueError("student_logits must be contiguous to take the gradient in place")
    return _check(_launch(student_logits, teacher, labels, student_logits, grad_scale, cfg))
