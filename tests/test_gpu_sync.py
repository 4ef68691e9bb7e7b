"""No host synchronisation per call on the GPU path: a GPU kernel's NaN report of bad input becomes a
device-side assertion (kdkernels._reports), not a host read of the row losses, unless strict checks
are asked for. Shown without a device by running the whole road on meta tensors, where any host read
(``.item()``, ``bool()``, ``tolist()``) raises, with a stand-in GPU backend; and on a GPU (skipped
without one) by capturing a compiled training step in a CUDA graph, which fails on any host
synchronisation."""

from __future__ import annotations

import types

import pytest
import torch

import kdkernels
from conftest import make_labels, make_pair
from kdkernels import _reports, backends


def _meta_gpu_backend(calls):
    """A backend module that reports every row as bad (NaN), like the GPU kernels, on meta tensors."""

    def rows(student, teacher, labels, grad_scale, cfg, compute_grad):
        calls.append("rows")
        nan = torch.full(student.shape[:1], float("nan"), device=student.device)
        return nan, (torch.empty_like(student) if compute_grad else None)

    def cakd_rows(student, teacher, labels, grad_scale, cfg, compute_grad):
        calls.append("cakd_rows")
        row_loss, grad = rows(student, teacher, labels, grad_scale, cfg, compute_grad)
        return row_loss, torch.empty(student.shape[0], 3, device=student.device), grad

    return types.SimpleNamespace(rows=rows, cakd_rows=cakd_rows, CHECKS_VALUES=True, BAD_INPUT_AS_NAN=True)


@pytest.fixture
def meta_gpu(monkeypatch):
    """Routes every call to the stand-in backend; records its calls and the device assertions."""
    calls, asserts = [], []
    fake = _meta_gpu_backend(calls)
    load = backends.load
    monkeypatch.setattr(backends, "resolve", lambda name, tensor: "triton")
    monkeypatch.setattr(backends, "load", lambda name: load(name) if name == "reference" else fake)
    assert_async = torch._assert_async

    def observed_assert(flag, message):
        asserts.append((flag.device.type, message))
        assert_async(flag, message)

    monkeypatch.setattr(torch, "_assert_async", observed_assert)
    return calls, asserts


def _meta_inputs():
    student, teacher = make_pair((6, 40))
    labels = make_labels((6,), 40, ignored=[2])
    return student.to("meta").requires_grad_(), teacher.to("meta"), labels.to("meta")


LOSSES = {
    "kd_loss": lambda s, t, y: kdkernels.kd_loss(s, t, y, temperature=2.0, ce_weight=0.5),
    "cakd_loss": lambda s, t, y: kdkernels.cakd_loss(s, t, y, groups="teacher_topk", k=3),
    "dkd_loss": lambda s, t, y: kdkernels.dkd_loss(s, t, y),
}


@pytest.mark.parametrize("loss_name", LOSSES)
def test_a_call_on_a_gpu_backend_checks_on_the_device_and_reads_nothing_on_the_host(meta_gpu, loss_name):
    calls, asserts = meta_gpu
    assert _reports.value_checks() == "device"
    student, teacher, labels = _meta_inputs()
    loss = LOSSES[loss_name](student, teacher, labels)  # a host read of a meta tensor would raise here
    loss.backward()
    assert calls and len(asserts) == 1
    assert asserts[0] == ("meta", _reports.DEVICE_CHECK_MESSAGE)
    assert student.grad is not None and student.grad.device.type == "meta"


def test_strict_checks_read_the_reports_on_the_host(meta_gpu):
    calls, asserts = meta_gpu
    student, teacher, labels = _meta_inputs()
    previous = kdkernels.set_value_checks("strict")
    try:
        with pytest.raises(RuntimeError, match="meta"):  # the host read, refused on meta tensors
            kdkernels.kd_loss(student, teacher, labels)
    finally:
        kdkernels.set_value_checks(previous)
    assert calls == ["rows"] and asserts == []


def test_reports_on_cpu_tensors_raise_the_value_error_in_either_mode(monkeypatch):
    # CPU tensors (the Triton interpreter): the read costs no synchronisation, the error names the argument
    student, teacher = make_pair((3, 10))
    student[1, 4] = float("nan")
    fake = _meta_gpu_backend([])
    monkeypatch.setattr(backends, "resolve", lambda name, tensor: "triton")
    monkeypatch.setattr(backends, "load", lambda name: fake)
    for mode in _reports.MODES:
        previous = kdkernels.set_value_checks(mode)
        try:
            with pytest.raises(ValueError, match="student_logits"):
                kdkernels.kd_loss(student.clone().requires_grad_(), teacher)
        finally:
            kdkernels.set_value_checks(previous)


def test_set_value_checks_validates_and_returns_the_previous_mode():
    with pytest.raises(ValueError, match="mode"):
        kdkernels.set_value_checks("sometimes")
    previous = kdkernels.set_value_checks("strict")
    try:
        assert kdkernels.set_value_checks("device") == "strict"
    finally:
        kdkernels.set_value_checks(previous)


# --- on a GPU ------------------------------------------------------------------------------------

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@gpu
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("compiled", (False, True), ids=("eager", "compiled"))
def test_training_step_captures_in_a_cuda_graph(loss_name, compiled):
    # Capture fails on any host synchronisation; the replayed step must give eager's loss and gradient.
    fn = LOSSES[loss_name]
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    student, teacher = make_pair((16, 1000), torch.bfloat16, seed=3)
    labels = make_labels((16,), 1000, ignored=[5])
    student, teacher, labels = student.cuda().requires_grad_(), teacher.cuda(), labels.cuda()
    expected = fn(student, teacher, labels)
    (expected_grad,) = torch.autograd.grad(expected, student)

    def step():
        loss = fn(student, teacher, labels)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for _ in range(3):
            student.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(student.grad, expected_grad, rtol=0, atol=0)
