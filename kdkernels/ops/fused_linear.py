"""Fused lm_head + KD loss: the loss and the gradients of the student's hidden states, lm_head weight
and bias, computed over token chunks so that the [tokens, vocab] logits never exist in full.

Per chunk of rows [start, end):

    z_s = softcap(logit_scale * (h_s @ W_s^T + b_s))          # [n, V]   student logits
    z_t = softcap(logit_scale * (h_t @ W_t^T + b_t))          # [n, V]   teacher logits (no grad)
    row_loss, g = rows(z_s, z_t, labels, grad_scale)          # the backend's KD row kernel
    g   <- g * softcap'(.) * logit_scale                      # chain rule back to h_s @ W_s^T + b_s
    dL/dh_s[chunk] = g @ W_s,  dL/dW_s += g^T @ h_s,  dL/db_s += sum_rows g

with softcap(y) = c * tanh(y / c), softcap'(y) = 1 - (softcap(y) / c)^2, and ``grad_scale`` the
global reduction factor (1 / valid tokens for "mean"), the same tensor for every chunk. The
gradients are computed in the forward pass; backward only scales them by the incoming gradient
(except for reduction="none", whose per-row incoming gradient is known only then: backward
recomputes the chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from kdkernels import _extension
from kdkernels._config import KDConfig, math_dtype
from kdkernels.backends import cpu
from kdkernels.ops.fused import first_order, scale_saved_grads, times
from kdkernels.ops.reduction import reduce_rows
from kdkernels.ops.route import KD, Route, logits_loss

# Default memory for one chunk's [rows, vocab] tensors (student logits, teacher logits, the row
# kernel's gradient unless the backend writes it over the student logits (rows_inplace), and the
# float32 copy of that gradient when the lm_head is not float32 and no widening_gemm reads it as
# it is), per device type; chunk_size = budget // bytes per row, but at least MIN_CHUNK_ROWS.
# Each GEMM call re-reads (and the BLAS re-packs) the whole lm_head weight, a cost per chunk
# rather than per row, so small chunks cost GEMM speed (the four GEMMs at V=32000, H=1024 against
# unchunked GEMMs, AMD EPYC with 2 threads, torch 2.13.0: +2.7% at 436 rows, +1% at 655) while
# large ones cost memory.
# CPU: ~655 rows at V=32000 fp32 (gradient in place), where the extra memory stays under half of
# Liger-Kernel's; CUDA: ~1400 rows at V=128256 bf16.
DEFAULT_CHUNK_BYTES = {"cpu": 160 * 1024 * 1024, "cuda": 1024 * 1024 * 1024}
# Below this many rows that per-chunk cost (growing as 1 / rows) dominates, so huge vocabularies
# exceed the budget instead: at V=256000 fp32, 128 rows hold 375 MiB.
MIN_CHUNK_ROWS = 128


def chunk_rows(n_rows: int, vocab: int, bytes_per_entry: int, device_type: str = "cpu",
               budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk: at most as many as fit the chunk's [rows, vocab] tensors in ``budget_bytes``
    (default: DEFAULT_CHUNK_BYTES of the device type, the CPU's for other devices), but at least
    MIN_CHUNK_ROWS, and balanced: the fewest chunks of that size, made equal, so no short last
    chunk pays a whole GEMM's per-call cost for a few rows (at N=4096, 655 rows would leave 166)."""
    if n_rows == 0:
        return 1
    if budget_bytes is None:
        budget_bytes = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cpu"])
    fit = budget_bytes // max(1, vocab * bytes_per_entry)
    if fit <= MIN_CHUNK_ROWS:  # the floor decides; chunks below it would cost more than they save
        return max(1, min(n_rows, MIN_CHUNK_ROWS))
    most = min(n_rows, fit)
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer; on CPU from the compiled kernels' reusable huge-page mappings
    (kdkernels.backends.cpu.empty), so the buffers of every step after the first are resident."""
    if device.type == "cpu" and _extension.cpu_available():
        return cpu.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _apply_softcap_(logits: torch.Tensor, softcap: Optional[float]) -> None:
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)


def _pad_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V_side] -> [N, vocab]: the missing columns hold -inf, i.e. probability 0."""
    if logits.shape[-1] == vocab:
        return logits
    pad = logits.new_full((logits.shape[0], vocab - logits.shape[-1]), -math.inf)
    return torch.cat([logits, pad], dim=-1)


