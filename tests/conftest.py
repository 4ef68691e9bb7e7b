"""Shared test helpers: random logits and the dtype-adaptive comparison with the float64 oracle.

Tolerance rule: a kernel's error against the float64 reference must be at most
twice the error of eager PyTorch at the same dtype, plus a tiny absolute floor. "Eager PyTorch at
that dtype" is the reference formula (kdkernels.backends.reference) run on the same low-precision
inputs: its math runs in float32 and its gradient is rounded to the input dtype, exactly what a
kernel is asked to do. The float64 oracle runs on the very same (already rounded) input values, so
both errors measure computation, not input rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import kdkernels

DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")

# Floor of the tolerance in units of the dtype's eps, times the largest reference magnitude (at
# least 1e-3), so a loss of 100 and one of 0.01 get the same few-ulp allowance. It matters only
# where eager PyTorch happens to be (nearly) exact, e.g. a loss that is 0: 8 float32 ulps is
# ~1e-6 of the largest value; 1/4 ulp for bf16/fp16, whose eager error is never below 1/2 ulp.
FLOOR_ULPS = {torch.float32: 8.0, torch.float64: 8.0, torch.bfloat16: 0.25, torch.float16: 0.25}


def make_logits(shape, dtype=torch.float32, *, seed=0, scale=3.0, offset=0.0):
    """Random logits with a spread like a trained model's (std `scale`)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def make_pair(shape, dtype=torch.float32, *, seed=0, teacher_dtype=None, scale=3.0):
    """(student_logits, teacher_logits); the teacher is correlated with the student, as in KD."""
    student = make_logits(shape, dtype, seed=seed, scale=scale)
    noise = make_logits(shape, torch.float64, seed=seed + 1000, scale=scale)
    teacher = (0.6 * student.double() + 0.8 * noise).to(teacher_dtype or dtype)
    return student, teacher


def make_labels(batch_shape, vocab, *, seed=0, ignored=None, ignore_index=-100):
    """Integer labels in [0, vocab); `ignored` is an index/mask expression set to ignore_index."""
    gen = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, vocab, tuple(batch_shape), generator=gen)
    if ignored is not None:
        labels[ignored] = ignore_index
    return labels


@dataclass
class LossAndGrad:
    loss: torch.Tensor
    grad: Optional[torch.Tensor]  # dL/d(student_logits) for the given grad_output


def loss_and_grad(student, teacher, labels=None, *, grad_output=None, **kd_kwargs) -> LossAndGrad:
    """kd_loss(...) and the student's gradient under `grad_output` (default: ones)."""
    student = student.detach().clone().requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, labels, **kd_kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return LossAndGrad(loss.detach(), student.grad)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.double() - expected.double()).abs().max())


def tolerance_floor(reference: torch.Tensor, dtype: torch.dtype) -> float:
    magnitude = float(reference.abs().max()) if reference.numel() else 0.0
    return FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * max(magnitude, 1e-3)


