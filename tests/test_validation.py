"""Bad input raises ValueError / TypeError that names the offending argument, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from conftest import make_labels, make_pair

BACKENDS = ("cpu", "reference", "auto")


def _inputs(shape=(4, 11)):
    student, teacher = make_pair(shape, seed=50)
    return student, teacher, make_labels(shape[:-1], shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_shape", ((4, 12), (5, 11), (4, 1, 11), (44,)), ids=str)
def test_shape_mismatch(backend, teacher_shape):
    student, _, _ = _inputs()
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student, torch.zeros(teacher_shape), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_without_a_vocab_dimension(backend):
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.kd_loss(torch.zeros(7), torch.zeros(7), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ("student_logits", "teacher_logits"))
@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.bool), ids=str)
def test_integer_logits(backend, which, dtype):
    student, teacher, _ = _inputs()
    tensors = {"student_logits": student, "teacher_logits": teacher}
    tensors[which] = tensors[which].to(dtype)
    with pytest.raises(TypeError, match=which):
        kdkernels.kd_loss(tensors["student_logits"], tensors["teacher_logits"], backend=backend)


@pytest.mark.parametrize("which", ("student_logits", "teacher_logits"))
def test_logits_that_are_not_tensors(which):
    student, teacher, _ = _inputs()
    args = {"student_logits": student, "teacher_logits": teacher}
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=which):
        kdkernels.kd_loss(args["student_logits"], args["teacher_logits"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", (0.0, -1.0, math.nan, math.inf, -math.inf, 9e-7, 1.1e6, 2e19, 3e-39))
def test_temperature_must_be_finite_and_within_its_range(backend, temperature):
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.kd_loss(student, teacher, temperature=temperature, backend=backend)


@pytest.mark.parametrize("temperature", (1e-6, 1e6))
def test_temperature_range_ends_are_accepted(temperature):
    student, teacher = make_pair((3, 7))
    assert torch.isfinite(kdkernels.kd_loss(student, teacher, temperature=temperature))


@pytest.mark.parametrize("temperature", ("2", None, True, torch.tensor(2.0)), ids=repr)
def test_temperature_must_be_a_number(temperature):
    student, teacher, _ = _inputs()
    with pytest.raises(TypeError, match="temperature"):
        kdkernels.kd_loss(student, teacher, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_label", (11, 1000, -1, -101))
@pytest.mark.parametrize("ce_weight", (0.0, 0.5))
def test_label_out_of_range(backend, bad_label, ce_weight):
    student, teacher, labels = _inputs()
    labels[2] = bad_label
    with pytest.raises(ValueError, match="labels"):
        kdkernels.kd_loss(student, teacher, labels, ce_weight=ce_weight, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_range_check_respects_ignore_index(backend):
    student, teacher, labels = _inputs()
    labels[1] = -1
    kdkernels.kd_loss(student, teacher, labels, ignore_index=-1, ce_weight=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels_shape", ((5,), (4, 1), (2, 2), ()), ids=str)
def test_labels_of_the_wrong_shape(backend, labels_shape):
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="labels"):
        kdkernels.kd_loss(student, teacher, torch.zeros(labels_shape, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bool, torch.complex64), ids=str)
def test_labels_of_the_wrong_dtype(backend, dtype):
    student, teacher, labels = _inputs()
    with pytest.raises(TypeError, match="labels"):
        kdkernels.kd_loss(student, teacher, labels.to(dtype), backend=backend)


def test_labels_that_are_not_a_tensor():
    student, teacher, labels = _inputs()
    with pytest.raises(TypeError, match="labels"):
        kdkernels.kd_loss(student, teacher, labels.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_are_accepted(backend):
    student, teacher, labels = _inputs()
    expected = kdkernels.kd_loss(student, teacher, labels, ce_weight=0.5, backend=backend)
    actual = kdkernels.kd_loss(student, teacher, labels.int(), ce_weight=0.5, backend=backend)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_weight_without_labels(backend):
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="ce_weight"):
        kdkernels.kd_loss(student, teacher, ce_weight=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", (math.nan, math.inf))
@pytest.mark.parametrize("where", ((0, 0), (3, 10), (2, 5)), ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_finite_teacher(backend, bad_value, where, dtype):
    student, teacher, labels = _inputs()
    teacher = teacher.to(dtype)
    teacher[where] = bad_value
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student.to(dtype), teacher, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_in_a_long_row(backend):
    # past the first online-softmax block of the CPU kernel
    student, teacher = make_pair((3, 5000), seed=51)
    teacher[1, 4321] = math.nan
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student, teacher, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_infinite_teacher_is_a_mask_not_an_error(backend):
    student, teacher, _ = _inputs()
    student[:, 3] = -math.inf
    teacher[:, 3] = -math.inf
    assert torch.isfinite(kdkernels.kd_loss(student, teacher, backend=backend))


@pytest.mark.parametrize("argument,value", (
    ("divergence", "kl"), ("divergence", "FORWARD_KL"), ("reduction", "avg"), ("reduction", None),
    ("backend", "gpu"), ("backend", "CPU")))
def test_unknown_option_names(argument, value):
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match=argument):
        kdkernels.kd_loss(student, teacher, **{argument: value})


@pytest.mark.parametrize("divergence", ("jsd", "skew_kl", "skew_reverse_kl", "forward_kl"))
@pytest.mark.parametrize("beta", (-0.1, 1.5, math.nan, math.inf))
def test_beta_outside_the_unit_interval(divergence, beta):
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="beta"):
        kdkernels.kd_loss(student, teacher, divergence=divergence, beta=beta)


@pytest.mark.parametrize("argument", ("kd_weight", "ce_weight"))
@pytest.mark.parametrize("value", (-0.5, math.nan, -math.inf))
def test_negative_or_non_finite_weights(argument, value):
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match=argument):
        kdkernels.kd_loss(student, teacher, labels, **{argument: value})


@pytest.mark.parametrize("value", (1.5, "-100", None))
def test_ignore_index_must_be_an_int(value):
    student, teacher, labels = _inputs()
    with pytest.raises(TypeError, match="ignore_index"):
        kdkernels.kd_loss(student, teacher, labels, ignore_index=value)


def test_cpu_backend_refuses_float64():
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="backend"):
        kdkernels.kd_loss(student.double(), teacher.double(), backend="cpu")


def test_auto_backend_runs_float64_on_the_reference():
    student, teacher, _ = _inputs()
    loss = kdkernels.kd_loss(student.double(), teacher.double())
    assert loss.dtype == torch.float64


def test_validation_happens_before_any_kernel_runs(monkeypatch):
    import kdkernels.backends.cpu as cpu_backend

    def must_not_run(*args):
        raise AssertionError("backend called with invalid arguments")

    monkeypatch.setattr(cpu_backend, "rows", must_not_run)
    student, teacher, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        kdkernels.kd_loss(student.requires_grad_(), teacher, temperature=-1.0, backend="cpu")