def float32_chunk_logits(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an lm_head of `dtype` on `device` produces its chunk logits in float32: on CUDA for
    bfloat16 / float16, where the GEMM accumulates in float32 and writes float32 (torch.addmm's
    out_dtype), so the loss sees logits that were never rounded to the lm_head's dtype. CPU BLAS
    has no such GEMM: there the chunk logits stay in the lm_head's dtype."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _lm_head_gemm(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  logit_scale: float) -> None:
    """out [n, V] = logit_scale * (hidden [n, H] @ weight [V, H]^T + bias [V]), in out's dtype,
    which may be float32 for a bfloat16 / float16 lm_head (float32_chunk_logits)."""
    wide = out.dtype != hidden.dtype
    if not wide and widened_matmul(hidden, weight):
        _lm_head_gemm_widening(out, hidden, weight, bias, logit_scale)
    elif bias is None and wide:
        torch.mm(hidden, weight.t(), out.dtype, out=out)
        if logit_scale != 1.0:
            out.mul_(logit_scale)
    elif bias is None:  # beta=0: out's previous content is ignored, not read
        torch.addmm(out, hidden, weight.t(), beta=0, alpha=logit_scale, out=out)
    elif wide:
        torch.addmm(bias, hidden, weight.t(), out.dtype, beta=logit_scale, alpha=logit_scale, out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), beta=logit_scale, alpha=logit_scale, out=out)


def _lm_head_gemm_widening(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], logit_scale: float) -> None:
    """_lm_head_gemm of a 16-bit lm_head on a CPU without 16-bit dot products: the widening GEMM
    (float32 accumulation, as torch's 16-bit matmul) into a float32 buffer of COPY_BLOCK_BYTES,
    a block of vocabulary columns at a time, each block rounded once into out."""
    rows = out.shape[0]
    block = max(1, COPY_BLOCK_BYTES // (4 * max(rows, 1)))
    buffer = torch.empty(rows * min(block, out.shape[1]), dtype=torch.float32, device=out.device)
    for lo in range(0, out.shape[1], block):
        hi = min(lo + block, out.shape[1])
        wide = buffer[: rows * (hi - lo)].view(rows, hi - lo)
        torch.ops.kdkernels.addmm_widening_(wide, hidden, weight[lo:hi].t(), 0.0, float(logit_scale))
        if bias is not None:
            wide.add_(bias[lo:hi].float(), alpha=logit_scale)
        out[:, lo:hi].copy_(wide)


class _LinearLogits:
    """Logits of an lm_head, chunk by chunk: softcap(logit_scale * (hidden @ weight^T + bias))."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 logit_scale: float, softcap: Optional[float]) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias  # [N, H], [V_side, H], [V_side]
        self.logit_scale, self.softcap = logit_scale, softcap
        self.vocab = weight.shape[0]
        self.dtype = hidden.dtype  # the lm_head's: its gradients' dtype
        # the chunk logits' (and the row kernel's gradient's) dtype
        self.logits_dtype = torch.float32 if float32_chunk_logits(hidden.device, hidden.dtype) else hidden.dtype
        self.needs_buffer = True

    def chunk(self, start: int, end: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        # buffer: [chunk, V]; its columns past self.vocab hold -inf (filled once, never written)
        logits = buffer[: end - start]
        own = logits[:, : self.vocab]
        hidden = self.hidden[start:end]
        # torch.compile refuses an out= view with gaps (own, when the common vocabulary is wider)
        out = own if own.is_contiguous() or not torch.compiler.is_compiling() else torch.empty_like(
            own, memory_format=torch.contiguous_format)
        _lm_head_gemm(out, hidden, self.weight, self.bias, self.logit_scale)
        if out is not own:
            own.copy_(out)
        _apply_softcap_(own, self.softcap)
        return logits

    def full(self, vocab: int, counted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All the logits [N, vocab] at once, differentiable (the reference path). counted: bool
        [N], the rows the loss reads; the others' hidden states enter as zeros, so that whatever
        they hold (NaN) reaches no gradient (the weight's would be 0 * NaN)."""
        hidden = self.hidden
        if counted is not None:
            hidden = torch.where(counted.unsqueeze(-1), hidden, hidden.new_zeros(()))
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias) * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return _pad_vocab(logits, vocab)

    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return self.hidden, self.weight, self.bias

    def with_tensors(self, tensors: Sequence[Optional[torch.Tensor]]) -> "_LinearLogits":
        """The same lm_head over `tensors` (as tensors() gives them, e.g. unpacked from autograd)."""
        return _LinearLogits(*tensors, self.logit_scale, self.softcap)