def assert_within_eager_error(actual, eager, reference, *, what: str, floor_dtype=None) -> None:
    """|actual - reference| <= 2 |eager - reference| + floor, elementwise maxima; no NaN/inf."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    err = max_abs_error(actual, reference)
    eager_err = max_abs_error(eager, reference)
    allowed = 2.0 * eager_err + tolerance_floor(reference, floor_dtype or actual.dtype)
    assert err <= allowed, (
        f"{what}: max error {err:.3e} vs float64 reference exceeds 2 x eager error {eager_err:.3e} "
        f"+ floor (allowed {allowed:.3e}); reference magnitude {float(reference.abs().max()):.3e}")


def check_against_reference(student, teacher, labels=None, *, backend="cpu", grad_output=None,
                            **kd_kwargs) -> LossAndGrad:
    """Runs `backend` and compares loss and gradient with the float64 oracle under the tolerance
    rule above; also checks the gradient dtype equals the student's. Returns the backend's result."""
    result = loss_and_grad(student, teacher, labels, grad_output=grad_output, backend=backend, **kd_kwargs)
    eager = loss_and_grad(student, teacher, labels, grad_output=grad_output, backend="reference", **kd_kwargs)
    oracle = loss_and_grad(student.double(), teacher.double(), labels,
                           grad_output=None if grad_output is None else grad_output.double(),
                           backend="reference", **kd_kwargs)
    assert result.grad.dtype == student.dtype, f"gradient dtype {result.grad.dtype} != {student.dtype}"
    assert result.grad.shape == student.shape
    assert_within_eager_error(result.loss, eager.loss, oracle.loss, what="loss",
                              floor_dtype=torch.float32)
    assert_within_eager_error(result.grad, eager.grad, oracle.grad, what="gradient")
    return result




@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


# hypothesis profiles of tests/test_properties.py: "ci" (the default; derandomized, so a run is
# reproducible, and sized to finish in under three minutes on two cores) and "long"
# (`pytest tests/test_properties.py --hypothesis-profile=long`).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True,
                              suppress_health_check=_SLOW_OK, print_blob=True)
    settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK,
                              print_blob=True)
    settings.load_profile("ci")


def masked_teacher_row_oracle(student, teacher, labels, row: int, *, grad_output=None, **kd_kwargs) -> LossAndGrad:
    """The float64 row losses and gradient (reduction "none") of a batch whose teacher row `row` is
    entirely -inf: that row has no teacher distribution, so no KD term, and keeps its CE term
    ce_weight * CE(z, y); the other rows are the reference's. grad_output: [N] (default ones)."""
    if grad_output is None:
        grad_output = torch.ones(student.shape[0])
    stand_in = teacher.double().clone()
    stand_in[row] = 0.0
    oracle = loss_and_grad(student.double(), stand_in, labels, grad_output=grad_output.double(),
                           backend="reference", reduction="none", **kd_kwargs)
    z = student[row].double().detach().requires_grad_(True)
    ce = kd_kwargs.get("ce_weight", 0.0) * torch.nn.functional.cross_entropy(z[None], labels[row:row + 1])
    (grad,) = torch.autograd.grad(ce * float(grad_output[row]), z)
    oracle.loss[row] = ce.detach()
    oracle.grad[row] = grad
    return oracle


def check_masked_teacher_row(backend: str, *, divergence: str, temperature: float, dtype=torch.float32) -> None:
    """kd_loss on `backend` for a batch whose teacher row 1 is entirely -inf, against
    masked_teacher_row_oracle: no KD term for that row, its CE term (and gradient) kept."""
    student, teacher = make_pair((3, 37), dtype, seed=40)
    teacher[1] = -math.inf
    labels = torch.tensor([4, 9, 30])
    grad_output = torch.tensor([0.5, 2.0, 1.0])
    options = dict(divergence=divergence, temperature=temperature, ce_weight=0.7, beta=0.3)
    result = loss_and_grad(student, teacher, labels, grad_output=grad_output, backend=backend, reduction="none",
                           **options)
    oracle = masked_teacher_row_oracle(student, teacher, labels, 1, grad_output=grad_output, **options)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(result.loss.double(), oracle.loss, **tolerance)
    torch.testing.assert_close(result.grad.double(), oracle.grad, **tolerance)
    assert result.loss[1] > 0 and (result.grad[1] != 0).any()


STUDENT_NEG_INF_CASES = ("whole_row", "whole_row_ce", "forward_kl_mass", "label_on_neg_inf")


def student_neg_inf_case(case):
    """(student [3, 37], teacher, labels or None, kd_loss options) whose row 1 has a loss that the
    student's -inf entries make +inf or undefined (STUDENT_NEG_INF_CASES)."""
    student, teacher = make_pair((3, 37), seed=42)
    labels = torch.tensor([4, 9, 30])
    if case == "whole_row":  # a finite teacher against a student with no distribution
        student[1] = -math.inf
        return student, teacher, None, dict(divergence="tvd")
    if case == "whole_row_ce":  # masked on both sides, but the CE term needs the student's label
        student[1] = -math.inf
        teacher[1] = -math.inf
        return student, teacher, labels, dict(divergence="reverse_kl", ce_weight=0.5)
    if case == "forward_kl_mass":  # teacher mass where the student has none: KL(p || q) = +inf
        student[1, 5] = -math.inf
        return student, teacher, None, dict(divergence="forward_kl")
    # the label on a student -inf entry (masked for the teacher too): CE = +inf
    student[1, 9] = -math.inf
    teacher[1, 9] = -math.inf
    return student, teacher, labels, dict(divergence="jsd", ce_weight=0.5)


