"""sparse_kd_loss / fused_linear_sparse_kd_loss against a float64 oracle written here, row by row,
from the definitions: the teacher's buckets built explicitly per row, the student's rest mass as
the plain sum of its non-support probabilities, each divergence from its formula, gradients by
autograd. Every missing-mass mode x divergence x reduction x dtype, from logits and from hidden
states; k = 1, k = V (then support and residual equal dense kd_loss), padding ids, all-padding
rows, masked (-inf) student entries, ignored rows, T != T_gen; bad input."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

import kdkernels
from kdkernels.backends import cpu_sparse
from conftest import DIVERGENCE_NAMES, assert_within_eager_error, make_labels, make_pair

PAD = -1
MODES_AND_DIVERGENCES = [("renormalize", "forward_kl")] + [
    (mode, div) for mode in ("residual", "support") for div in DIVERGENCE_NAMES]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "batchmean", "sum", "none")
BACKENDS = ["cpu"] if cpu_sparse.available() else []

pytestmark = pytest.mark.skipif(not BACKENDS, reason="the loaded CPU build has no sparse-teacher kernel")


# ---- the oracle --------------------------------------------------------------------------------

def _xlog(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Σ x (log x − log y) over entries with x > 0 (0 log 0 = 0), NaN-free gradients."""
    live = x > 0
    diff = torch.where(live, log_x, torch.zeros_like(log_x)) - torch.where(live, log_y, torch.zeros_like(log_y))
    return torch.where(live, x * diff, torch.zeros_like(x)).sum()


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x)).log()


def oracle_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(p || q) of two probability vectors, from the definitions."""
    if divergence == "forward_kl":
        return _xlog(p, _safe_log(p), _safe_log(q))
    if divergence == "reverse_kl":
        return _xlog(q, _safe_log(q), _safe_log(p))
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _xlog(p, _safe_log(p), _safe_log(m)) + (1 - beta) * _xlog(q, _safe_log(q), _safe_log(m))
    if divergence == "skew_kl":
        m = beta * p + (1 - beta) * q
        return _xlog(p, _safe_log(p), _safe_log(m))
    if divergence == "skew_reverse_kl":
        m = (1 - beta) * p + beta * q
        return _xlog(q, _safe_log(q), _safe_log(m))
    assert divergence == "tvd"
    return 0.5 * (p - q).abs().sum()


def oracle_row(z: torch.Tensor, ids, values, label: Optional[int], *, teacher_kind="logprobs",
               teacher_temperature=1.0, missing_mass="renormalize", divergence="forward_kl", temperature=1.0,
               beta=0.5, kd_weight=1.0, ce_weight=0.0, scale_by_t2=True, ignore_index=-100, pad_id=PAD):
    """One row's loss (float64, differentiable in z) or None when the row is ignored."""
    support = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()) if int(i) != pad_id]
    if not support or (label is not None and label == ignore_index):
        return None
    T, V = temperature, z.shape[0]
    idx = torch.tensor([i for i, _ in support])
    vals = torch.tensor([v for _, v in support], dtype=torch.float64)
    q_full = torch.softmax(z / T, 0)
    if teacher_kind == "probs":
        p_hat = vals / vals.sum() if vals.sum() > 0 else None
    else:
        tempered = vals * (teacher_temperature / T)
        p_hat = torch.softmax(tempered, 0) if torch.isfinite(tempered).any() else None
    full = len(support) == V
    if missing_mass == "renormalize":
        kd = None if p_hat is None else _xlog(p_hat, _safe_log(p_hat), torch.log_softmax(z / T, 0)[idx])
    elif missing_mass == "support":
        kd = None if p_hat is None else oracle_divergence(p_hat, torch.softmax(z[idx] / T, 0), divergence, beta)
    else:
        outside = torch.ones(V, dtype=torch.bool)
        outside[idx] = False
        rest_s = q_full[outside].sum()
        if teacher_kind == "probs":
            total = vals.sum()
            p_in, rest_t = (vals / total, 0.0) if (full or total >= 1) else (vals, 1 - total)
            if total <= 0:
                p_in, rest_t = vals * 0, (0.0 if full else 1.0)
        else:
            inside = min(float(torch.logsumexp(vals, 0).exp()), 1.0) if not full else 1.0
            p_in = (p_hat * inside) if p_hat is not None else vals * 0
            rest_t = 1.0 - inside if p_hat is not None else (0.0 if full else 1.0)
        p = torch.cat([p_in, torch.tensor([float(rest_t)], dtype=torch.float64)])
        q = torch.cat([q_full[idx], rest_s.reshape(1)])
        kd = oracle_divergence(p, q, divergence, beta)
    loss = torch.nan_to_num(z, neginf=0.0).sum() * 0  # 0, connected to z
    if kd is not None:
        loss = loss + kd_weight * (T * T if scale_by_t2 else 1.0) * kd
    if ce_weight:
        loss = loss - ce_weight * torch.log_softmax(z, 0)[label]
    return loss