class _GivenLogits:
    """Ready teacher logits [N, V_t], chunk by chunk; padded with -inf to the common vocabulary."""

    def __init__(self, logits: torch.Tensor, vocab: int) -> None:
        self.logits = logits
        self.vocab = logits.shape[-1]
        self.common_vocab = vocab
        self.dtype = self.logits_dtype = logits.dtype
        self.needs_buffer = self.vocab < vocab

    def chunk(self, start: int, end: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.needs_buffer:
            return self.logits[start:end]
        padded = buffer[: end - start]
        padded[:, : self.vocab].copy_(self.logits[start:end])
        return padded

    def full(self, vocab: int) -> torch.Tensor:
        return _pad_vocab(self.logits, vocab)

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.logits,)

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "_GivenLogits":
        return _GivenLogits(tensors[0], self.common_vocab)


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    cfg: KDConfig
    reduction: str
    batch_shape: Tuple[int, ...]
    vocab: int            # common vocabulary: max of the student's and the teacher's
    chunk_size: int
    route: Route
    # whether the gradient may overwrite the student logits buffer (the backend has rows_inplace
    # and there is no softcap, whose derivative needs the capped logits after the row kernel)
    inplace: bool
    # power of two the row kernel's gradient is divided by and the GEMMs multiply back (gradient_headroom)
    headroom: float = 1.0
    # a low-precision lm_head's float32 weight gradient accumulated in two passes over the tokens
    # (_run_weight_halves): the logits GEMM and row kernel run twice; beyond the gradient itself,
    # one float32 buffer of a quarter of the lm_head's rows instead of a whole float32 [V, H]
    weight_halves: bool = False


class Wanted(NamedTuple):
    """Which of the student's gradients are wanted."""

    hidden: bool
    weight: bool
    bias: bool

    @staticmethod
    def none() -> "Wanted":
        return Wanted(False, False, False)

    @staticmethod
    def of(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "Wanted":
        """The gradients a student lm_head's tensors ask for (none under torch.no_grad())."""
        if not torch.is_grad_enabled():
            return Wanted.none()
        return Wanted(hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)


def _widening_dtypes() -> frozenset:
    if not _extension.cpu_available():
        return frozenset()
    return frozenset(dtype for dtype in (torch.bfloat16, torch.float16)
                     if torch.ops.kdkernels.widening_gemm_available(dtype))


# asked once, at import: a plain set that torch.compile reads without tracing an op
_WIDENING_DTYPES = _widening_dtypes()


def _native_16bit_dot(dtype: torch.dtype) -> bool:
    """Whether this CPU has dot-product instructions for `dtype` (AVX512-BF16 or AMX for bfloat16,
    AMX-FP16 for float16). Without them torch's 16-bit matmul over a long reduction (the hidden
    gradient's, over the vocabulary) runs two orders of magnitude slower than the widening GEMM, and
    over the hidden size (the logits') several times slower."""
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}[dtype]
    # a torch without a probe keeps its own matmul
    return any(bool(getattr(torch.cpu, name, lambda: True)()) for name in probes)


# asked once, at import (as _WIDENING_DTYPES): the 16-bit dtypes whose chunk logits and hidden
# gradient take the widening GEMM (a float32 result, rounded once) in place of torch's 16-bit matmul
_WIDENED_GEMM_DTYPES = frozenset(dtype for dtype in _WIDENING_DTYPES if not _native_16bit_dot(dtype))


