"""kd_loss on the compiled CPU backend (and "auto", which picks it) against the float64 reference:
options, reductions, shapes, strides, dtypes, ignored rows, masked vocabulary, incoming gradients,
no-grad behaviour, the op registration and the module / torch.compile wrappers.
Divergence-specific edge cases live in test_divergences.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import kdkernels
import kdkernels.backends.cpu as cpu_backend
from conftest import (DIVERGENCE_NAMES, STUDENT_NEG_INF_CASES, check_against_reference, check_masked_teacher_row,
                      loss_and_grad, make_labels, make_pair, student_neg_inf_case)

BACKENDS = ("cpu", "auto")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ODD_SHAPES = ((41, 1271), (3, 7, 33), (1, 1), (5, 17))


class _RowsSpy:
    """Records the compute_grad flag of every call to the CPU backend's rows()."""

    def __init__(self, monkeypatch):
        self.flags = []
        original = cpu_backend.rows

        def rows(*args):
            self.flags.append(args[-1])
            return original(*args)

        monkeypatch.setattr(cpu_backend, "rows", rows)


def test_auto_backend_is_the_compiled_cpu_kernel(monkeypatch):
    assert kdkernels.backend_info()["cpu_build"] is not None
    spy = _RowsSpy(monkeypatch)
    student, teacher = make_pair((4, 9))
    kdkernels.kd_loss(student.requires_grad_(), teacher)
    assert spy.flags == [True]


# --- values and gradients against the float64 reference -------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes_and_dtypes_match_reference(request, shape, dtype, backend):
    student, teacher = make_pair(shape, dtype)
    result = check_against_reference(student, teacher, backend=backend, temperature=2.0)
    assert result.loss.dtype == torch.float32


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0, 5.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_every_divergence_and_temperature_matches_reference(divergence, temperature, dtype):
    shape = (41, 1271) if dtype == torch.float32 else (13, 257)  # keeps the low-precision half cheap
    student, teacher = make_pair(shape, dtype, seed=3)
    check_against_reference(student, teacher, divergence=divergence, temperature=temperature, beta=0.3)


