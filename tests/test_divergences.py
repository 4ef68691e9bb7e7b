"""The divergence family: the float64 oracle against the textbook formulas, the
mixing / skew weight over [0, 1] including its endpoints, zero-mass teachers, and rows where
student and teacher (nearly) agree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from conftest import (DIVERGENCE_NAMES, assert_within_eager_error,
                      check_against_reference, loss_and_grad, make_labels, make_logits, make_pair)

MIXED = ("jsd", "skew_kl", "skew_reverse_kl")



def _textbook(divergence: str, student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence in float64 straight from the definitions (no masking, no log-space care)."""
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if divergence == "forward_kl":
        return F.kl_div(q.log(), p, reduction="none").sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(p.log(), q, reduction="none").sum(-1)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skew_kl":
        return kl(p, beta * p + (1 - beta) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, (1 - beta) * p + beta * q)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("beta", (0.1, 0.5, 0.8))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_reference_oracle_matches_textbook_formulas(divergence, beta, temperature):
    student, teacher = make_pair((9, 40), torch.float64, seed=30)
    rows = kdkernels.kd_loss(student, teacher, divergence=divergence, beta=beta, temperature=temperature,
                             scale_by_t2=False, reduction="none", backend="reference")
    expected = _textbook(divergence, student / temperature, teacher / temperature, beta)
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", MIXED)
@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", ("cpu", "auto"))
def test_mixing_weight_over_its_range_matches_reference(request, backend, dtype, beta, divergence):
    student, teacher = make_pair((3, 7, 33), dtype, seed=31)
    labels = make_labels((3, 7), 33, ignored=(1, 4))
    check_against_reference(student, teacher, labels, backend=backend, divergence=divergence, beta=beta,
                            temperature=2.0, ce_weight=0.3)


@pytest.mark.parametrize("beta", (0.0, 1.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_jsd_is_zero_with_zero_gradient_at_both_endpoints(dtype, beta):
    # Convention: JSD(beta) is continuous, m equals q (beta=0) or p (beta=1) and both terms vanish.
    student, teacher = make_pair((13, 301), dtype, seed=32)
    result = check_against_reference(student, teacher, divergence="jsd", beta=beta, temperature=2.0,
                                     reduction="none")
    assert (result.loss == 0).all()
    assert (result.grad == 0).all()


@pytest.mark.parametrize("endpoint", (0.0, 1.0))
def test_jsd_is_continuous_at_its_endpoints(endpoint):
    student, teacher = make_pair((8, 257), seed=33)

    def jsd(beta):
        return float(kdkernels.kd_loss(student, teacher, divergence="jsd", beta=beta, temperature=2.0))

    middle = jsd(0.5)
    near = [jsd(abs(endpoint - delta)) for delta in (1e-2, 1e-3, 1e-4)]
    assert near[0] > near[1] > near[2] > jsd(endpoint) - 1e-7  # decreasing towards the endpoint
    assert near[2] < 1e-2 * middle


@pytest.mark.parametrize("skewed,plain", (("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_skew_divergences_at_zero_equal_their_plain_divergence(skewed, plain, temperature):
    student, teacher = make_pair((41, 1271), seed=34)
    labels = make_labels((41,), 1271, ignored=[3])
    kwargs = dict(temperature=temperature, ce_weight=0.5)
    result = loss_and_grad(student, teacher, labels, divergence=skewed, beta=0.0, **kwargs)
    eager = loss_and_grad(student, teacher, labels, divergence=plain, backend="reference", **kwargs)
    oracle = loss_and_grad(student.double(), teacher.double(), labels, divergence=plain,
                           backend="reference", **kwargs)
    assert_within_eager_error(result.loss, eager.loss, oracle.loss, what="loss")
    assert_within_eager_error(result.grad, eager.grad, oracle.grad, what="gradient")


@pytest.mark.parametrize("divergence", ("skew_kl", "skew_reverse_kl"))
def test_skew_divergences_at_one_are_zero_with_zero_gradient(request, divergence):
    # alpha = 1: the mixture is the distribution being compared (p for skew KL, q for skew reverse KL)
    student, teacher = make_pair((13, 301), seed=35)
    result = check_against_reference(student, teacher, divergence=divergence, beta=1.0, temperature=2.0,
                                     reduction="none")
    assert (result.loss == 0).all()
    assert (result.grad == 0).all()


@pytest.mark.parametrize("divergence", ("forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_teacher_with_zero_mass_columns(dtype, divergence):
    # Teacher-only -inf columns: p = 0 where q > 0. Every divergence here stays finite (reverse KL
    # is +inf there by definition, and is left out).
    student, teacher = make_pair((11, 257), dtype, seed=36)
    teacher = teacher.clone()
    teacher[:, ::5] = -math.inf
    teacher[3, 2:] = -math.inf  # row 3: the teacher is one-hot on column 1
    check_against_reference(student, teacher, divergence=divergence, beta=0.4, temperature=2.0)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("gap", (0.0, 1e-3, 1e-2))
def test_nearly_identical_student_and_teacher(request, gap, temperature, divergence):
    # Late in distillation the student tracks the teacher and the divergence is tiny: its value
    # must not drown in rounding error of the (much larger) logits and log-normalisers.
    student = make_logits((41, 1271), seed=37, scale=3.0, offset=20.0)
    teacher = student + gap * make_logits((41, 1271), seed=38, scale=1.0)
    check_against_reference(student, teacher, divergence=divergence, beta=0.3, temperature=temperature,
                            reduction="none")


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_single_column_vocabulary_gives_zero(request, divergence):
    # V = 1: both distributions are the point mass and every divergence is exactly 0.
    student, teacher = make_pair((6, 1), seed=40)
    result = check_against_reference(student, teacher, divergence=divergence, temperature=2.0,
                                     reduction="none")
    assert (result.grad == 0).all()