def widened_matmul(mat1: torch.Tensor, mat2: torch.Tensor) -> bool:
    """Whether a 16-bit product mat1 @ mat2 of the lm_head (chunk logits, hidden gradient) takes
    the widening GEMM in place of torch's matmul: on a CPU without dot products for its dtype."""
    return mat1.device.type == "cpu" and mat1.dtype == mat2.dtype and mat1.dtype in _WIDENED_GEMM_DTYPES


def widening_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a 16-bit lm_head's float32 weight gradient accumulates straight from the 16-bit
    gradient chunks, in one GEMM that reads 16-bit operands and accumulates and writes float32
    (kdkernels::addmm_widening_, on CPU where torch's BLAS has one), instead of a float32 GEMM of
    float32 copies of them (a third of the speed)."""
    return device.type == "cpu" and dtype in _WIDENING_DTYPES


def bytes_per_logit(student_bytes: int, logits_bytes: int, teacher_bytes: int, wanted: Wanted,
                    inplace: bool, widening: bool = False) -> int:
    """Memory per vocabulary entry of a chunk row, which sizes the chunks: the student logits (in
    `logits_bytes`, float32 where the GEMM writes float32 logits from a bf16/fp16 lm_head) and the
    teacher's buffered logits (`teacher_bytes`, 0 when none are buffered), plus, when a gradient is
    wanted, the kernel's gradient (none when it overwrites the student logits), its copy in the
    lm_head's dtype when the logits are wider, and a float32 share for a low-precision lm_head's
    weight gradient (none when its GEMM reads the 16-bit gradient itself: `widening`)."""
    per_entry = logits_bytes + teacher_bytes
    if any(wanted):
        per_entry += (0 if inplace else logits_bytes) + (student_bytes if logits_bytes > student_bytes else 0)
        per_entry += 4 if wanted.weight and student_bytes < 4 and not widening else 0
    return per_entry


# Bytes of one float32 copy of a low-precision gradient block (_StudentGrads.add_chunk, _narrow_rows):
# the copies go block by block, so they cost this much memory, not a chunk's [rows, V] in float32.
COPY_BLOCK_BYTES = 4 * 1024 * 1024


@dataclass
class _StudentGrads:
    """Gradient accumulators; None where that gradient is not required."""

    hidden: Optional[torch.Tensor]   # [N, H] in the hidden dtype, one chunk of rows at a time
    weight: Optional[torch.Tensor]   # [V_s, H] float32 (float64) accumulator
    bias: Optional[torch.Tensor]     # [V_s] float32 (float64) accumulator
    # first lm_head row of `weight`'s rows, and further (first row, accumulator [rows, H]) parts
    # of the lm_head rows (_run_weight_halves); a pass accumulates only these rows' gradient
    weight_row: int = 0
    more_weight: Tuple[Tuple[int, torch.Tensor], ...] = ()

    @staticmethod
    def allocate(student: _LinearLogits, wanted: Wanted) -> "_StudentGrads":
        hidden, weight = student.hidden, student.weight
        accumulate = math_dtype(weight.dtype)
        return _StudentGrads(
            hidden=_empty(hidden.shape, hidden.dtype, hidden.device) if wanted.hidden else None,
            # filled by the first chunk (beta=0), so no zero-fill pass; zeros when there is no chunk
            weight=(_empty(weight.shape, accumulate, weight.device) if hidden.shape[0] else
                    torch.zeros(weight.shape, dtype=accumulate, device=weight.device)) if wanted.weight else None,
            bias=torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if wanted.bias else None,
        )

    def add_chunk(self, student: _LinearLogits, start: int, end: int, grad: torch.Tensor,
                  first: bool, headroom: float, hidden: Optional[torch.Tensor] = None) -> None:
        """grad: dL/d(hidden @ weight^T + bias) of rows [start, end), [n, V_s], divided by headroom
        and lacking logit_scale, both folded into the GEMMs' alpha here (computed in float32 there).
        hidden: the rows' hidden states as the weight gradient reads them (default: the student's)."""
        scale = student.logit_scale * headroom
        if self.hidden is not None:
            out = self.hidden[start:end]
            if widened_matmul(grad, student.weight):
                # float32 accumulation either way; this GEMM reads the 16-bit operands as they are
                wide = torch.empty(out.shape, dtype=torch.float32, device=out.device)
                torch.ops.kdkernels.addmm_widening_(wide, grad, student.weight, 0.0, float(scale))
                out.copy_(wide)
            else:
                torch.addmm(out, grad, student.weight, beta=0, alpha=scale, out=out)
        parts = ((self.weight_row, self.weight),) + self.more_weight if self.weight is not None else ()
        hidden, rows = student.hidden[start:end] if hidden is None else hidden, end - start
        copy = None
        for row, weight in parts:
            grad_t = grad[:, row: row + weight.shape[0]].t()
            if weight.dtype == grad.dtype:
                torch.addmm(weight, grad_t, hidden, beta=0 if first else 1, alpha=scale, out=weight)
                continue
            if widening_gemm(grad.device, grad.dtype):
                torch.ops.kdkernels.addmm_widening_(weight, grad_t, hidden, 0.0 if first else 1.0, float(scale))
                continue
            # float32 accumulation of a low-precision lm_head without a widening GEMM: the gradient's
            # float32 copy goes COPY_BLOCK_BYTES at a time through one buffer (one allocation, so none
            # is kept by the allocator)
            if copy is None:
                block = max(1, COPY_BLOCK_BYTES // (rows * weight.itemsize))
                copy, hidden = torch.empty(block * rows, dtype=weight.dtype, device=weight.device), hidden.to(weight.dtype)
            for lo in range(0, weight.shape[0], block):
                out = weight[lo: lo + block]
                grad_block = copy[: out.shape[0] * rows].view(out.shape[0], rows)
                grad_block.copy_(grad_t[lo: lo + block])
                torch.addmm(out, grad_block, hidden, beta=0 if first else 1, alpha=scale, out=out)
        if self.bias is not None:
            self.bias.add_(grad.sum(0, dtype=self.bias.dtype), alpha=scale)

    def results(self, student: _LinearLogits) -> List[Optional[torch.Tensor]]:
        """[hidden, weight, bias] gradients in their parameters' dtypes (one cast at the end, into
        a reusable buffer: a fresh [V, H] tensor paid a page fault per page at every step)."""
        def cast(accumulator: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if accumulator is None or accumulator.dtype == student.weight.dtype:
                return accumulator
            return _empty(accumulator.shape, student.weight.dtype, accumulator.device).copy_(accumulator)

        return [self.hidden, cast(self.weight), cast(self.bias)]


def _narrow_rows(source: torch.Tensor, target: torch.Tensor, backward: bool) -> None:
    """target[i] = source[i] cast to target's dtype, [rows, H] each, COPY_BLOCK_BYTES at a time.
    The two may share storage (a float32 accumulator inside the lm_head-dtype gradient): each block
    is cast into a temporary before it is written, and the blocks go in the order (first to last,
    or last to first with `backward`) that writes only over rows already read."""
    block = max(1, COPY_BLOCK_BYTES // max(1, source.shape[1] * source.itemsize))
    starts = range(0, source.shape[0], block)
    for lo in (reversed(starts) if backward else starts):
        target[lo: lo + block] = source[lo: lo + block].to(target.dtype)


def _float_rows(gradient: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The start of `gradient`'s storage ([V, H], contiguous) as a [rows, H] tensor of `dtype`."""
    hidden = gradient.shape[1]
    ratio = dtype.itemsize // gradient.itemsize
    return gradient.view(-1)[: ratio * rows * hidden].view(dtype).view(rows, hidden)