def _wide_range_rows(vocab: int, temperature: float, seed: int) -> torch.Tensor:
    """Rows whose logits / T cover the statistics pass's exp over its whole range: spread from 0 down
    past float's smallest normal exp (-87); rising from one 2048-entry block to the next by 40 (exps
    above the running max, up to e^40, kept) and by 100 (a block beyond e^64, taken again at its own
    max); falling block by block."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.arange(vocab) // 2048
    noise = torch.randn(vocab, generator=gen, dtype=torch.float64)
    rows = [
        -100.0 * torch.rand(vocab, generator=gen, dtype=torch.float64),
        40.0 * blocks + noise,
        100.0 * blocks + noise,
        -30.0 * blocks + 3 * noise,
    ]
    return (torch.stack(rows) * temperature).float()


@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "jsd"))
@pytest.mark.parametrize("temperature", (0.7, 3.0, 20.0))
def test_exps_over_their_whole_range_and_any_temperature_match_reference(divergence, temperature):
    # exp(d / T) with 1/T folded into its argument reduction: temperatures whose 1/T is not a power
    # of two, every sixteenth of its table, exps that flush to 0, and exps above their shift
    student = _wide_range_rows(6000, temperature, seed=11)
    teacher = _wide_range_rows(6000, temperature, seed=12)
    check_against_reference(student, teacher, divergence=divergence, temperature=temperature, beta=0.3)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("kd_weight,ce_weight", ((1.0, 0.0), (0.5, 0.5), (0.1, 0.9), (0.0, 1.0), (2.0, 0.3)))
@pytest.mark.parametrize("scale_by_t2", (True, False))
def test_kd_and_ce_blend_matches_reference(divergence, kd_weight, ce_weight, scale_by_t2):
    student, teacher = make_pair((13, 301), seed=5)
    labels = make_labels((13,), 301, ignored=[2, 9])
    check_against_reference(student, teacher, labels, divergence=divergence, temperature=2.0,
                            kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2)


def test_ce_term_uses_the_student_at_temperature_one():
    student, teacher = make_pair((6, 50), seed=2)
    labels = make_labels((6,), 50)
    T = 3.0
    loss = kdkernels.kd_loss(student, teacher, labels, temperature=T, kd_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, labels), rtol=1e-6, atol=1e-6)
    blended = kdkernels.kd_loss(student, teacher, labels, temperature=T, kd_weight=0.7, ce_weight=0.3)
    kd_only = kdkernels.kd_loss(student, teacher, labels, temperature=T)
    expected = 0.3 * F.cross_entropy(student, labels) + 0.7 * kd_only
    torch.testing.assert_close(blended, expected, rtol=1e-6, atol=1e-6)


def test_scale_by_t2_multiplies_the_divergence_by_t_squared():
    student, teacher = make_pair((8, 40), seed=4)
    scaled = kdkernels.kd_loss(student, teacher, temperature=3.0)
    unscaled = kdkernels.kd_loss(student, teacher, temperature=3.0, scale_by_t2=False)
    torch.testing.assert_close(scaled, 9.0 * unscaled, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("shape", ((5, 17), (3, 7, 33)), ids=str)
def test_every_reduction_matches_reference(shape, reduction, divergence, backend):
    student, teacher = make_pair(shape, seed=6)
    labels = make_labels(shape[:-1], shape[-1])
    labels.view(-1)[::3] = -100
    grad_output = torch.randn(shape[:-1]) if reduction == "none" else None
    result = check_against_reference(student, teacher, labels, backend=backend, grad_output=grad_output,
                                     divergence=divergence, reduction=reduction, temperature=2.0,
                                     ce_weight=0.25)
    assert result.loss.shape == (labels.shape if reduction == "none" else ())


@pytest.mark.parametrize("shape", ((7, 19), (2, 5, 19)), ids=str)
def test_reductions_are_defined_from_the_row_losses(shape):
    student, teacher = make_pair(shape, seed=8)
    labels = make_labels(shape[:-1], shape[-1])
    labels.view(-1)[[0, 3]] = -100
    kwargs = dict(temperature=2.0, ce_weight=0.5)
    rows = kdkernels.kd_loss(student, teacher, labels, reduction="none", **kwargs)
    assert rows.shape == labels.shape
    assert (rows.view(-1)[[0, 3]] == 0).all()
    valid = int((labels != -100).sum())
    by_name = {r: kdkernels.kd_loss(student, teacher, labels, reduction=r, **kwargs)
               for r in ("sum", "mean", "batchmean")}
    torch.testing.assert_close(by_name["sum"], rows.sum())
    torch.testing.assert_close(by_name["mean"], rows.sum() / valid)  # over non-ignored rows
    torch.testing.assert_close(by_name["batchmean"], rows.sum() / shape[0])  # as F.kl_div: size(0)


def test_reduction_none_without_labels_is_shaped_like_the_batch():
    student, teacher = make_pair((2, 3, 11))
    assert kdkernels.kd_loss(student, teacher, reduction="none").shape == (2, 3)


@pytest.mark.parametrize("T", (0.5, 1.0, 2.0, 5.0))
@pytest.mark.parametrize("shape", ((41, 1271), (3, 7, 33)), ids=str)
def test_readme_drop_in_identity_with_kl_div_batchmean(shape, T):
    student, teacher = make_pair(shape, seed=9)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    idiom = F.kl_div(F.log_softmax(s1 / T, -1), F.softmax(teacher / T, -1), reduction="batchmean") * T * T
    ours = kdkernels.kd_loss(s2, teacher, temperature=T, reduction="batchmean")
    torch.testing.assert_close(ours, idiom, rtol=2e-5, atol=1e-6)
    idiom.backward()
    ours.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-7)


# --- strides and layouts ---------------------------------------------------------------------------

def _non_contiguous_cases():
    base_s, base_t = make_pair((33, 41), seed=10)
    yield "transposed", base_s.t(), base_t.t()
    wide_s, wide_t = make_pair((9, 80), seed=11)
    yield "vocab_slice", wide_s[:, 3:70], wide_t[:, 3:70]
    yield "row_stride", wide_s[::2], wide_t[::2]
    cube_s, cube_t = make_pair((4, 6, 30), seed=12)
    yield "bsv_transposed", cube_s.transpose(0, 1), cube_t.transpose(0, 1)
    yield "bsv_sliced", cube_s[:, 1:5, 2:29], cube_t[:, :4, 1:28]
    yield "expanded_teacher", wide_s[:4, :20], wide_t[:1, :20].expand(4, 20)


@pytest.mark.parametrize("case", list(_non_contiguous_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_inputs_match_reference(case, dtype):
    _, student, teacher = case
    assert not (student.is_contiguous() and teacher.is_contiguous())
    labels = make_labels(student.shape[:-1], student.shape[-1])
    check_against_reference(student.to(dtype), teacher.to(dtype), labels, temperature=2.0,
                            ce_weight=0.5, divergence="jsd")
    # the strided tensors themselves (not copies made by .to) reach the kernel
    check_against_reference(student, teacher, labels, temperature=2.0, ce_weight=0.5)


@pytest.mark.parametrize("student_dtype,teacher_dtype", (
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)), ids=str)
@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "tvd"))
def test_mixed_student_and_teacher_dtypes(student_dtype, teacher_dtype, divergence):
    student, teacher = make_pair((17, 257), student_dtype, teacher_dtype=teacher_dtype, seed=13)
    labels = make_labels((17,), 257)
    check_against_reference(student, teacher, labels, divergence=divergence, temperature=2.0,
                            ce_weight=0.5)


# --- masked vocabulary, ignored rows ---------------------------------------------------------------

def _mask_columns(student, teacher, columns):
    student, teacher = student.clone(), teacher.clone()
    student[..., columns] = -math.inf
    teacher[..., columns] = -math.inf
    return student, teacher


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ((11, 257), (2, 3, 40)), ids=str)
def test_masked_vocab_columns_match_reference(shape, dtype, divergence):
    student, teacher = make_pair(shape, dtype, seed=14)
    vocab = shape[-1]
    # first, last, a run across a SIMD-width boundary, and scattered columns
    columns = sorted({0, vocab - 1, *range(13, 21), *range(5, vocab, 7)})
    student, teacher = _mask_columns(student, teacher, columns)
    live = torch.tensor([c for c in range(vocab) if c not in columns])
    labels = live[make_labels(shape[:-1], len(live))]  # CE targets on live columns only
    result = check_against_reference(student, teacher, labels, divergence=divergence, temperature=2.0,
                                     ce_weight=0.3)
    assert (result.grad[..., columns] == 0).all()


@pytest.mark.parametrize("ignored", (
    "first", "last", "middle", "every_other", "all_but_one", "leading_block"))
@pytest.mark.parametrize("ignore_index", (-100, -1, 3))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_ignore_index_placements(ignored, ignore_index, reduction):
    rows, vocab = 12, 37
    student, teacher = make_pair((rows, vocab), seed=15)
    where = {"first": [0], "last": [rows - 1], "middle": [5], "every_other": list(range(0, rows, 2)),
             "all_but_one": list(range(1, rows)), "leading_block": list(range(4))}[ignored]
    labels = make_labels((rows,), vocab, seed=1)
    labels[labels == ignore_index] = 4  # only the chosen rows carry the ignore value
    labels[where] = ignore_index
    grad_output = torch.randn(rows) if reduction == "none" else None
    result = check_against_reference(student, teacher, labels, grad_output=grad_output,
                                     ignore_index=ignore_index, reduction=reduction, temperature=2.0,
                                     ce_weight=0.5, divergence="reverse_kl")
    assert (result.grad[where] == 0).all()
    if reduction == "none":
        assert (result.loss[where] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_all_ignored_batch_gives_zero_loss_and_gradient(dtype, reduction, divergence, backend):
    student, teacher = make_pair((2, 3, 19), dtype, seed=16)
    labels = torch.full((2, 3), -100)
    result = loss_and_grad(student, teacher, labels, backend=backend, divergence=divergence,
                           reduction=reduction, ce_weight=0.5, temperature=2.0)
    assert not torch.isnan(result.loss).any()
    assert (result.loss == 0).all()
    assert (result.grad == 0).all() and result.grad.dtype == dtype


# --- rows the teacher or the student leaves without a distribution -------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_teacher_row_entirely_masked_keeps_its_ce_term(dtype, temperature, divergence):
    # No teacher distribution: the row's KD term is 0, its CE term (and gradient) stays.
    check_masked_teacher_row("cpu", divergence=divergence, temperature=temperature, dtype=dtype)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_fully_masked_row_without_ce_gives_zero(divergence):
    # -inf on both sides is masking, even for a whole row: loss 0, gradient 0.
    student, teacher = make_pair((3, 37), seed=41)
    student[1] = -math.inf
    teacher[1] = -math.inf
    result = loss_and_grad(student, teacher, backend="cpu", reduction="none", divergence=divergence)
    assert result.loss[1] == 0 and (result.grad[1] == 0).all()
    assert torch.isfinite(result.loss).all() and torch.isfinite(result.grad).all()


@pytest.mark.parametrize("case", STUDENT_NEG_INF_CASES)
@pytest.mark.parametrize("grad", (True, False), ids=("grad", "no_grad"))
def test_student_neg_inf_that_makes_the_loss_infinite_raises(case, grad):
    student, teacher, labels, options = student_neg_inf_case(case)
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.kd_loss(student.requires_grad_(grad), teacher, labels, backend="cpu", temperature=2.0, **options)


@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"))
def test_student_neg_inf_that_leaves_the_loss_finite_is_accepted(divergence):
    # Only forward KL (and CE) need the student finite where the teacher has mass.
    student, teacher = make_pair((3, 37), seed=43)
    student[1, 5] = -math.inf
    check_against_reference(student, teacher, divergence=divergence, temperature=2.0, beta=0.3)


@pytest.mark.parametrize("divergence", ("jsd", "skew_kl", "skew_reverse_kl"))
@pytest.mark.parametrize("beta", (0.999999, 1e-6))
def test_mixture_weights_near_the_ends_keep_full_precision(divergence, beta):
    # 1 - beta is formed in double from the op's double beta: from a beta rounded to float32 first,
    # the small weight would be off by up to 1e-2 relative at beta = 0.999999.
    student, teacher = make_pair((4, 53), seed=44)
    check_against_reference(student, teacher, divergence=divergence, beta=beta, temperature=2.0)


# --- incoming gradient != 1 ------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_scaled_loss_backward(dtype, reduction, divergence):
    student, teacher = make_pair((3, 7, 33), dtype, seed=17)
    labels = make_labels((3, 7), 33, ignored=(0, 2))
    check_against_reference(student, teacher, labels, grad_output=torch.tensor(3.7),
                            divergence=divergence, reduction=reduction, temperature=2.0, ce_weight=0.2)
    # the same through a graph that multiplies the loss
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    (kdkernels.kd_loss(s1, teacher, labels, divergence=divergence, reduction=reduction) * 3.7).backward()
    kdkernels.kd_loss(s2, teacher, labels, divergence=divergence, reduction=reduction).backward(
        torch.tensor(3.7))
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("shape", ((41, 1271), (3, 7, 33)), ids=str)
def test_reduction_none_with_random_grad_output(shape, divergence):
    student, teacher = make_pair(shape, seed=18)
    labels = make_labels(shape[:-1], shape[-1])
    labels.view(-1)[1::5] = -100
    grad_output = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3))
    check_against_reference(student, teacher, labels, grad_output=grad_output, reduction="none",
                            divergence=divergence, temperature=2.0, ce_weight=0.4)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision_gradient_under_a_per_row_grad_output_is_rounded_once(dtype):
    # Each row's gradient times its incoming gradient, rounded to the student's dtype once: the
    # float32 result of the same logits, rounded. A saved low-precision gradient scaled in
    # backward would be rounded twice (logits near 100 leave the low bits to the rounding).
    gen = torch.Generator().manual_seed(5)
    student = (100 + 0.05 * torch.randn(64, 33, generator=gen, dtype=torch.float64)).to(dtype)
    teacher = (100 + 0.05 * torch.randn(64, 33, generator=gen, dtype=torch.float64)).float()
    grad_output = 3 * torch.rand(64, generator=gen)
    low = loss_and_grad(student, teacher, grad_output=grad_output, reduction="none", backend="cpu")
    high = loss_and_grad(student.float(), teacher, grad_output=grad_output, reduction="none", backend="cpu")
    assert low.grad.dtype == dtype
    assert torch.equal(low.grad, high.grad.to(dtype))
    check_against_reference(student, teacher, grad_output=grad_output, reduction="none")


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_second_backward_is_exact(reduction):
    # A second backward through the same graph (retain_graph) gives the right gradient: the first
    # one did not scale the saved gradient in place.
    student, teacher = make_pair((6, 30), seed=19)
    student.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, temperature=2.0, reduction=reduction)
    grad_output = torch.full_like(loss, 3.7)
    loss.backward(grad_output, retain_graph=True)
    first = student.grad.clone()
    loss.backward(grad_output)
    torch.testing.assert_close(student.grad, 2 * first)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_unit_then_scaled_backward_through_a_retained_graph_adds_up(backend):
    # backward() hands out the saved gradient itself (grad_output 1); a later scaled backward must
    # not write into it: x.grad = g + 3 g.
    student, teacher = make_pair((12, 257), seed=40)
    student.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, temperature=2.0, backend=backend)
    (expected,) = torch.autograd.grad(loss, student, retain_graph=True)
    expected = expected.clone()
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(3.0), retain_graph=True)
    torch.testing.assert_close(student.grad, 4 * expected)
    (again,) = torch.autograd.grad(loss, student)  # the saved gradient itself is intact
    torch.testing.assert_close(again, expected)


@pytest.mark.parametrize("later", ("scaled_backward", "unit_backward", "new_call"))
def test_returned_gradient_is_not_changed_by_later_work(later):
    student, teacher = make_pair((12, 257), seed=41)
    student.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
    kept = grad.clone()
    if later == "scaled_backward":
        (0.5 * loss).backward()
    elif later == "unit_backward":
        loss.backward()
    else:  # the same shape again: the CPU buffer cache must not hand out memory still in use
        kdkernels.kd_loss(student, teacher * 0.5, temperature=2.0).backward()
    assert torch.equal(grad, kept)


def test_double_backward_raises_on_the_fused_kernel_and_works_on_the_reference():
    student, teacher = make_pair((4, 11), torch.float64, seed=42)
    options = dict(temperature=2.0, divergence="jsd", beta=0.3)
    fused = student.float().requires_grad_(True)
    loss = kdkernels.kd_loss(fused, teacher.float(), backend="cpu", **options)
    (grad,) = torch.autograd.grad(loss, fused, create_graph=True)
    assert grad.requires_grad  # not a silently first-order gradient
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(loss + grad.pow(2).sum(), fused)  # a gradient penalty, asked of the input only
    reference = student.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda s: kdkernels.kd_loss(s, teacher, backend="reference", **options),
                                        (reference,))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_reference_keeps_the_ce_of_a_row_without_teacher(divergence):
    # A teacher row entirely -inf has no distribution: its KD term is 0, its CE term stays, and it
    # counts in the mean.
    student, teacher = make_pair((3, 9), torch.float64, seed=43)
    teacher[1] = -math.inf
    labels = torch.tensor([2, 5, 7])
    student.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, labels, divergence=divergence, ce_weight=0.5, reduction="none",
                             backend="reference")
    ce = F.cross_entropy(student.detach()[1:2], labels[1:2])
    torch.testing.assert_close(loss[1], 0.5 * ce)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad[1], 0.5 * (student.detach()[1].softmax(-1) - F.one_hot(labels[1], 9)))


@pytest.mark.parametrize("case", ("whole_row", "teacher_mass", "label"))
def test_reference_refuses_a_student_that_makes_the_loss_infinite(case):
    student, teacher = make_pair((3, 9), torch.float64, seed=44)
    labels = torch.tensor([2, 5, 7])
    options = dict(divergence="forward_kl")
    if case == "whole_row":
        student[1] = -math.inf
        options = dict(divergence="tvd")
    elif case == "teacher_mass":
        student[1, 4] = -math.inf
    else:
        student[1, 5] = -math.inf
        options = dict(divergence="reverse_kl", ce_weight=0.5)
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.kd_loss(student, teacher, labels, backend="reference", **options)
    labels[1] = -100  # an ignored row is never looked at
    loss = kdkernels.kd_loss(student.requires_grad_(True), teacher, labels, backend="reference", **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and not student.grad[1].any()


def test_reference_accepts_entries_masked_on_both_sides():
    student, teacher = make_pair((3, 9), torch.float64, seed=45)
    student[:, 3] = -math.inf
    teacher[:, 3] = -math.inf
    loss = kdkernels.kd_loss(student.requires_grad_(True), teacher, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_loss_used_twice_in_the_graph_gets_both_gradients():
    student, teacher = make_pair((6, 30), seed=19)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    loss = kdkernels.kd_loss(s1, teacher, temperature=2.0)
    (loss * 2.0 + loss * 0.5).backward()
    kdkernels.kd_loss(s2, teacher, temperature=2.0, backend="reference").mul(2.5).backward()
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=1e-5, atol=1e-7)


# --- extreme but finite logits ---------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("magnitude", (30.0, 1e4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_peaked_rows_where_both_distributions_underflow(dtype, magnitude, divergence):
    student, teacher = make_pair((9, 301), dtype, seed=20, scale=magnitude)
    # row 0: identical peaks; row 1: all mass on different columns; row 2: near-uniform teacher
    student[0], teacher[0] = teacher[0], teacher[0]
    student[1] = -magnitude
    teacher[1] = -magnitude
    student[1, 3], teacher[1, 250] = magnitude, magnitude
    teacher[2] = teacher[2] / magnitude
    labels = make_labels((9,), 301)
    check_against_reference(student, teacher, labels, divergence=divergence, temperature=1.0,
                            ce_weight=0.5)




@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("offset", (20.0, -1000.0, 1000.0))
def test_logits_with_a_large_common_offset(request, offset, divergence):
    student, teacher = make_pair((41, 1271), seed=3)
    check_against_reference(student + offset, teacher + offset, divergence=divergence, beta=0.3,
                            temperature=2.0)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 5.0))
@pytest.mark.parametrize("magnitude", (1e4, 1e30))
def test_no_nan_or_inf_for_finite_input(magnitude, temperature, divergence):
    if magnitude * 2 / temperature > torch.finfo(torch.float32).max:
        pytest.skip("z / T itself overflows float32")
    student, teacher = make_pair((7, 65), seed=21, scale=magnitude)
    labels = make_labels((7,), 65)
    result = loss_and_grad(student, teacher, labels, divergence=divergence, temperature=temperature,
                           ce_weight=0.5, reduction="none")
    assert torch.isfinite(result.loss).all()
    assert torch.isfinite(result.grad).all()


# --- gradient work: only when wanted; never for the teacher ----------------------------------------

def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((event.cpu_memory_usage for event in prof.events()), default=0)


@pytest.mark.parametrize("divergence", ("forward_kl", "jsd"))
def test_no_grad_computes_and_allocates_no_gradient(monkeypatch, divergence):
    student, teacher = make_pair((64, 2048), seed=22)
    student.requires_grad_(True)
    spy = _RowsSpy(monkeypatch)
    with torch.no_grad():
        loss = kdkernels.kd_loss(student, teacher, temperature=2.0, divergence=divergence)
    assert loss.grad_fn is None and not loss.requires_grad
    assert spy.flags == [False]

    def no_grad_call():
        with torch.no_grad():
            kdkernels.kd_loss(student, teacher, temperature=2.0, divergence=divergence)

    def grad_call():
        kdkernels.kd_loss(student, teacher, temperature=2.0, divergence=divergence)

    gradient_bytes = student.numel() * student.element_size()
    assert _largest_allocation(grad_call) >= gradient_bytes  # the probe sees the gradient buffer...
    assert _largest_allocation(no_grad_call) < gradient_bytes // 8  # ...and nothing like it here


def test_student_without_requires_grad_computes_no_gradient(monkeypatch):
    student, teacher = make_pair((16, 100), seed=23)
    spy = _RowsSpy(monkeypatch)
    loss = kdkernels.kd_loss(student, teacher, temperature=2.0)
    assert loss.grad_fn is None
    assert spy.flags == [False]
    expected = kdkernels.kd_loss(student.double(), teacher.double(), temperature=2.0, backend="reference")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    student, teacher = make_pair((8, 50), seed=24)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, temperature=2.0, backend=backend)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_teacher_alone_requiring_grad_builds_no_graph():
    student, teacher = make_pair((8, 50), seed=25)
    teacher.requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher)
    assert loss.grad_fn is None


# --- op registration, module and compile wrappers --------------------------------------------------

def _op_args(dtype, labels, compute_grad, divergence_id=0):
    student, teacher = make_pair((5, 37), dtype, seed=26)
    grad_scale = torch.tensor(0.2)
    return (student, teacher, labels, grad_scale, divergence_id, 2.0, 0.5, 1.0,
            0.0 if labels is None else 0.5, True, -100, compute_grad)


@pytest.mark.parametrize("args", [
    _op_args(torch.float32, None, True),
    _op_args(torch.float32, torch.tensor([0, 3, -100, 36, 2]), True, divergence_id=2),
    _op_args(torch.float32, torch.tensor([1, 2, 3, 4, 5]), False, divergence_id=1),
    _op_args(torch.bfloat16, torch.tensor([1, -100, 3, 4, 5]), True, divergence_id=5),
    _op_args(torch.bfloat16, None, False, divergence_id=3),
], ids=["fp32_grad", "fp32_labels_jsd", "fp32_nograd_rkl", "bf16_grad_tvd", "bf16_nograd_skew"])
def test_opcheck_kd_loss_fwd(args):
    torch.library.opcheck(torch.ops.kdkernels.kd_loss_fwd, args)


@pytest.mark.parametrize("args", [
    _op_args(torch.float32, None, True),
    _op_args(torch.float32, torch.tensor([0, 3, -100, 36, 2]), True, divergence_id=2),
    _op_args(torch.bfloat16, torch.tensor([1, -100, 3, 4, 5]), True, divergence_id=5),
], ids=["fp32", "fp32_labels_jsd", "bf16_labels_tvd"])
def test_opcheck_kd_loss_fwd_inplace(args):
    torch.library.opcheck(torch.ops.kdkernels.kd_loss_fwd_inplace_, args[:-1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("divergence_id", range(6))
def test_inplace_op_writes_the_same_gradient_over_the_student_logits(divergence_id, dtype):
    # labels with the CE blend: the label's logit must be read before the row is overwritten
    args = _op_args(dtype, torch.tensor([0, 3, -100, 36, 2]), True, divergence_id=divergence_id)
    expected_loss, expected_grad = torch.ops.kdkernels.kd_loss_fwd(*args)
    student = args[0].clone()
    row_loss = torch.ops.kdkernels.kd_loss_fwd_inplace_(student, *args[1:-1])
    torch.testing.assert_close(row_loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(student, expected_grad, rtol=0, atol=0)


def test_inplace_op_needs_contiguous_student_logits():
    args = _op_args(torch.float32, None, True)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.kdkernels.kd_loss_fwd_inplace_(args[0].t().contiguous().t(), *args[1:-1])


def test_op_outputs_shapes_and_dtypes():
    args = _op_args(torch.bfloat16, None, True)
    row_loss, grad = torch.ops.kdkernels.kd_loss_fwd(*args)
    assert row_loss.shape == (5,) and row_loss.dtype == torch.float32
    assert grad.shape == (5, 37) and grad.dtype == torch.bfloat16
    _, no_grad = torch.ops.kdkernels.kd_loss_fwd(*_op_args(torch.float32, None, False))
    assert no_grad.numel() == 0


@pytest.mark.parametrize("options", [
    dict(),
    dict(temperature=2.0, divergence="jsd", beta=0.2, reduction="sum"),
    dict(temperature=4.0, kd_weight=0.5, ce_weight=0.5, reduction="none", divergence="tvd"),
], ids=["default", "jsd_sum", "ce_blend_none"])
def test_module_equals_functional(options):
    student, teacher = make_pair((2, 5, 21), seed=27)
    labels = make_labels((2, 5), 21, ignored=(1, 2))
    criterion = kdkernels.nn.KDLoss(**options)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    out_module = criterion(s1, teacher, labels)
    out_function = kdkernels.kd_loss(s2, teacher, labels, **options)
    torch.testing.assert_close(out_module, out_function, rtol=0, atol=0)
    out_module.sum().backward()
    out_function.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.nn.KDLoss(temperature=0.0)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_torch_compile_of_a_function_calling_kd_loss(reduction):
    # fullgraph: the whole road to the kernel traces, with no graph break. aot_eager traces the op
    # through its fake implementation and AOT autograd without paying for Inductor's C++ code
    # generation (tens of seconds on two cores).
    torch._dynamo.reset()

    def training_loss(student_logits, teacher_logits, labels):
        loss = kdkernels.kd_loss(student_logits, teacher_logits, labels, temperature=2.0, ce_weight=0.5,
                                 reduction=reduction)
        return loss.sum() * 2.0

    compiled = torch.compile(training_loss, fullgraph=True, backend="aot_eager")
    student, teacher = make_pair((6, 45), seed=28)
    labels = make_labels((6,), 45, ignored=[4])
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    out_compiled = compiled(s1, teacher, labels)
    out_eager = training_loss(s2, teacher, labels)
    torch.testing.assert_close(out_compiled, out_eager)
    out_compiled.backward()
    out_eager.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_bad_input_under_torch_compile_still_raises_the_clear_error(backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: kdkernels.kd_loss(s, t, backend=backend), fullgraph=True,
                             backend="aot_eager")
    student, teacher = make_pair((4, 13), seed=46)
    teacher[2, 5] = math.nan
    with pytest.raises(ValueError, match="teacher_logits"):
        compiled(student.requires_grad_(True), teacher)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
def test_empty_batch_gives_zero_loss_and_gradient(backend, reduction):
    student = torch.zeros(2, 0, 7, requires_grad=True)
    loss = kdkernels.kd_loss(student, torch.zeros(2, 0, 7), torch.zeros(2, 0, dtype=torch.long), ce_weight=0.5,
                             reduction=reduction, backend=backend)
    assert loss.shape == ((2, 0) if reduction == "none" else ()) and float(loss.detach().sum()) == 0.0
    loss.sum().backward()
    assert student.grad.shape == (2, 0, 7)