def oracle(student, ids, values, labels=None, *, reduction="mean", grad_output=None, **options):
    """(loss, dL/d(student)) in float64 for [*, V] student logits."""
    z = student.detach().double().reshape(-1, student.shape[-1]).requires_grad_(True)
    ids2 = ids.reshape(-1, ids.shape[-1])
    values2 = values.double().reshape(-1, ids.shape[-1])
    labels1 = None if labels is None else labels.reshape(-1).tolist()
    rows, counted = [], 0
    for r in range(z.shape[0]):
        row = oracle_row(z[r], ids2[r], values2[r], None if labels1 is None else labels1[r], **options)
        counted += row is not None
        rows.append(torch.nan_to_num(z[r], neginf=0.0).sum() * 0 if row is None else row)
    rows = torch.stack(rows)
    if reduction == "none":
        loss = rows.reshape(student.shape[:-1])
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "batchmean":
        loss = rows.sum() / student.shape[0]
    else:
        loss = rows.sum() / max(counted, 1)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, z, go)
    return loss.detach(), grad.reshape(student.shape)


# ---- inputs --------------------------------------------------------------------------------------

def sparse_teacher(teacher_logits, k, *, teacher_kind="logprobs", teacher_temperature=1.0, pad_rows=(),
                   short_rows=(), seed=0):
    """The teacher's top-k ids (in shuffled order) and values of the kind asked: log-probs at
    T_gen, raw logits, or the top-k probabilities (their sum < 1). `pad_rows` are all padding,
    `short_rows` keep only their first half of entries."""
    flat = teacher_logits.double().reshape(-1, teacher_logits.shape[-1])
    logprobs = torch.log_softmax(flat / teacher_temperature, -1)
    top, ids = logprobs.topk(k, -1)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    top, ids = top[:, perm], ids[:, perm]
    if teacher_kind == "logits":
        values = flat.gather(-1, ids)
    elif teacher_kind == "probs":
        values = top.exp()
    else:
        values = top
    for r in short_rows:
        ids[r, k // 2:] = PAD
        values[r, k // 2:] = float("nan")  # never read
    for r in pad_rows:
        ids[r] = PAD
    shape = (*teacher_logits.shape[:-1], k)
    return ids.reshape(shape), values.reshape(shape).float()


def run(student, ids, values, labels=None, *, grad_output=None, backend="cpu", **options):
    student = student.detach().clone().requires_grad_(True)
    loss = kdkernels.sparse_kd_loss(student, ids, values, labels, backend=backend, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach(), student.grad


def check(student, ids, values, labels=None, *, grad_output=None, backend="cpu", **options):
    """A kernel's (`backend`) loss and gradient against the oracle, within 2x the reference
    backend's own error at the student's dtype."""
    loss, grad = run(student, ids, values, labels, grad_output=grad_output, backend=backend, **options)
    eager_loss, eager_grad = run(student, ids, values, labels, grad_output=grad_output, backend="reference",
                                 **options)
    ref_loss, ref_grad = oracle(student, ids, values, labels, grad_output=grad_output, **options)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_within_eager_error(loss, eager_loss, ref_loss, what="loss", floor_dtype=torch.float32)
    assert_within_eager_error(grad, eager_grad, ref_grad, what="gradient")
    return loss, grad


N_ROWS, VOCAB, K = 9, 53, 7


def matrix_inputs(dtype, teacher_kind="logprobs", teacher_temperature=1.0):
    student, teacher = make_pair((N_ROWS, VOCAB), dtype)
    ids, values = sparse_teacher(teacher, K, teacher_kind=teacher_kind, teacher_temperature=teacher_temperature,
                                 pad_rows=(4,), short_rows=(1, 6))
    labels = make_labels((N_ROWS,), VOCAB, ignored=[2])
    return student, ids, values, labels


# ---- every mode x divergence x reduction x dtype ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode,divergence", MODES_AND_DIVERGENCES)
def test_matches_oracle_from_logits(mode, divergence, reduction, dtype):
    # T = 2 over values generated at T_gen = 1; CE blend; a padded row, short rows, an ignored row
    student, ids, values, labels = matrix_inputs(dtype)
    check(student, ids, values, labels, missing_mass=mode, divergence=divergence, reduction=reduction,
          temperature=2.0, beta=0.3, kd_weight=0.7, ce_weight=0.4)


@pytest.mark.parametrize("teacher_kind,mode", [
    (kind, mode) for kind in ("logprobs", "logits", "probs") for mode in ("renormalize", "residual", "support")
    if (kind, mode) != ("logits", "residual")])  # refused: see test_bad_input_names_the_argument
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 1.0), (0.7, 1.5)], ids=lambda t: f"T{t[0]}-Tgen{t[1]}")
def test_teacher_kinds_and_retempering(teacher_kind, mode, temperatures):
    temperature, t_gen = temperatures
    if teacher_kind == "probs":
        t_gen = 1.0
    student, ids, values, labels = matrix_inputs(torch.float32, teacher_kind, t_gen)
    check(student, ids, values, labels, teacher_kind=teacher_kind, teacher_temperature=t_gen, missing_mass=mode,
          divergence="forward_kl" if mode == "renormalize" else "jsd", temperature=temperature, ce_weight=0.5)