def _run_weight_halves(plan: _Plan, student: _LinearLogits, teacher, labels: Optional[torch.Tensor],
                       grad_scale: torch.Tensor, wanted: Wanted, row_weights: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, _StudentGrads]:
    """_run_chunks for a low-precision lm_head (itemsize <= half of float32's) whose weight
    gradient is wanted, with memory for the weight gradient of 1.5x its size instead of 3x (a
    float32 [V, H] accumulator, then its cast), at the cost of a second logits GEMM and row kernel:

      pass 1 (every gradient): the float32 accumulator of the upper m = V // 2 lm_head rows lives
        in the storage of the gradient [V, H] itself (4 m H <= 2 V H bytes); then it is narrowed
        in place, last rows first, to the gradient's rows [V - m, V);
      pass 2 (the weight only): rows [0, q), q = (V - m) // 2, accumulate in float32 in the free
        start of that storage, rows [q, V - m) in a float32 buffer [V - m - q, H]; both narrowed.

    Every weight-gradient entry is one float32 sum over all tokens, rounded once: the result equals
    the single-pass accumulation up to float32 summation order."""
    weight = student.weight
    vocab, accumulate = weight.shape[0], math_dtype(weight.dtype)
    upper = vocab // 2
    lower = vocab - upper
    start_rows = lower // 2
    # the largest buffers first (before the chunk loop's), so each takes back its own cached
    # mapping (kdkernels.backends.cpu.empty) the next step, not one another's
    gradient = _empty(weight.shape, weight.dtype, weight.device)
    rest = _empty((lower - start_rows, weight.shape[1]), accumulate, weight.device)
    first = _StudentGrads.allocate(student, wanted._replace(weight=False))
    first.weight, first.weight_row = _float_rows(gradient, upper, accumulate), lower
    row_loss, first = _run_chunks(plan, student, teacher, labels, grad_scale, wanted, row_weights, grads=first)
    _narrow_rows(first.weight, gradient[lower:], backward=True)

    second = _StudentGrads(hidden=None, weight=_float_rows(gradient, start_rows, accumulate), bias=None,
                           more_weight=((start_rows, rest),))
    _run_chunks(plan, student, teacher, labels, grad_scale, Wanted(False, True, False), row_weights, grads=second)
    _narrow_rows(second.weight, gradient[:start_rows], backward=False)
    gradient[start_rows:lower] = rest
    del rest
    first.weight, first.weight_row = gradient, 0
    return row_loss, first


