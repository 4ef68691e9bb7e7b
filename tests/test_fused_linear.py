"""fused_linear_kd_loss (chunked lm_head + KD loss) against a float64 materialised-logits oracle:
the logits built in full by plain PyTorch, then kd_loss(..., backend="reference"). Loss and the
gradients of the student's hidden states, lm_head weight and bias, for chunkings (incl. a ragged
last chunk), hidden and vocabulary sizes that differ between student and teacher, biases, ignored
rows, the CE blend, divergences, reductions, dtypes, soft-capping, ready teacher logits, frozen
parameters; plus bad input, no-grad behaviour and the bounded chunk memory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import kdkernels
import kdkernels.backends.cpu as cpu_backend
from kdkernels.ops import fused_linear
from conftest import DIVERGENCE_NAMES, assert_within_eager_error, make_labels
from triton_interpreter import INTERPRETING, run_interpreter_cases

PARAMS = ("hidden", "weight", "bias")
LOGIT_STD = 3.0  # spread of the random logits, like a trained lm_head's


def _randn(shape, seed, std=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


@dataclass
class Case:
    """The inputs of one call, in the dtype under test; `requires` says which student tensors
    want a gradient."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    student_bias: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None
    requires: Dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PARAMS, True))
    options: Dict[str, object] = field(default_factory=dict)

    def leaves(self, dtype=None):
        """Fresh copies (cast to `dtype` if given): student (hidden, weight, bias) requiring grad as
        asked, and the teacher's tensors."""
        def cast(t):
            return None if t is None else t.detach().to(dtype or t.dtype)

        student = {}
        for name, value in zip(PARAMS, (self.student_hidden, self.student_weight, self.student_bias)):
            student[name] = cast(value)
            if value is not None and self.requires[name]:
                student[name].requires_grad_(True)
        teacher = {"teacher_hidden": cast(self.teacher_hidden), "teacher_weight": cast(self.teacher_weight),
                   "teacher_bias": cast(self.teacher_bias), "teacher_logits": cast(self.teacher_logits)}
        return student, teacher


def make_case(batch=(29,), hidden=(24, 40), vocab=(67, 67), dtype=torch.float32, *, seed=0, bias=False,
              teacher_as_logits=False, labels=False, ignored=None, **options) -> Case:
    """Random student/teacher lm_heads with logits of std ~LOGIT_STD; the teacher's hidden states
    are correlated with the student's through a fixed projection, as in distillation."""
    (h_s, h_t), (v_s, v_t) = hidden, vocab
    student_hidden = _randn((*batch, h_s), seed)
    teacher_hidden = (0.6 * student_hidden @ _randn((h_s, h_t), seed + 1, 1 / math.sqrt(h_s))
                      + 0.8 * _randn((*batch, h_t), seed + 2))
    case = Case(
        student_hidden=student_hidden.to(dtype),
        student_weight=_randn((v_s, h_s), seed + 3, LOGIT_STD / math.sqrt(h_s)).to(dtype),
        teacher_hidden=teacher_hidden.to(dtype),
        teacher_weight=_randn((v_t, h_t), seed + 4, LOGIT_STD / math.sqrt(h_t)).to(dtype),
        options=options,
    )
    if bias:
        case.student_bias = _randn((v_s,), seed + 5).to(dtype)
        case.teacher_bias = _randn((v_t,), seed + 6).to(dtype)
    if labels or ignored is not None:
        case.labels = make_labels(batch, min(v_s, v_t), seed=seed, ignored=ignored)  # real tokens: in both
    if teacher_as_logits:
        logits = _materialised_logits(case.teacher_hidden, case.teacher_weight, case.teacher_bias, v_t, options)
        case.teacher_logits, case.teacher_hidden, case.teacher_weight, case.teacher_bias = logits, None, None, None
    return case


def _materialised_logits(hidden, weight, bias, vocab, options):
    """softcap(logit_scale * (hidden @ weight^T + bias)), padded with -inf columns to `vocab`.
    logit_scale is applied inside the GEMM (addmm's alpha and beta), one rounding as in nn.Linear."""
    scale = options.get("logit_scale", 1.0)
    if bias is None:
        bias = hidden.new_zeros(weight.shape[0])
    logits = torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]), weight.t(), beta=scale, alpha=scale)
    logits = logits.reshape(*hidden.shape[:-1], weight.shape[0])
    cap = options.get("softcap")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    if weight.shape[0] < vocab:
        pad = logits.new_full((*logits.shape[:-1], vocab - weight.shape[0]), -math.inf)
        logits = torch.cat([logits, pad], dim=-1)
    return logits


@dataclass
class Result:
    loss: torch.Tensor
    grads: Dict[str, Optional[torch.Tensor]]