def test_residual_at_generation_temperature_is_the_teachers_own_buckets():
    # T = T_gen: the teacher buckets are exp(v) and 1 - Σ exp(v), exactly
    student, teacher = make_pair((3, 17), torch.float64)
    ids, values = sparse_teacher(teacher, 4, teacher_temperature=1.7)
    values = values.double()
    loss = kdkernels.sparse_kd_loss(student, ids, values, missing_mass="residual", temperature=1.7,
                                    teacher_temperature=1.7, scale_by_t2=False, reduction="none")
    q = torch.softmax(student / 1.7, -1)
    for r in range(3):
        p = torch.cat([values[r].exp(), 1 - values[r].exp().sum().reshape(1)])
        q_rows = torch.cat([q[r, ids[r]], (1 - q[r, ids[r]].sum()).reshape(1)])
        assert torch.allclose(loss[r], (p * (p / q_rows).log()).sum(), atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_residual_with_tiny_rest_masses(divergence):
    # the student puts all but ~1e-8 of its mass on the support, the teacher all but ~1e-5: the
    # rest buckets come from the non-support log-sum-exp (the teacher's: 1 - Σ exp(v) in float64),
    # not from a float32 1 - Σ q that would round them to 0 (reverse KL would then be infinite)
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(4, 3000, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(4, 3000, generator=gen, dtype=torch.float64) * 2
    student[:, :16] += 25
    teacher[:, :16] += 18
    ids, values = sparse_teacher(teacher, 16)
    check(student.float(), ids, values, missing_mass="residual", divergence=divergence, beta=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,divergence", MODES_AND_DIVERGENCES)
def test_reduction_none_with_per_row_grad_output(mode, divergence, dtype):
    student, ids, values, labels = matrix_inputs(dtype)
    # powers of two: the backward's per-row scaling of the low-precision gradient is then exact
    grad_output = torch.tensor([0.5, -1.0, 2.0, 4.0, 1.0, -0.25, 8.0, 1.0, -2.0])
    check(student, ids, values, labels, missing_mass=mode, divergence=divergence, reduction="none",
          grad_output=grad_output, temperature=1.5, ce_weight=0.2)


def test_scalar_grad_output_not_one():
    student, ids, values, labels = matrix_inputs(torch.float32)
    check(student, ids, values, labels, missing_mass="residual", divergence="reverse_kl",
          grad_output=torch.tensor(-2.5))


def test_batched_shape_and_float64_reference():
    student, teacher = make_pair((2, 5, 31), torch.float64)
    ids, values = sparse_teacher(teacher, 6, short_rows=(3,))
    labels = make_labels((2, 5), 31)
    options = dict(missing_mass="residual", divergence="skew_reverse_kl", beta=0.2, temperature=3.0,
                   ce_weight=0.5, reduction="none")
    loss, grad = run(student, ids, values.double(), labels, backend="reference", **options)
    ref_loss, ref_grad = oracle(student, ids, values.double(), labels, **options)
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    cpu_loss, _ = run(student.float(), ids, values, labels, **options)
    torch.testing.assert_close(cpu_loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


# ---- k = 1 and k = V -----------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("mode", ["residual", "support"])
def test_full_support_equals_dense_kd_loss(mode, divergence):
    student, teacher = make_pair((6, 23), torch.float32)
    ids, values = sparse_teacher(teacher, 23, teacher_temperature=2.0)
    labels = make_labels((6,), 23, ignored=[1])
    options = dict(divergence=divergence, temperature=2.0, beta=0.3, ce_weight=0.3)
    sparse_loss, sparse_grad = run(student, ids, values, labels, missing_mass=mode, teacher_temperature=2.0,
                                   **options)
    student_d = student.detach().clone().requires_grad_(True)
    dense = kdkernels.kd_loss(student_d, teacher, labels, backend="cpu", **options)
    dense.backward()
    torch.testing.assert_close(sparse_loss, dense.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, student_d.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode,divergence", MODES_AND_DIVERGENCES)
def test_single_id_support(mode, divergence):
    student, ids, values, labels = matrix_inputs(torch.float32)
    check(student, ids[:, :1], values[:, :1], labels, missing_mass=mode, divergence=divergence, temperature=1.3)


# ---- padding, ignored rows, masking ------------------------------------------------------------

def test_all_padding_row_counts_as_ignored():
    student, ids, values, _ = matrix_inputs(torch.float32)
    loss, grad = run(student, ids, values, missing_mass="residual", reduction="none")
    assert loss[4] == 0 and (grad[4] == 0).all()
    mean = kdkernels.sparse_kd_loss(student, ids, values, missing_mass="residual")
    torch.testing.assert_close(mean, loss.sum() / (N_ROWS - 1))


def test_padding_values_are_never_read():
    student, ids, values, labels = matrix_inputs(torch.float32)
    other = values.clone()
    other[ids == PAD] = 123.0
    a = kdkernels.sparse_kd_loss(student, ids, values, labels, missing_mass="residual", reduction="none")
    b = kdkernels.sparse_kd_loss(student, ids, other, labels, missing_mass="residual", reduction="none")
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode,divergence", MODES_AND_DIVERGENCES)
def test_masked_student_entries(mode, divergence):
    # masked (-inf) vocabulary off the teacher's support and, where the teacher has no mass, on it
    student, teacher = make_pair((N_ROWS, VOCAB), torch.float32)
    ids, values = sparse_teacher(teacher, K, short_rows=(3,))
    masked = torch.zeros_like(student, dtype=torch.bool)
    masked[:, ::5] = True
    masked.scatter_(1, ids.clamp(min=0), False)
    masked[0, ids[0, 0]] = True           # a support id the student masks ...
    values[0, 0] = -math.inf              # ... where the teacher has no mass
    student = student.masked_fill(masked, -math.inf)
    _, grad = check(student, ids, values, missing_mass=mode, divergence=divergence, temperature=2.0)
    assert (grad[masked] == 0).all()


@pytest.mark.parametrize("mode", ["renormalize", "residual", "support"])
def test_teacher_mass_on_a_masked_student_entry_raises(mode):
    student, ids, values, _ = matrix_inputs(torch.float32)
    student = student.clone()
    student[0, ids[0, 0]] = -math.inf
    for backend in BACKENDS + ["reference"]:
        with pytest.raises(ValueError, match="student_logits"):
            kdkernels.sparse_kd_loss(student, ids, values, missing_mass=mode, backend=backend)


def test_fully_masked_student_row_raises_unless_ignored():
    student, ids, values, labels = matrix_inputs(torch.float32)
    student = student.clone()
    student[2] = -math.inf  # row 2's label is ignore_index: fine
    kdkernels.sparse_kd_loss(student, ids, values, labels, missing_mass="support", divergence="tvd")
    student[3] = -math.inf
    for backend in BACKENDS + ["reference"]:
        with pytest.raises(ValueError, match="student_logits"):
            kdkernels.sparse_kd_loss(student, ids, values, labels, missing_mass="support", divergence="tvd",
                                     backend=backend)


def test_teacher_without_mass_gives_no_kd_term():
    # all support values -inf: renormalize / support have no teacher (KD 0, CE kept); residual puts
    # all of the teacher's mass in the rest bucket
    student, ids, values, labels = matrix_inputs(torch.float32)
    values = values.clone()
    values[0] = -math.inf
    for mode in ("renormalize", "support", "residual"):
        check(student, ids, values, labels, missing_mass=mode, ce_weight=0.5)


# ---- from hidden states ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,divergence", [("renormalize", "forward_kl"), ("residual", "reverse_kl"),
                                             ("residual", "jsd"), ("support", "tvd"), ("support", "skew_kl")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_matches_oracle(mode, divergence, reduction, dtype):
    gen = torch.Generator().manual_seed(3)
    n, h, v = 13, 16, 41
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.75).to(dtype)
    bias = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    ids, values = sparse_teacher(teacher, 5, pad_rows=(7,), short_rows=(2,))
    labels = make_labels((n,), v, ignored=[5])
    options = dict(missing_mass=mode, divergence=divergence, temperature=2.0, ce_weight=0.3, reduction=reduction)
    # powers of two: the per-row scaling of a low-precision gradient is then exact
    grad_output = 2.0 ** torch.arange(-2, n - 2).remainder(4).float() if reduction == "none" else None

    def fused(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = kdkernels.fused_linear_sparse_kd_loss(leaves[0], leaves[1], ids, values, labels,
                                                     student_bias=leaves[2], chunk_size=4, backend=backend,
                                                     **options)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        return loss.detach(), [t.grad for t in leaves]

    loss, grads = fused("cpu")
    eager_loss, eager_grads = fused("reference")
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    ref_loss, ref_grad_logits = oracle(logits, ids, values, labels, grad_output=grad_output, **options)
    ref_grads = torch.autograd.grad(logits, leaves, ref_grad_logits)
    assert_within_eager_error(loss, eager_loss, ref_loss, what="loss", floor_dtype=torch.float32)
    for name, g, e, r in zip(("hidden", "weight", "bias"), grads, eager_grads, ref_grads):
        assert g.dtype == dtype
        assert_within_eager_error(g, e, r, what=f"grad {name}")


def test_fused_linear_equals_sparse_kd_loss_on_materialised_logits():
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 10, 12, generator=gen), torch.randn(37, 12, generator=gen) * 0.8
    ids, values = sparse_teacher(torch.randn(2, 10, 37, generator=gen) * 2, 6)
    for options in (dict(missing_mass="residual", divergence="jsd"), dict(softcap=5.0, logit_scale=0.5)):
        fused = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values, chunk_size=3, **options)
        scale, cap = options.get("logit_scale", 1.0), options.get("softcap")
        logits = scale * hidden @ weight.t()
        logits = cap * torch.tanh(logits / cap) if cap else logits
        sparse_options = {k: v for k, v in options.items() if k not in ("softcap", "logit_scale")}
        torch.testing.assert_close(fused, kdkernels.sparse_kd_loss(logits, ids, values, **sparse_options))


# ---- entry points, no-grad, op registration ----------------------------------------------------

def test_module_and_no_grad():
    student, ids, values, labels = matrix_inputs(torch.float32)
    criterion = kdkernels.nn.SparseKDLoss(missing_mass="support", divergence="jsd", ce_weight=0.5)
    leaf = student.clone().requires_grad_(True)
    with torch.no_grad():
        no_grad = criterion(leaf, ids, values, labels)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, criterion(leaf, ids, values, labels).detach())
    assert "support" in repr(criterion)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_low_precision_rows_give_the_float32_result_rounded_once(dtype, temperature):
    # bf16 / fp16 rows are read in place and the gradient narrowed as it is stored: loss and
    # gradient must be the float32 kernel's on the same (widened) logits, each entry rounded once,
    # the label's entry too, inside the support (even rows) and outside it (odd rows). A 37-class
    # row is not a whole number of vectors.
    gen = torch.Generator().manual_seed(11)
    rows = 200
    student = (3 * torch.randn(rows, 37, generator=gen)).to(dtype)
    ids = torch.stack([torch.randperm(37, generator=gen)[:5] for _ in range(rows)])
    labels = torch.tensor([int(ids[r, r % 5]) if r % 2 == 0 else
                           next(c for c in range(37) if c not in ids[r].tolist()) for r in range(rows)])
    values = torch.log_softmax(torch.randn(rows, 5, generator=gen), -1)
    options = dict(ce_weight=0.4, temperature=temperature, reduction="none", backend="cpu")
    results = []
    for logits in (student, student.float()):
        leaf = logits.clone().requires_grad_(True)
        loss = kdkernels.sparse_kd_loss(leaf, ids, values, labels, **options)
        loss.backward(torch.full_like(loss, 0.3))
        results.append((loss.detach(), leaf.grad))
    (low_loss, low_grad), (loss, grad) = results
    assert low_grad.dtype == dtype
    assert torch.equal(low_loss, loss)
    assert torch.equal(low_grad, grad.to(dtype))


def test_inplace_op_equals_out_of_place():
    student, ids, values, labels = matrix_inputs(torch.float32)
    cfg_args = (0, 1.0, 1, 2, 2.0, 0.5, 1.0, 0.3, True, -100, PAD)
    valid_labels = kdkernels._sparse_checks.effective_labels(
        labels, kdkernels._sparse_checks.SparseTeacher(ids, values), kdkernels._sparse_checks.SparseConfig(
            kd=kdkernels._config.KDConfig()))
    scale = torch.tensor(0.25)
    row_loss, grad = torch.ops.kdkernels.sparse_kd_loss_fwd(student, ids, values, valid_labels, scale, *cfg_args,
                                                           True)
    buffer = student.clone()
    inplace_loss = torch.ops.kdkernels.sparse_kd_loss_fwd_inplace_(buffer, ids, values, valid_labels, scale,
                                                                   *cfg_args)
    assert torch.equal(row_loss, inplace_loss) and torch.equal(grad, buffer)


def test_opcheck():
    student, ids, values, labels = matrix_inputs(torch.float32)
    args = (student, ids, values, labels, torch.tensor(0.5), 0, 1.0, 1, 0, 2.0, 0.5, 1.0, 0.3, True, -100, PAD)
    torch.library.opcheck(torch.ops.kdkernels.sparse_kd_loss_fwd, (*args, True))
    torch.library.opcheck(torch.ops.kdkernels.sparse_kd_loss_fwd_inplace_, (student.clone(), *args[1:]))


# ---- bad input -----------------------------------------------------------------------------------

def _bad(**changes):
    student, ids, values, labels = matrix_inputs(torch.float32)
    inputs = dict(student_logits=student, teacher_ids=ids, teacher_values=values, labels=labels)
    inputs.update({k: v(inputs[k]) if callable(v) else v for k, v in changes.items() if k in inputs})
    options = {k: v for k, v in changes.items() if k not in inputs}
    return inputs, options


def _with(tensor, row, col, value):
    tensor = tensor.clone()
    tensor[row, col] = value
    return tensor


@pytest.mark.parametrize("changes,argument", [
    (dict(teacher_ids=lambda t: _with(t, 0, 1, int(t[0, 0]))), "teacher_ids"),          # duplicate
    (dict(teacher_ids=lambda t: _with(t, 0, 1, VOCAB)), "teacher_ids"),                 # out of range
    (dict(teacher_ids=lambda t: _with(t, 0, 1, -5)), "teacher_ids"),
    (dict(teacher_ids=lambda t: t.float()), "teacher_ids"),
    (dict(teacher_ids=lambda t: t[:, :-1]), "teacher_values"),
    (dict(teacher_ids=lambda t: t[:-1]), "teacher_ids"),
    (dict(teacher_values=lambda t: _with(t, 0, 0, math.nan)), "teacher_values"),
    (dict(teacher_values=lambda t: _with(t, 0, 0, math.inf)), "teacher_values"),
    (dict(teacher_values=lambda t: _with(t, 0, 0, 0.5)), "teacher_values"),              # log-prob > 0
    (dict(teacher_values=lambda t: _with(t.exp(), 0, 0, -0.1), teacher_kind="probs"), "teacher_values"),
    (dict(student_logits=lambda t: _with(t, 0, 0, math.nan)), "student_logits"),
    (dict(labels=lambda t: _with(t, 0, 0, VOCAB) if t.dim() == 2 else _with(t[:, None], 0, 0, VOCAB)[:, 0],
          ce_weight=0.5), "labels"),
    (dict(teacher_kind="counts"), "teacher_kind"),
    (dict(missing_mass="drop"), "missing_mass"),
    (dict(missing_mass="renormalize", divergence="jsd"), "renormalize"),
    (dict(missing_mass="residual", teacher_kind="logits"), "residual"),
    (dict(teacher_kind="probs", teacher_temperature=2.0), "teacher_temperature"),
    (dict(teacher_temperature=0.0), "teacher_temperature"),
    (dict(temperature=1e7), "temperature"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_names_the_argument(changes, argument):
    inputs, options = _bad(**changes)
    for backend in BACKENDS + ["reference"]:
        with pytest.raises((ValueError, TypeError), match=argument):
            kdkernels.sparse_kd_loss(**inputs, backend=backend, **options)


def test_fused_linear_bad_ids():
    ids = torch.tensor([[0, 40]])
    with pytest.raises(ValueError, match="teacher_ids"):
        kdkernels.fused_linear_sparse_kd_loss(torch.randn(1, 4), torch.randn(40, 4), ids, torch.zeros(1, 2) - 1)


def test_double_backward_reference_only():
    student, ids, values, labels = matrix_inputs(torch.float64)
    leaf = student.clone().requires_grad_(True)
    loss = kdkernels.sparse_kd_loss(leaf, ids, values.double(), missing_mass="residual", divergence="jsd")
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    (hessian_row,) = torch.autograd.grad(grad[0, 0], leaf)  # the reference is differentiable twice
    assert torch.isfinite(hessian_row).all() and hessian_row.abs().sum() > 0
    leaf32 = student.float().requires_grad_(True)
    loss = kdkernels.sparse_kd_loss(leaf32, ids, values, missing_mass="residual", backend="cpu")
    (grad,) = torch.autograd.grad(loss, leaf32, create_graph=True)
    with pytest.raises(RuntimeError, match="reference"):
        grad.sum().backward()


@pytest.mark.parametrize("mode", ["renormalize", "residual", "support"])
def test_benchmark_eager_formula_is_the_same_loss(mode):
    # benchmarks.sparse times its eager / torch.compile peers on this formula: it must be the loss
    from benchmarks.sparse import CE_WEIGHT, KD_WEIGHT, eager_sparse_loss, sparse_teacher as bench_teacher

    student = torch.randn(12, 300, dtype=torch.float64) * 3
    ids, values = bench_teacher(12, 300, 8)
    labels = torch.randint(0, 300, (12,))
    expected = kdkernels.sparse_kd_loss(student, ids, values.double(), labels, missing_mass=mode,
                                        kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT)
    torch.testing.assert_close(eager_sparse_loss(student, ids, values.double(), labels, mode).double(), expected)
