"""fused_linear_sparse_kd_loss's memory plan: the gradients do not depend on the chunk size, and
a low-precision lm_head's float32 weight gradient, accumulated in two passes over the tokens
(kdkernels.ops.fused_linear._run_weight_halves), equals the one-pass accumulation while no
float32 buffer ever holds more than a quarter of the lm_head's rows."""

from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from kdkernels.backends import cpu_sparse
from kdkernels.ops import fused_linear

pytestmark = pytest.mark.skipif(not cpu_sparse.available(), reason="the loaded CPU build has no sparse-teacher kernel")


def _inputs(n: int, v: int, h: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * (3 / math.sqrt(h))).to(dtype)
    bias = (torch.randn(v, generator=gen) * 0.1).to(dtype)
    k = min(k, v)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    values = torch.log_softmax(torch.randn(n, k, generator=gen) * 2, -1) + math.log(0.9)
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, bias, ids, values, labels


def _loss_and_grads(inputs, chunk_size, reduction="mean", with_bias=True):
    hidden, weight, bias, ids, values, labels = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = kdkernels.fused_linear_sparse_kd_loss(
        leaves[0], leaves[1], ids, values, labels, student_bias=leaves[2] if with_bias else None,
        chunk_size=chunk_size, ce_weight=0.5, temperature=2.0, reduction=reduction, backend="cpu")
    # powers of two per row: the per-row scaling of a low-precision gradient is then exact
    weights = 2.0 ** torch.arange(loss.numel()).remainder(3).float() if reduction == "none" else None
    loss.backward(weights)
    return loss.detach(), [t.grad for t in (leaves if with_bias else leaves[:2])]


def _one_pass(plan, student, teacher, labels, grad_scale, wanted, row_weights):
    """_run_weight_halves replaced by the plain chunk loop: one float32 [V, H] accumulator."""
    grads = fused_linear._StudentGrads.allocate(student, wanted)
    return fused_linear._run_chunks(plan, student, teacher, labels, grad_scale, wanted, row_weights, grads=grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_do_not_depend_on_chunk_size(dtype):
    inputs = _inputs(n=29, v=203, h=24, k=7, dtype=dtype)
    loss, grads = _loss_and_grads(inputs, chunk_size=None)  # the planned chunk: all 29 rows at once
    # float32: summation order only; bfloat16: one rounding of the same float32 sums
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    for chunk in (1, 4, 11):
        other_loss, other_grads = _loss_and_grads(inputs, chunk_size=chunk)
        torch.testing.assert_close(other_loss, loss, rtol=1e-6, atol=1e-7)
        for name, a, b in zip(("hidden", "weight", "bias"), other_grads, grads):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}, chunk_size={chunk}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab", [1, 2, 7, 300])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_gradient_in_two_passes_equals_one_pass(dtype, vocab, reduction, monkeypatch):
    inputs = _inputs(n=23, v=vocab, h=20, k=5, dtype=dtype, seed=vocab)
    passes = []
    real = fused_linear._run_weight_halves

    def counted(*args):
        passes.append(1)
        return real(*args)

    monkeypatch.setattr(fused_linear, "_run_weight_halves", counted)
    loss, grads = _loss_and_grads(inputs, chunk_size=5, reduction=reduction)
    assert passes, "a low-precision lm_head's weight gradient takes the two-pass road"
    monkeypatch.setattr(fused_linear, "_run_weight_halves", _one_pass)
    one_loss, one_grads = _loss_and_grads(inputs, chunk_size=5, reduction=reduction)
    torch.testing.assert_close(loss, one_loss, rtol=0, atol=0)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, one_grads):
        assert a.dtype == dtype
        # the same float32 sums, rounded once; at most a last-bit difference from GEMM blocking
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=0, msg=lambda m: f"grad {name}: {m}")


def test_no_float32_buffer_of_the_whole_lm_head(monkeypatch):
    n, v, h = 40, 256, 32
    inputs = _inputs(n=n, v=v, h=h, k=6, dtype=torch.bfloat16)
    float32_rows = []
    real = fused_linear._empty

    def recording(shape, dtype, device):
        if dtype == torch.float32 and len(shape) == 2 and shape[1] == h:
            float32_rows.append(shape[0])
        return real(shape, dtype, device)

    monkeypatch.setattr(fused_linear, "_empty", recording)
    _, grads = _loss_and_grads(inputs, chunk_size=8, with_bias=False)
    assert grads[1].dtype == torch.bfloat16
    # only the second pass's buffer of the rows [q, V - V // 2): a quarter of the lm_head
    assert float32_rows == [v - v // 2 - (v - v // 2) // 2]
