"""The fused lm_head loss on the GPU path.

Precision contract of a bfloat16 / float16 lm_head: the chunk logits come out of the GEMM in
float32 (float32 accumulation and output, torch.addmm / torch.mm with out_dtype), so the loss sees
logits that were never rounded to the lm_head's dtype. CPU BLAS has no such GEMM, so the GPU path
is shown on CPU tensors with the GEMMs observed (and run in float32 where they are asked for float32
output); its gradient error against float64 is compared with that of the chunk logits rounded to
the lm_head's dtype, the CPU path. On a GPU (skipped without one) the same comparison runs for
real, and the CUDA kernel's gradient written in place over the chunk logits equals its separate
gradient."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from conftest import make_labels, make_logits
from kdkernels.ops import fused_linear

H, V, N = 64, 1000, 48


def observe_gpu_gemms(monkeypatch):
    """The GPU code path on CPU tensors: float32 chunk logits for low-precision lm_heads, and the
    GEMMs that ask for an out_dtype recorded as (name, out_dtype, out dtype, input dtype)."""
    calls = []
    mm, addmm = torch.mm, torch.addmm

    def observed_mm(a, b, *out_dtype, out=None):
        if not out_dtype:
            return mm(a, b, out=out)
        calls.append(("mm", out_dtype[0], out.dtype, a.dtype))
        return mm(a.float(), b.float(), out=out)

    def observed_addmm(c, a, b, *out_dtype, beta=1, alpha=1, out=None):
        if not out_dtype:
            return addmm(c, a, b, beta=beta, alpha=alpha, out=out)
        calls.append(("addmm", out_dtype[0], out.dtype, a.dtype))
        return addmm(c.float(), a.float(), b.float(), beta=beta, alpha=alpha, out=out)

    monkeypatch.setattr(fused_linear, "float32_chunk_logits",
                        lambda device, dtype: dtype in (torch.bfloat16, torch.float16))
    monkeypatch.setattr(torch, "mm", observed_mm)
    monkeypatch.setattr(torch, "addmm", observed_addmm)
    return calls


@pytest.fixture
def gpu_gemms(monkeypatch):
    return observe_gpu_gemms(monkeypatch)


def _lm_heads(dtype, with_bias):
    hidden = make_logits((N, H), dtype, seed=1, scale=1.0)
    weight = make_logits((V, H), dtype, seed=2, scale=0.6)
    teacher_hidden = make_logits((N, H), dtype, seed=3, scale=1.0)
    teacher_weight = make_logits((V, H), dtype, seed=4, scale=0.6)
    bias = make_logits((V,), dtype, seed=5, scale=1.0) if with_bias else None
    return hidden, weight, bias, teacher_hidden, teacher_weight


def _loss_and_grads(hidden, weight, bias, teacher_hidden, teacher_weight, labels, backend, **options):
    params = [p.detach().clone().requires_grad_() if p is not None else None for p in (hidden, weight, bias)]
    loss = kdkernels.fused_linear_kd_loss(params[0], params[1], teacher_hidden, teacher_weight, labels,
                                          student_bias=params[2], teacher_bias=bias, backend=backend,
                                          chunk_size=16, **options)
    loss.backward()
    return loss.detach(), [p.grad for p in params if p is not None]


@pytest.mark.parametrize("with_bias", (False, True), ids=("no_bias", "bias"))
@pytest.mark.parametrize("logit_scale", (1.0, 0.5))
def test_gpu_path_asks_the_gemm_for_float32_chunk_logits(gpu_gemms, with_bias, logit_scale):
    heads = _lm_heads(torch.bfloat16, with_bias)
    labels = make_labels((N,), V, ignored=[3])
    loss, grads = _loss_and_grads(*heads, labels, "cpu", temperature=2.0, ce_weight=0.3, logit_scale=logit_scale)
    name = "addmm" if with_bias else "mm"
    # the student's and the teacher's lm_head, every chunk: float32 out from bfloat16 inputs
    assert gpu_gemms == [(name, torch.float32, torch.float32, torch.bfloat16)] * (2 * (N // 16))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(loss)


def _gradient_errors(heads, labels, options, backend="cpu"):
    """Max |error| against float64 of the hidden-state and weight gradients."""
    _, oracle = _loss_and_grads(*[None if t is None else t.double() for t in heads], labels, "reference", **options)
    _, grads = _loss_and_grads(*heads, labels, backend, **options)
    return [float((g.double() - o).abs().max()) for g, o in zip(grads, oracle)]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_float32_chunk_logits_cut_the_gradient_error_of_rounded_logits(monkeypatch, dtype):
    # The logits of a trained lm_head reach tens: rounding them to bfloat16 moves each by up to
    # 2^-8 of that, which softmax turns into relative errors of the probabilities.
    heads = _lm_heads(dtype, True)
    heads = (heads[0] * 4, *heads[1:3], heads[3] * 4, heads[4])
    labels = make_labels((N,), V, ignored=[3])
    options = dict(temperature=1.0, ce_weight=0.5)
    rounded = _gradient_errors(heads, labels, options)  # the CPU path: chunk logits in the lm_head's dtype
    with monkeypatch.context() as patch:
        observe_gpu_gemms(patch)
        float32 = _gradient_errors(heads, labels, options)  # the GPU path: float32 chunk logits
    for name, wide, narrow in zip(("hidden", "weight"), float32, rounded):
        assert wide <= 0.25 * narrow, f"{name} gradient: error {wide:.3e} with float32 logits vs {narrow:.3e}"


# --- on a GPU ------------------------------------------------------------------------------------

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def _require(backend):
    from kdkernels import backends

    if not backends.usable(backend, torch.zeros(1, device="cuda")):
        pytest.skip(f"backend {backend!r} unavailable in this process")


@gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_on_a_gpu_float32_chunk_logits_cut_the_gradient_error_of_rounded_logits(monkeypatch, backend):
    _require(backend)
    heads = [None if t is None else t.cuda() for t in _lm_heads(torch.bfloat16, True)]
    heads = (heads[0] * 4, *heads[1:3], heads[3] * 4, heads[4])
    labels = make_labels((N,), V, ignored=[3]).cuda()
    options = dict(temperature=1.0, ce_weight=0.5)
    float32 = _gradient_errors(heads, labels, options, backend)
    with monkeypatch.context() as patch:
        patch.setattr(fused_linear, "float32_chunk_logits", lambda device, dtype: False)
        rounded = _gradient_errors(heads, labels, options, backend)
    for name, wide, narrow in zip(("hidden", "weight"), float32, rounded):
        assert wide <= 0.25 * narrow, f"{name} gradient: error {wide:.3e} with float32 logits vs {narrow:.3e}"


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_gradient_in_place_equals_the_separate_gradient(dtype):
    from kdkernels import _checks, backends

    _require("cuda")
    cuda_backend = backends.load("cuda")
    student = make_logits((8, 5000), dtype, seed=6).cuda()
    teacher = make_logits((8, 5000), dtype, seed=7).cuda()
    labels = make_labels((8,), 5000, ignored=[2]).cuda()
    cfg = _checks.make_config(divergence="forward_kl", temperature=2.0, beta=0.5, kd_weight=1.0, ce_weight=0.4,
                              scale_by_t2=True, ignore_index=-100, has_labels=True)
    scale = torch.tensor(0.25, device="cuda")
    expected_loss, expected_grad = cuda_backend.rows(student, teacher, labels, scale, cfg, True)
    buffer = student.clone()
    row_loss = cuda_backend.rows_inplace(buffer, teacher, labels, scale, cfg)
    torch.testing.assert_close(row_loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(buffer, expected_grad, rtol=0, atol=0)