def gradient_headroom(cfg: KDConfig, dtype: torch.dtype) -> float:
    """A power of two that the row kernel's gradient is divided by (through its grad_scale) and
    the gradient GEMMs multiply back, both exactly, so that the logits' gradient chunk fits the
    lm_head's dtype. It is 1 but where the factor on that gradient, kd_weight * T^2 / T (+
    ce_weight), nears the dtype's largest value: float16 at a tiny temperature without
    scale_by_t2. An overflowed entry would turn the GEMMs' sums into inf - inf = NaN; a
    gradient that is itself beyond the dtype still comes out as inf."""
    # |dL/dz| <= grad_scale (<= 1) * (kd_grad_scale * |dD/du| + ce_weight); 2^8 of the dtype's
    # range is left for |dD/du| (|q - p| <= 1 for forward KL)
    room = torch.finfo(dtype).max / 2 ** 8
    factor = cfg.kd_grad_scale + cfg.ce_weight
    return 1.0 if factor <= room else 2.0 ** math.ceil(math.log2(factor / room))


def _run_chunks(plan: _Plan, student: _LinearLogits, teacher, labels: Optional[torch.Tensor],
                grad_scale: torch.Tensor, wanted: Wanted, row_weights: Optional[torch.Tensor] = None,
                grads: Optional[_StudentGrads] = None) -> Tuple[torch.Tensor, Optional[_StudentGrads]]:
    """Row losses [N] and, when any gradient is wanted, the student's gradients of
    sum_rows(grad_scale * row_weight * row_loss) (row_weight = 1 when None), accumulated in
    `grads` (allocated here when None)."""
    n_rows, vocab, chunk = student.hidden.shape[0], plan.vocab, plan.chunk_size
    device = student.hidden.device
    route = plan.route
    compute_grad = any(wanted)
    if (grads is None and wanted.weight and plan.weight_halves and n_rows
            and 2 * student.weight.itemsize <= math_dtype(student.weight.dtype).itemsize):
        return _run_weight_halves(plan, student, teacher, labels, grad_scale, wanted, row_weights)

    def buffer(side) -> Optional[torch.Tensor]:
        if not side.needs_buffer:
            return None
        logits = _empty((min(chunk, n_rows), vocab), side.logits_dtype, device)
        if side.vocab < vocab:
            # the shorter vocabulary's missing columns: -inf, i.e. probability 0 (never logit 0)
            logits[:, side.vocab:].fill_(-math.inf)
        return logits

    student_buffer, teacher_buffer = buffer(student), buffer(teacher)
    # float32 chunk logits of a low-precision lm_head: the gradient GEMMs take the kernel's
    # gradient in the lm_head's dtype, rounded into this one reused buffer
    narrow_grad = (_empty((min(chunk, n_rows), student.vocab), student.dtype, device)
                   if compute_grad and student.logits_dtype != student.dtype else None)
    # the weight gradient reads the hidden states of ignored rows as zeros (their gradient rows are
    # zero, and 0 * NaN would be NaN), from one reused buffer
    counted_hidden = (_empty((min(chunk, n_rows), student.hidden.shape[1]), student.hidden.dtype, device)
                      if labels is not None and wanted.weight else None)
    # the gradient replaces the student logits in their reused buffer: no allocation per chunk
    inplace = compute_grad and plan.inplace
    row_loss = torch.empty(n_rows, dtype=route.dtype, device=device)
    if compute_grad and grads is None:
        grads = _StudentGrads.allocate(student, wanted)
    kernel_scale = grad_scale if plan.headroom == 1.0 else grad_scale / plan.headroom

    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        student_logits = student.chunk(start, end, student_buffer)
        with torch.no_grad():
            teacher_logits = teacher.chunk(start, end, teacher_buffer)
        labels_chunk = None if labels is None else labels[start:end]
        route.check_values(student_logits, teacher_logits, labels_chunk, plan.cfg)
        kernel_logits = student_logits
        if row_weights is not None and student_logits.itemsize < 4:
            # the kernel's gradient in float32, so that each row's weight multiplies it before
            # it is rounded to the lm_head's dtype, once (as eager PyTorch rounds it)
            kernel_logits = student_logits.float()
        if inplace:
            chunk_loss = route.rows_inplace(kernel_logits, teacher_logits, labels_chunk, kernel_scale, plan.cfg)
            grad = kernel_logits
        else:
            chunk_loss, _, grad = route.rows(kernel_logits, teacher_logits, labels_chunk, kernel_scale, plan.cfg,
                                             compute_grad)
        row_loss[start:end] = chunk_loss
        if not compute_grad:
            continue
        if inplace and student.vocab < vocab:
            student_buffer[: end - start, student.vocab:].fill_(-math.inf)  # padding the kernel overwrote
        grad = grad[:, : student.vocab]
        if row_weights is not None:
            grad = times(grad, row_weights[start:end], per_row=True, in_place=True, dtype=student.dtype)
        if student.softcap is not None:
            # softcap'(y) = 1 - (z / c)^2 from the capped logits z, computed in their own buffer
            derivative = student_logits[:, : student.vocab]
            derivative.div_(student.softcap).square_().neg_().add_(1.0)
            grad.mul_(derivative)
        if grad.dtype != student.dtype:
            grad = narrow_grad[: end - start].copy_(grad)
        hidden = None
        if counted_hidden is not None:
            hidden = counted_hidden[: end - start].copy_(student.hidden[start:end])
            hidden.masked_fill_((labels_chunk == plan.cfg.ignore_index).unsqueeze(-1), 0.0)
        grads.add_chunk(student, start, end, grad, first=start == 0, headroom=plan.headroom, hidden=hidden)
        del grad  # freed before the next chunk's kernel allocates its own: one gradient chunk at a time
    return row_loss, grads