def _backward(loss, student, grad_output) -> Result:
    if any(t is not None and t.requires_grad for t in student.values()):
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    grads = {name: None if t is None else t.grad for name, t in student.items()}
    return Result(loss.detach(), grads)


def run_fused(case: Case, grad_output=None, **overrides) -> Result:
    student, teacher = case.leaves()
    options = {**case.options, **overrides}
    loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], labels=case.labels,
                                          student_bias=student["bias"], **teacher, **options)
    return _backward(loss, student, grad_output)


def run_materialised(case: Case, dtype=None, grad_output=None) -> Result:
    """The full logits by plain PyTorch, then kd_loss on the reference backend; in `dtype`
    (float64: the oracle) or in the case's own dtype (eager PyTorch)."""
    student, teacher = case.leaves(dtype)
    options = dict(case.options)
    lm_options = {key: options.pop(key) for key in ("softcap", "logit_scale", "chunk_size") if key in options}
    options.pop("backend", None)
    if teacher["teacher_logits"] is not None:
        teacher_logits = teacher["teacher_logits"]
    else:
        teacher_logits = _materialised_logits(teacher["teacher_hidden"], teacher["teacher_weight"],
                                              teacher["teacher_bias"], 0, lm_options)
    vocab = max(student["weight"].shape[0], teacher_logits.shape[-1])
    if teacher_logits.shape[-1] < vocab:
        pad = teacher_logits.new_full((*teacher_logits.shape[:-1], vocab - teacher_logits.shape[-1]), -math.inf)
        teacher_logits = torch.cat([teacher_logits, pad], dim=-1)
    student_logits = _materialised_logits(student["hidden"], student["weight"], student["bias"], vocab, lm_options)
    loss = kdkernels.kd_loss(student_logits, teacher_logits, case.labels, backend="reference", **options)
    if grad_output is not None and dtype is not None:
        grad_output = grad_output.to(dtype)
    return _backward(loss, student, grad_output)


def check_against_reference(case: Case, grad_output=None) -> Result:
    """Fused vs the float64 oracle, within 2x eager PyTorch's error at the case's dtype."""
    fused = run_fused(case, grad_output)
    eager = run_materialised(case, grad_output=grad_output)
    oracle = run_materialised(case, torch.float64, grad_output)
    assert fused.loss.dtype == torch.float32
    assert_within_eager_error(fused.loss, eager.loss.float(), oracle.loss, what="loss", floor_dtype=torch.float32)
    for name in PARAMS:
        expected = oracle.grads[name]
        if expected is None:
            assert fused.grads[name] is None, f"{name} got a gradient it did not ask for"
            continue
        got = fused.grads[name]
        assert got is not None, f"{name} gradient missing"
        assert got.dtype == case.student_hidden.dtype, f"{name} gradient dtype {got.dtype}"
        assert_within_eager_error(got, eager.grads[name], expected, what=f"{name} gradient")
    return fused


DTYPES = (torch.float32, torch.bfloat16)


# --- against the float64 materialised-logits oracle ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", (1, 4, 7, 28, 29, 1000, None))
def test_chunk_counts_including_a_ragged_last_chunk(chunk_size, dtype):
    # 29 rows: 29 chunks of 1, 7 + ragged 1, 4 + ragged 1, 1 + ragged 28, exactly 1, more than N, default
    check_against_reference(make_case(dtype=dtype, bias=True, labels=True, temperature=2.0,
                                      chunk_size=chunk_size))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", ((24, 40), (40, 24), (16, 16)), ids=str)