class FusedLinearKDFunction(torch.autograd.Function):
    """loss = reduce(KD rows(student lm_head logits, teacher logits)); gradients of the student's
    hidden states, lm_head weight and bias from the chunked forward pass (kdkernels.ops.fused
    gives the rules of the saved gradients and of double backward)."""

    @staticmethod
    def forward(ctx, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                student_bias: Optional[torch.Tensor], student: _LinearLogits, teacher,
                labels: Optional[torch.Tensor], grad_scale: torch.Tensor, plan: _Plan,
                wanted: Wanted) -> torch.Tensor:
        ctx.per_row = plan.reduction == "none"
        if ctx.per_row:
            # Each row's incoming gradient is known only in backward: the chunks are recomputed
            # there, from tensors saved under autograd's version counter, so that an in-place
            # change of any of them after this call raises autograd's error.
            row_loss, _ = _run_chunks(plan, student, teacher, labels, grad_scale, Wanted.none())
            loss = reduce_rows(row_loss, grad_scale, plan.reduction, plan.batch_shape)
            ctx.save_for_backward(loss, student_hidden, student_weight, student_bias, labels, grad_scale,
                                  *teacher.tensors())
            ctx.recompute = (plan, student, teacher, wanted)
        else:
            row_loss, grads = _run_chunks(plan, student, teacher, labels, grad_scale, wanted)
            loss = reduce_rows(row_loss, grad_scale, plan.reduction, plan.batch_shape)
            ctx.save_for_backward(loss, *grads.results(student))
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        none = (None,) * 6
        if ctx.per_row:
            plan, student, teacher, wanted = ctx.recompute
            loss, hidden, weight, bias, labels, grad_scale, *teacher_tensors = ctx.saved_tensors
            with torch.no_grad():
                student = student.with_tensors((hidden.detach(), weight.detach(),
                                                None if bias is None else bias.detach()))
                teacher = teacher.with_tensors(teacher_tensors)
                _, grads = _run_chunks(plan, student, teacher, labels, grad_scale, wanted,
                                       row_weights=grad_output.reshape(-1))
            return (*first_order(grads.results(student), loss), *none)
        loss, *saved = ctx.saved_tensors
        with torch.no_grad():
            grads = scale_saved_grads(saved, grad_output, per_row=False)
        return (*first_order(grads, loss), *none)