def test_student_and_teacher_hidden_sizes_may_differ(hidden, dtype):
    check_against_reference(make_case(hidden=hidden, dtype=dtype, chunk_size=8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_longer_student_vocab_sees_the_teachers_missing_columns_as_masked(dtype):
    check_against_reference(make_case(vocab=(80, 67), dtype=dtype, bias=True, chunk_size=8, labels=True,
                                      ce_weight=0.5, kd_weight=0.5))


@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd", "tvd"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_longer_teacher_vocab_sees_the_students_missing_columns_as_masked(divergence, dtype):
    check_against_reference(make_case(vocab=(67, 80), dtype=dtype, bias=True, chunk_size=8,
                                      divergence=divergence))


def test_teacher_mass_on_ids_the_student_lacks_is_refused_under_forward_kl():
    # The student's missing columns are -inf (probability 0), so KL(p || q) would be +inf there.
    for backend in ("auto", "reference"):
        with pytest.raises(ValueError, match="student_logits"):
            run_fused(make_case(vocab=(67, 80), chunk_size=8, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frozen", ("none", "bias", "weight", "hidden", "weight_and_bias"))
def test_frozen_parameters_get_no_gradient_and_the_rest_are_exact(frozen, dtype):
    case = make_case(dtype=dtype, bias=True, chunk_size=7)
    for name in frozen.split("_and_"):
        if name in case.requires:
            case.requires[name] = False
    check_against_reference(case)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_divergence_with_the_ce_blend_and_ignored_rows(divergence, dtype):
    case = make_case(dtype=dtype, bias=True, ignored=[0, 5, 6, 28], divergence=divergence, beta=0.3,
                     temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=6)
    check_against_reference(case)


@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("batch", ((29,), (3, 7)), ids=str)
def test_reductions_use_the_global_token_count(reduction, batch):
    # chunks of 4 rows, several of them all-ignored: "mean" divides by the call's valid rows
    case = make_case(batch=batch, ignored=(slice(0, 9) if len(batch) == 1 else (0, slice(None))),
                     reduction=reduction, temperature=2.0, chunk_size=4)
    grad_output = _randn(batch, 11).float() if reduction == "none" else None
    result = check_against_reference(case, grad_output)
    expected_shape = batch if reduction == "none" else ()
    assert tuple(result.loss.shape) == tuple(expected_shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_sequence_hidden_states(dtype):
    case = make_case(batch=(3, 7), dtype=dtype, bias=True, labels=True, ce_weight=0.2, chunk_size=5)
    result = check_against_reference(case)
    assert result.grads["hidden"].shape == (3, 7, 24)


@pytest.mark.parametrize("vocab", ((67, 67), (67, 50), (67, 80)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ready_teacher_logits(vocab, dtype):
    check_against_reference(make_case(vocab=vocab, dtype=dtype, teacher_as_logits=True, bias=True,
                                      divergence="jsd", chunk_size=6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,logit_scale", ((2.5, 1.0), (None, 0.5), (4.0, 1.7)))
def test_softcap_and_logit_scale_apply_to_both_lm_heads(softcap, logit_scale, dtype):
    check_against_reference(make_case(dtype=dtype, bias=True, vocab=(67, 60), softcap=softcap,
                                      logit_scale=logit_scale, temperature=2.0, chunk_size=8))


@pytest.mark.parametrize("student_dtype,teacher_dtype", ((torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.float32)), ids=str)
def test_teacher_in_another_dtype(student_dtype, teacher_dtype):
    case = make_case(dtype=student_dtype, chunk_size=8, bias=True)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        setattr(case, name, getattr(case, name).to(teacher_dtype))
    check_against_reference(case)


def test_float64_input_runs_the_reference_rows_exactly():
    case = make_case(dtype=torch.float64, bias=True, labels=True, ce_weight=0.5, chunk_size=5)
    fused, oracle = run_fused(case), run_materialised(case, torch.float64)
    assert fused.loss.dtype == torch.float64
    torch.testing.assert_close(fused.loss, oracle.loss, rtol=1e-12, atol=1e-12)
    for name in PARAMS:
        torch.testing.assert_close(fused.grads[name], oracle.grads[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vocab", ((67, 80), (80, 67)), ids=str)
def test_reference_backend_rows_the_fallback_without_compiled_kernels(vocab):
    check_against_reference(make_case(vocab=vocab, bias=True, chunk_size=5, divergence="jsd", labels=True,
                                      ce_weight=0.2, backend="reference"))


def test_all_ignored_rows_give_zero_loss_and_zero_gradients():
    case = make_case(ignored=slice(None), bias=True, chunk_size=8, ce_weight=0.5)
    result = run_fused(case)
    assert float(result.loss) == 0.0
    for name in PARAMS:
        assert not result.grads[name].any()


@pytest.mark.parametrize("ce_weight", (0.0, 0.5))
@pytest.mark.parametrize("seed", range(4))
def test_float16_lm_head_at_a_tiny_temperature_gets_no_nan_gradient(seed, ce_weight):
    # kd_weight / T = 1e6 overflows a float16 logits gradient; kept in range (exactly, by a power
    # of two given back in the GEMMs), each gradient is the float64 one rounded: inf only where
    # that one is beyond float16 itself.
    tokens, hidden, vocab = 5, 3, 7
    student = {"hidden": _randn((tokens, hidden), seed).half(), "weight": _randn((vocab, hidden), seed + 1, 0.1).half(),
               "bias": _randn((vocab,), seed + 2, 0.1).half()}
    teacher_logits = _randn((tokens, vocab), seed + 3, 0.1).half()
    labels = make_labels((tokens,), vocab, seed=seed)
    options = dict(divergence="forward_kl", temperature=1e-6, scale_by_t2=False, ce_weight=ce_weight, labels=labels)
    got = {name: t.clone().requires_grad_(True) for name, t in student.items()}
    kdkernels.fused_linear_kd_loss(got["hidden"], got["weight"], student_bias=got["bias"], teacher_logits=teacher_logits,
                                   **options, backend="cpu").backward()
    # the oracle: float64 from the float16 logits the kernel sees (at T = 1e-6 their rounding
    # decides the loss), differentiated through the lm_head in float64
    oracle = {name: t.double().requires_grad_(True) for name, t in student.items()}
    exact = F.linear(oracle["hidden"], oracle["weight"], oracle["bias"])
    logits = exact + (F.linear(student["hidden"], student["weight"], student["bias"]).double() - exact).detach()
    logits.retain_grad()
    kdkernels.kd_loss(logits, teacher_logits.double(), **options, backend="reference").backward()
    # The logits' gradient is rounded to float16 before the GEMMs (as eager PyTorch rounds it):
    # up to half an ulp of its largest entry per term of each GEMM's sum, then the final rounding.
    eps, largest = torch.finfo(torch.float16).eps, float(logits.grad.abs().max())
    terms = {"hidden": float(student["weight"].abs().sum(0).max()),
             "weight": float(student["hidden"].abs().sum(0).max()), "bias": float(tokens)}
    for name in PARAMS:
        grad, expected = got[name].grad, oracle[name].grad
        assert not grad.isnan().any(), f"{name} gradient: NaN {grad}"
        beyond = expected.half().isinf()
        assert torch.equal(grad.isinf(), beyond) and torch.equal(grad[beyond], expected[beyond].half()), name
        error = (grad[~beyond].double() - expected[~beyond]).abs()
        assert (error <= eps * (largest * terms[name] + expected[~beyond].abs())).all(), f"{name}: {error}"


# --- autograd behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", (1.0, 3.0, -0.5))
def test_incoming_gradient_scales_every_gradient(scale):
    case = make_case(bias=True, chunk_size=8)
    check_against_reference(case, grad_output=torch.tensor(scale))


def test_second_backward_with_a_scaled_gradient_is_exact():
    case = make_case(chunk_size=8)
    student, teacher = case.leaves()
    loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], **teacher)
    (2.0 * loss).backward(retain_graph=True)
    first = {name: student[name].grad.clone() for name in ("hidden", "weight")}
    (2.0 * loss).backward()
    for name, grad in first.items():
        torch.testing.assert_close(student[name].grad, 2 * grad)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradients_handed_out_are_not_rescaled_by_a_later_backward(reduction):
    case = make_case(bias=True, chunk_size=8, reduction=reduction)
    student, teacher = case.leaves()
    loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], student_bias=student["bias"],
                                          **teacher, **case.options).sum()
    returned = torch.autograd.grad(loss, [student["weight"], student["bias"]], retain_graph=True)
    kept = [g.clone() for g in returned]
    loss.backward(retain_graph=True)
    (0.5 * loss).backward()
    for grad, expected, name in zip(returned, kept, ("weight", "bias")):
        assert torch.equal(grad, expected)
        torch.testing.assert_close(student[name].grad, 1.5 * expected)


@pytest.mark.parametrize("changed", ("teacher_weight", "teacher_logits", "labels", "student_weight"))
def test_reduction_none_refuses_inputs_changed_in_place_before_backward(changed):
    # The chunks are recomputed in backward: from the tensors of the forward call or not at all.
    case = make_case(chunk_size=8, labels=True, teacher_as_logits=changed == "teacher_logits", ce_weight=0.3,
                     reduction="none")
    student, teacher = case.leaves()
    labels = case.labels.clone()
    loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], labels=labels, **teacher,
                                          **case.options)
    target = {"labels": labels, "student_weight": student["weight"]}.get(changed, teacher.get(changed))
    with torch.no_grad():
        target.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("chunk_size", (None, 4))
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
def test_zero_tokens_give_zero_loss_and_zero_gradients(chunk_size, reduction):
    # A first call of the same shape leaves its weight gradient in the reusable buffers; an empty
    # batch must not hand any of it back.
    case = make_case(bias=True, chunk_size=chunk_size)
    run_fused(case)
    empty = replace(case, student_hidden=case.student_hidden[:0], teacher_hidden=case.teacher_hidden[:0])
    student, teacher = empty.leaves()
    options = dict(student_bias=student["bias"], chunk_size=chunk_size, reduction=reduction, **teacher)
    loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], **options)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert float(loss.detach().sum()) == 0.0
    assert student["hidden"].grad.shape == (0, 24)
    assert not student["weight"].grad.any() and not student["bias"].grad.any()
    with torch.no_grad():
        assert float(kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], **options).sum()) == 0.0


def test_double_backward_raises_on_the_fused_path_and_works_on_the_reference():
    case = make_case(batch=(6,), hidden=(5, 7), vocab=(9, 9), dtype=torch.float64, bias=True)
    student, teacher = case.leaves()
    fused = student["hidden"].float().detach().requires_grad_(True)
    loss = kdkernels.fused_linear_kd_loss(fused, student["weight"].float(), teacher_hidden=teacher["teacher_hidden"].float(),
                                          teacher_weight=teacher["teacher_weight"].float(), temperature=2.0)
    (grad,) = torch.autograd.grad(loss, fused, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        grad.pow(2).sum().backward()

    def reference(hidden, weight, bias):
        return kdkernels.fused_linear_kd_loss(hidden, weight, student_bias=bias, temperature=2.0, softcap=4.0,
                                              backend="reference", **teacher)

    assert torch.autograd.gradgradcheck(reference, (student["hidden"], student["weight"], student["bias"]))


def test_loss_inside_a_larger_graph():
    case = make_case(bias=True, chunk_size=8)
    student, teacher = case.leaves()
    hidden = student["hidden"].detach().requires_grad_(True)
    projected = hidden * 2.0  # not a leaf: the gradient flows on to `hidden`
    loss = kdkernels.fused_linear_kd_loss(projected, student["weight"], student_bias=student["bias"], **teacher)
    loss.backward()
    expected = run_fused(replace(case, student_hidden=case.student_hidden * 2.0))
    torch.testing.assert_close(hidden.grad, 2.0 * expected.grads["hidden"])


class RowsSpy:
    """Records every call of the compiled CPU backend's rows(...)."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.inplace = []  # per call: whether the gradient overwrote the student logits buffer
        original, original_inplace = cpu_backend.rows, cpu_backend.rows_inplace

        def rows(student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad):
            self.calls.append((tuple(student_logits.shape), grad_scale, compute_grad))
            self.inplace.append(False)
            return original(student_logits, teacher_logits, labels, grad_scale, cfg, compute_grad)

        def rows_inplace(student_logits, teacher_logits, labels, grad_scale, cfg):
            self.calls.append((tuple(student_logits.shape), grad_scale, True))
            self.inplace.append(True)
            return original_inplace(student_logits, teacher_logits, labels, grad_scale, cfg)

        monkeypatch.setattr(cpu_backend, "rows", rows)
        monkeypatch.setattr(cpu_backend, "rows_inplace", rows_inplace)


def test_every_chunk_runs_the_cpu_row_kernel_with_one_global_grad_scale(monkeypatch):
    spy = RowsSpy(monkeypatch)
    # reverse KL: the student's padded columns (-inf) where the teacher has mass keep it finite
    run_fused(make_case(vocab=(67, 80), chunk_size=7, labels=True, ignored=[1, 2], divergence="reverse_kl"))
    assert [shape for shape, _, _ in spy.calls] == [(7, 80)] * 4 + [(1, 80)]
    scales = {id(scale) for _, scale, _ in spy.calls}
    assert len(scales) == 1
    assert float(spy.calls[0][1]) == pytest.approx(1 / 27)
    assert all(compute_grad for _, _, compute_grad in spy.calls)
    assert all(spy.inplace)  # the gradient reuses the student logits buffer, chunk after chunk


def test_softcap_keeps_the_capped_logits_and_takes_a_separate_gradient(monkeypatch):
    spy = RowsSpy(monkeypatch)
    check_against_reference(make_case(chunk_size=8, softcap=3.0))
    assert spy.calls and not any(spy.inplace)


def test_no_grad_computes_no_gradient(monkeypatch):
    case = make_case(chunk_size=8, bias=True)
    expected = run_fused(case).loss
    spy = RowsSpy(monkeypatch)
    allocated = []
    monkeypatch.setattr(fused_linear._StudentGrads, "allocate",
                        staticmethod(lambda *args: allocated.append(args)))
    student, teacher = case.leaves()
    with torch.no_grad():
        loss = kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"],
                                              student_bias=student["bias"], **teacher)
    assert not loss.requires_grad
    assert spy.calls and not any(compute_grad for _, _, compute_grad in spy.calls)
    assert allocated == []
    torch.testing.assert_close(loss, expected)


def test_frozen_student_computes_no_gradient(monkeypatch):
    spy = RowsSpy(monkeypatch)
    case = make_case(chunk_size=8, bias=True)
    case.requires = dict.fromkeys(PARAMS, False)
    result = run_fused(case)
    assert not any(compute_grad for _, _, compute_grad in spy.calls)
    assert all(g is None for g in result.grads.values())


def test_teacher_tensors_get_no_gradient():
    case = make_case(chunk_size=8, bias=True)
    student, teacher = case.leaves()
    for value in teacher.values():
        if value is not None:
            value.requires_grad_(True)
    kdkernels.fused_linear_kd_loss(student["hidden"], student["weight"], **teacher).backward()
    assert all(value is None or value.grad is None for value in teacher.values())


# --- chunk size from the memory budget ----------------------------------------------------------------

def test_default_chunk_fits_the_memory_budget(monkeypatch):
    budget = 16 * 1024
    monkeypatch.setitem(fused_linear.DEFAULT_CHUNK_BYTES, "cpu", budget)
    monkeypatch.setattr(fused_linear, "MIN_CHUNK_ROWS", 1)
    spy = RowsSpy(monkeypatch)
    case = make_case(batch=(50,), vocab=(67, 67))
    check_against_reference(case)
    # fp32: student logits + teacher logits = 8 bytes per vocabulary entry (the gradient
    # overwrites the student logits)
    most = budget // (67 * 8)  # 30 rows: 50 rows take two chunks, balanced as 25 + 25
    assert most == 30
    assert [shape[0] for shape, _, _ in spy.calls] == [25, 25]


def test_chunk_rows_between_the_gemm_minimum_and_the_row_count():
    assert fused_linear.chunk_rows(1000, 256_000, 12, budget_bytes=100) == fused_linear.MIN_CHUNK_ROWS
    assert fused_linear.chunk_rows(10, 256_000, 12, budget_bytes=100) == 10
    assert fused_linear.chunk_rows(10, 32, 12, budget_bytes=1 << 30) == 10
    # 655 rows fit the CPU budget at V=32000 (8 bytes per entry): 7 chunks, balanced to 586 rows
    assert fused_linear.DEFAULT_CHUNK_BYTES["cpu"] // (32_000 * 8) == 655
    assert fused_linear.chunk_rows(4096, 32_000, 8) == 586


def test_chunks_are_balanced_within_the_budget():
    assert fused_linear.chunk_rows(1000, 10, 4, budget_bytes=40 * 300) == 250  # 300 fit: 4 x 250
    assert fused_linear.chunk_rows(1000, 10, 4, budget_bytes=40 * 500) == 500
    assert fused_linear.chunk_rows(1001, 10, 4, budget_bytes=40 * 500) == 334  # not 500 + 500 + 1
    # CUDA, V=128256 bf16: 1395 rows fit 1 GiB, so 8192 rows take 6 chunks of 1366
    assert fused_linear.DEFAULT_CHUNK_BYTES["cuda"] // (128_256 * 6) == 1395
    assert fused_linear.chunk_rows(8192, 128_256, 6, "cuda") == 1366


# --- the 16-bit lm_head's float32 weight-gradient GEMM ------------------------------------------------

WIDENING = pytest.mark.skipif(
    not fused_linear.widening_gemm(torch.device("cpu"), torch.bfloat16),
    reason="this torch's BLAS has no GEMM of 16-bit operands into float32")


@WIDENING
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("layout", ("plain", "transposed", "column_slice"))
@pytest.mark.parametrize("beta", (0.0, 1.0, 0.5))
def test_widening_gemm_accumulates_in_float32(dtype, layout, beta):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 70, generator=gen).to(dtype)  # used as a^T: [70, 300], strides (1, 70)
    b = torch.randn(300, 90, generator=gen).to(dtype)
    if layout == "transposed":
        b = torch.randn(90, 300, generator=gen).to(dtype).t()
    if layout == "column_slice":
        a = torch.randn(300, 100, generator=gen).to(dtype)[:, 20:90]
    out = torch.randn(70, 90, generator=gen)
    if beta == 0.0:
        out.fill_(math.nan)  # beta = 0 never reads out
    start = torch.zeros_like(out) if beta == 0.0 else out.double()
    expected = beta * start + 0.25 * (a.double().t() @ b.double())
    torch.ops.kdkernels.addmm_widening_(out, a.t(), b, beta, 0.25)
    # float32 accumulation: far below the 16-bit rounding (2^-9 bf16, 2^-12 fp16) a 16-bit output has
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


@WIDENING
def test_widening_gemm_with_no_inner_dimension_scales_out():
    out = torch.full((3, 4), 2.0)
    torch.ops.kdkernels.addmm_widening_(out, torch.zeros(3, 0, dtype=torch.bfloat16),
                                        torch.zeros(0, 4, dtype=torch.bfloat16), 0.5, 1.0)
    assert torch.equal(out, torch.ones(3, 4))


@WIDENING
@pytest.mark.parametrize("change, error, words", [
    (dict(mat1=torch.zeros(3, 5)), TypeError, "mat1 and mat2 must both be bfloat16"),
    (dict(out=torch.zeros(3, 4, dtype=torch.float64)), TypeError, "out must be float32"),
    (dict(mat2=torch.zeros(6, 4, dtype=torch.bfloat16)), ValueError, "shapes"),
    (dict(out=torch.zeros(12)), ValueError, "2-D"),
])
def test_widening_gemm_rejects_bad_operands(change, error, words):
    args = dict(out=torch.zeros(3, 4), mat1=torch.zeros(3, 5, dtype=torch.bfloat16),
                mat2=torch.zeros(5, 4, dtype=torch.bfloat16), beta=0.0, alpha=1.0)
    args.update(change)
    with pytest.raises(error, match=words):
        torch.ops.kdkernels.addmm_widening_(**args)


@WIDENING
def test_bfloat16_weight_gradient_takes_the_widening_gemm(monkeypatch):
    calls = []
    original = torch.ops.kdkernels.addmm_widening_

    def spy(out, mat1, mat2, beta, alpha):
        calls.append((out.dtype, mat1.dtype, tuple(out.shape), beta))
        return original(out, mat1, mat2, beta, alpha)

    monkeypatch.setattr(torch.ops.kdkernels, "addmm_widening_", spy)
    check_against_reference(make_case(dtype=torch.bfloat16, chunk_size=10))
    # three chunks of the 29 rows, each adding to the whole [67, 24] float32 accumulator (on a CPU
    # without bf16 dot products the logits and hidden gradient take it too: other shapes)
    weight_calls = [call for call in calls if call[2] == (67, 24)]
    assert weight_calls == [(torch.float32, torch.bfloat16, (67, 24), 0.0)] + [(torch.float32, torch.bfloat16, (67, 24), 1.0)] * 2


@pytest.mark.skipif(not fused_linear._WIDENING_DTYPES, reason="this torch's BLAS has no widening GEMM")
@pytest.mark.parametrize("widened", [True, False], ids=["widening-gemm", "torch-matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_logits_and_hidden_gradient_match_reference_on_either_gemm(monkeypatch, dtype, widened):
    # CPUs without 16-bit dot products take the widening GEMM for the chunk logits and the hidden
    # gradient (torch's 16-bit matmul is orders of magnitude slower there); both roads give the
    # reference's result, whichever this machine takes
    monkeypatch.setattr(fused_linear, "_WIDENED_GEMM_DTYPES", frozenset({dtype}) if widened else frozenset())
    monkeypatch.setattr(fused_linear, "COPY_BLOCK_BYTES", 4 * 10 * 16)  # several column blocks per chunk
    calls = []
    original = torch.ops.kdkernels.addmm_widening_

    def spy(out, mat1, mat2, beta, alpha):
        calls.append(tuple(out.shape))
        return original(out, mat1, mat2, beta, alpha)

    monkeypatch.setattr(torch.ops.kdkernels, "addmm_widening_", spy)
    check_against_reference(make_case(dtype=dtype, bias=True, chunk_size=10))
    logits_calls = [shape for shape in calls if shape[1] != 24]
    hidden_calls = [shape for shape in calls if shape[1] == 24 and shape[0] != 67]
    assert bool(logits_calls) == widened and bool(hidden_calls) == widened, calls


def test_widening_gemm_drops_the_float32_copy_from_the_chunk_budget():
    wanted = fused_linear.Wanted(True, True, False)
    assert fused_linear.bytes_per_logit(2, 2, 2, wanted, inplace=True) == 8
    assert fused_linear.bytes_per_logit(2, 2, 2, wanted, inplace=True, widening=True) == 4


# --- bad input ---------------------------------------------------------------------------------------

def _call(case: Case, **changes):
    student, teacher = case.leaves()
    kwargs = {"student_hidden": student["hidden"], "student_weight": student["weight"], "labels": case.labels,
              "student_bias": student["bias"], **teacher}
    kwargs.update(changes)
    return kdkernels.fused_linear_kd_loss(**kwargs)


@pytest.mark.parametrize("changes,error,name", [
    ({"student_weight": torch.zeros(67, 23)}, ValueError, "student_weight"),
    ({"student_hidden": torch.zeros(24)}, ValueError, "student_hidden"),
    ({"teacher_weight": torch.zeros(67, 41)}, ValueError, "teacher_weight"),
    ({"teacher_hidden": torch.zeros(28, 40)}, ValueError, "teacher_hidden"),
    ({"teacher_hidden": None}, ValueError, "teacher_hidden"),
    ({"labels": torch.zeros(28, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(29, 1, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(29)}, TypeError, "labels"),
    ({"teacher_logits": torch.zeros(29, 67)}, ValueError, "teacher_logits"),
    ({"teacher_weight": None, "teacher_hidden": None}, ValueError, "teacher_weight"),
    ({"teacher_weight": None, "teacher_logits": torch.zeros(29, 67)}, ValueError, "teacher_hidden"),
    ({"teacher_weight": None, "teacher_hidden": None, "teacher_logits": torch.zeros(28, 67)},
     ValueError, "teacher_logits"),
    ({"student_bias": torch.zeros(66)}, ValueError, "student_bias"),
    ({"teacher_bias": torch.zeros(67, dtype=torch.float64)}, TypeError, "teacher_bias"),
    ({"student_weight": torch.zeros(67, 24, dtype=torch.bfloat16)}, TypeError, "student_weight"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"logit_scale": -1.0}, ValueError, "logit_scale"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"ce_weight": 0.5}, ValueError, "ce_weight"),
    ({"backend": "tpu"}, ValueError, "backend"),
])
def test_bad_input_names_the_argument(changes, error, name):
    with pytest.raises(error, match=name):
        _call(make_case(bias=True), **changes)


def test_labels_outside_the_common_vocabulary_are_rejected():
    case = make_case(vocab=(67, 80), labels=True, divergence="reverse_kl", chunk_size=8)
    case.labels[3] = 80
    with pytest.raises(ValueError, match="labels"):
        run_fused(case)
    case.labels[3] = 79  # inside the teacher's (longer) vocabulary: accepted
    run_fused(case)


# --- module ------------------------------------------------------------------------------------------

def test_module_equals_functional():
    options = {"temperature": 2.0, "divergence": "skew_kl", "beta": 0.2, "chunk_size": 5, "ce_weight": 0.3}
    case = make_case(bias=True, labels=True, **options)
    student, teacher = case.leaves()
    criterion = kdkernels.nn.FusedLinearKDLoss(**options)
    loss = criterion(student["hidden"], student["weight"], teacher["teacher_hidden"], teacher["teacher_weight"],
                     case.labels, student_bias=student["bias"], teacher_bias=teacher["teacher_bias"])
    loss.backward()
    expected = run_fused(case)
    torch.testing.assert_close(loss.detach(), expected.loss)
    torch.testing.assert_close(student["weight"].grad, expected.grads["weight"])
    assert "temperature=2.0" in repr(criterion)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="softcap"):
        kdkernels.nn.FusedLinearKDLoss(softcap=-1.0)
    with pytest.raises(ValueError, match="divergence"):
        kdkernels.nn.FusedLinearKDLoss(divergence="kl")


def test_torch_compile_of_a_function_calling_the_loss():
    # fullgraph: the chunk loop traces into the graph, with no graph break; values and gradients agree.
    torch._dynamo.reset()
    case = make_case(bias=True, chunk_size=8)

    def training_loss(hidden, weight, bias, teacher):
        return 0.5 * kdkernels.fused_linear_kd_loss(hidden, weight, student_bias=bias, temperature=2.0, **teacher)

    compiled = torch.compile(training_loss, fullgraph=True)
    results = []
    for fn in (training_loss, compiled):
        student, teacher = case.leaves()
        loss = fn(student["hidden"], student["weight"], student["bias"], teacher)
        loss.backward()
        results.append((loss.detach(), student["weight"].grad))
    torch.testing.assert_close(results[1], results[0])


# --- the Triton row kernel (GPU path), under the Triton interpreter ------------------------------------

# The parent test runs the interpreter cases in a child pytest (triton_interpreter.run_interpreter_cases; tiny
# shapes: it is slow).
if INTERPRETING:
    @pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked lanes
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("options", (
        {"vocab": (40, 33), "bias": True, "labels": True, "ce_weight": 0.3, "temperature": 2.0},
        {"vocab": (33, 40), "divergence": "jsd", "softcap": 3.0},
        # in place (no softcap) with the student's padding columns, refilled after every chunk
        {"vocab": (33, 40), "divergence": "reverse_kl", "labels": True, "ce_weight": 0.5},
    ), ids=("ce_blend", "jsd_softcap", "reverse_kl_padded_student"))
    def test_interpreted_triton_rows(options, dtype):
        check_against_reference(make_case(batch=(11,), dtype=dtype, chunk_size=4, backend="triton", **options))
else:
    def test_triton_row_kernel_under_the_interpreter():
        summary = run_interpreter_cases(os.path.abspath(__file__), "-k", "interpreted_triton", timeout=900)
        assert "6 passed" in summary, summary