def fused_linear_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                      student_bias: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                      teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                      teacher_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor], cfg: KDConfig,
                      reduction: str, backend: str, chunk_size: Optional[int], softcap: Optional[float],
                      logit_scale: float) -> torch.Tensor:
    """The validated call of kdkernels.fused_linear_kd_loss (its docstring gives the arguments)."""
    route = Route(KD, backend, student_hidden)
    batch_shape = tuple(student_hidden.shape[:-1])
    student = _LinearLogits(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
                            logit_scale, softcap)
    if teacher_logits is not None:
        teacher = _GivenLogits(teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]),
                               max(student.vocab, teacher_logits.shape[-1]))
    else:
        teacher = _LinearLogits(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
                                teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                                logit_scale, softcap)
    vocab = max(student.vocab, teacher.vocab)
    if backend == "reference":
        # The definition itself: whole logits, then kd_loss's reference formula. Differentiable
        # to any order; memory grows with tokens x vocabulary.
        labels_2d = None if labels is None else labels.reshape(-1)
        counted = None if labels is None else labels_2d != cfg.ignore_index
        loss, _ = logits_loss(KD, student.full(vocab, counted), teacher.full(vocab), labels_2d, cfg, reduction,
                              backend)
        return loss.reshape(batch_shape) if reduction == "none" else loss
    labels_1d = None if labels is None else labels.reshape(-1)
    n_rows = student.hidden.shape[0]

    wanted = Wanted.of(student_hidden, student_weight, student_bias)
    inplace = route.has_inplace and softcap is None
    if chunk_size is None:
        per_entry = bytes_per_logit(student.dtype.itemsize, student.logits_dtype.itemsize,
                                    teacher.logits_dtype.itemsize if teacher.needs_buffer else 0, wanted, inplace,
                                    widening_gemm(student_hidden.device, student.dtype))
        chunk_size = chunk_rows(n_rows, vocab, per_entry, student_hidden.device.type)
    plan = _Plan(cfg=cfg, reduction=reduction, batch_shape=batch_shape, vocab=vocab, chunk_size=chunk_size,
                 route=route, inplace=inplace, headroom=gradient_headroom(cfg, student.dtype))
    grad_scale = route.grad_scale(labels_1d, cfg.ignore_index, reduction, n_rows, batch_shape, student_hidden.device)

    if any(wanted):
        return FusedLinearKDFunction.apply(student.hidden, student_weight, student_bias, student, teacher,
                                           labels_1d, grad_scale, plan, wanted)
    row_loss, _ = _run_chunks(plan, student, teacher, labels_1d, grad_scale, wanted)
    return reduce_rows(row_loss, grad_scale, reduction, batch_shape)
