"""Every public loss under torch.autocast and torch.compile, and opcheck for every registered op.

- autocast: a loss called under ``torch.autocast`` gives the value and gradients of the same loss
  called without it on the inputs cast by hand as autocast casts them: the lm_head inputs of
  ``fused_linear_kd_loss`` (hidden states, weights, biases) to the autocast dtype, as for a
  matmul; a loss's logits to float32, as for a loss (kdkernels' loss math is float32 for any
  input dtype, so that cast changes nothing but the memory).
- compile: ``torch._dynamo.explain`` finds no graph break in a step calling each public loss,
  and ``torch.compile(fullgraph=True)`` of the step gives eager's value and gradients.
- opcheck: every op of the ``kdkernels`` namespace passes ``torch.library.opcheck`` (here, or in
  the test file named in OPCHECKED_ELSEWHERE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import pytest
import torch

import kdkernels
from conftest import make_labels, make_pair
from kdkernels.integrations.trl import generalized_jsd_loss

V, N, H = 67, 12, 16  # vocabulary, tokens, hidden size: small and odd


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


@dataclass
class Case:
    """A loss call: ``loss(**inputs)``; gradients are taken for the inputs that require grad.
    ``autocast_casts``: input name -> the dtype autocast gives it ("autocast": the autocast
    dtype; torch.float32: a loss input). Missing names are left as they are."""

    loss: Callable
    inputs: Dict[str, object]
    autocast_casts: Dict[str, object]


def _logits_inputs(student_dtype=torch.bfloat16, teacher_dtype=torch.float32, seed=0):
    student, teacher = make_pair((N, V), torch.float32, seed=seed)
    labels = make_labels((N,), V, seed=seed, ignored=slice(0, 3))
    return dict(student_logits=leaf(student.to(student_dtype)), teacher_logits=teacher.to(teacher_dtype),
                labels=labels)


def _lm_head_inputs(hidden_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(student_hidden=leaf(torch.randn(N, H, generator=gen).to(hidden_dtype)),
                student_weight=leaf(torch.randn(V, H, generator=gen) / H ** 0.5),
                teacher_hidden=torch.randn(N, 2 * H, generator=gen).to(hidden_dtype),
                teacher_weight=torch.randn(V - 5, 2 * H, generator=gen) / H ** 0.5,  # a shorter teacher vocabulary
                labels=make_labels((N,), V, seed=seed, ignored=slice(2, 4)),
                student_bias=leaf(torch.randn(V, generator=gen) * 0.1))


LOGITS_CASTS = {"student_logits": torch.float32, "teacher_logits": torch.float32}
LM_HEAD_CASTS = {name: "autocast" for name in ("student_hidden", "student_weight", "teacher_hidden",
                                                 "teacher_weight", "student_bias", "teacher_bias")}


def _fused_linear(**inputs):
    return kdkernels.fused_linear_kd_loss(**inputs, temperature=2.0, kd_weight=0.5, ce_weight=0.5)


def _fused_linear_teacher_logits(**inputs):
    return kdkernels.fused_linear_kd_loss(**inputs, temperature=2.0, divergence="reverse_kl")


def _teacher_logits_inputs():
    inputs = _lm_head_inputs(hidden_dtype=torch.float32, seed=3)
    del inputs["teacher_hidden"], inputs["teacher_weight"]
    inputs["teacher_logits"] = make_pair((N, V), torch.bfloat16, seed=3)[1]
    return inputs


def _feature_alignment(**inputs):
    return kdkernels.feature_alignment_loss(**inputs, kind="mse")


def _feature_inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(student_hidden=leaf(torch.randn(2, 5, H, generator=gen)),
                teacher_hidden=torch.randn(2, 5, 2 * H, generator=gen),
                projection=leaf(torch.randn(2 * H, H, generator=gen) / H ** 0.5))


def _attention_inputs():
    gen = torch.Generator().manual_seed(6)
    return dict(student_features=leaf(torch.randn(2, 9, 4, generator=gen)),
                teacher_features=torch.randn(2, 9, 8, generator=gen))


CASES: Dict[str, Callable[[], Case]] = {
    "kd_loss bf16 student, fp32 teacher": lambda: Case(
        lambda **i: kdkernels.kd_loss(**i, temperature=2.0, ce_weight=0.5), _logits_inputs(), LOGITS_CASTS),
    "kd_loss fp32 student, bf16 teacher": lambda: Case(
        lambda **i: kdkernels.kd_loss(**i, divergence="jsd", beta=0.3),
        _logits_inputs(torch.float32, torch.bfloat16, seed=1), LOGITS_CASTS),
    "fused_linear_kd_loss bf16 hidden, fp32 lm_heads": lambda: Case(_fused_linear, _lm_head_inputs(),
                                                                  LM_HEAD_CASTS),
    "fused_linear_kd_loss fp32 hidden, fp32 lm_heads": lambda: Case(
        _fused_linear, _lm_head_inputs(hidden_dtype=torch.float32, seed=2), LM_HEAD_CASTS),
    "fused_linear_kd_loss bf16 teacher_logits": lambda: Case(_fused_linear_teacher_logits, _teacher_logits_inputs(),
                                                            LM_HEAD_CASTS),
    "cakd_loss": lambda: Case(lambda **i: kdkernels.cakd_loss(**i, groups="teacher_topk", k=3, temperature=2.0),
                              _logits_inputs(seed=4), LOGITS_CASTS),
    "dkd_loss": lambda: Case(lambda **i: kdkernels.dkd_loss(**i), _logits_inputs(seed=5), LOGITS_CASTS),
    "generalized_jsd_loss (TRL)": lambda: Case(lambda student_logits, teacher_logits, labels: generalized_jsd_loss(
        student_logits, teacher_logits, labels, beta=0.5, temperature=2.0), _logits_inputs(seed=6), LOGITS_CASTS),
    "feature_alignment_loss": lambda: Case(_feature_alignment, _feature_inputs(),
                                           {"student_hidden": "autocast", "projection": "autocast",
                                            "teacher_hidden": torch.float32}),
    "attention_transfer_loss": lambda: Case(lambda **i: kdkernels.attention_transfer_loss(**i), _attention_inputs(),
                                            {"student_features": torch.float32, "teacher_features": torch.float32}),
}


def loss_and_grads(case: Case, inputs: Dict[str, object]) -> Tuple[torch.Tensor, ...]:
    """(loss, d loss / d each leaf of case.inputs that requires grad), through `inputs`."""
    leaves = [v for v in case.inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    loss = case.loss(**inputs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def cast_by_hand(case: Case, dtype: torch.dtype) -> Dict[str, object]:
    """The inputs as autocast to `dtype` would hand them to the loss's operations."""
    inputs = dict(case.inputs)
    for name, target in case.autocast_casts.items():
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            inputs[name] = value.to(dtype if target == "autocast" else target)
    return inputs


def _on(device: str, case: Case) -> Case:
    case.inputs = {k: (leaf(v.to(device)) if v.requires_grad else v.to(device)) if isinstance(v, torch.Tensor)
                   else v for k, v in case.inputs.items()}
    return case


def check_autocast(name: str, device: str, dtype: torch.dtype) -> None:
    case = _on(device, CASES[name]())
    with torch.autocast(device, dtype=dtype):
        under_autocast = loss_and_grads(case, case.inputs)
    by_hand = loss_and_grads(case, cast_by_hand(case, dtype))
    for what, got, expected in zip(("loss", *[f"grad {i}" for i in range(len(by_hand) - 1)]), under_autocast,
                                   by_hand):
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
        torch.testing.assert_close(got, expected, msg=lambda m: f"{name}, {what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_cpu_bf16_equals_inputs_cast_by_hand(name):
    check_autocast(name, "cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("cakd", "dkd"))])
def test_autocast_cuda_equals_inputs_cast_by_hand(name, dtype):
    check_autocast(name, "cuda", dtype)


def test_fused_linear_kd_loss_without_autocast_still_refuses_mixed_dtypes():
    inputs = _lm_head_inputs()
    with pytest.raises(TypeError, match="student_weight"):
        _fused_linear(**inputs)


# --- torch.compile --------------------------------------------------------------------------


# every case but the one that mixes lm_head dtypes, which only autocast allows
@pytest.mark.parametrize("name", [n for n in CASES if "bf16 hidden" not in n])
def test_compiled_step_has_no_graph_break_and_matches_eager(name):
    case = CASES[name]()
    explanation = torch._dynamo.explain(case.loss)(**case.inputs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = Case(torch.compile(case.loss, fullgraph=True, backend="aot_eager"), case.inputs, {})
    for got, expected in zip(loss_and_grads(compiled, case.inputs), loss_and_grads(case, case.inputs)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["kd_loss fp32 student, bf16 teacher", "fused_linear_kd_loss bf16 teacher_logits"])
def test_inductor_compiled_step_matches_eager(name):
    case = CASES[name]()
    torch._dynamo.reset()
    compiled = Case(torch.compile(case.loss, fullgraph=True), case.inputs, {})
    for got, expected in zip(loss_and_grads(compiled, case.inputs), loss_and_grads(case, case.inputs)):
        torch.testing.assert_close(got, expected)


def test_compiled_step_under_autocast():
    case = CASES["fused_linear_kd_loss bf16 hidden, fp32 lm_heads"]()
    torch._dynamo.reset()
    compiled = Case(torch.compile(case.loss, fullgraph=True, backend="aot_eager"), case.inputs, {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(compiled, case.inputs)
        expected = loss_and_grads(case, case.inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_torch_export_of_a_module_computing_the_loss():
    class Distill(torch.nn.Module):
        def forward(self, student_logits, teacher_logits, labels):
            return kdkernels.kd_loss(student_logits, teacher_logits, labels, temperature=2.0, ce_weight=0.5)

    inputs = _logits_inputs(torch.float32, torch.float32, seed=7)
    args = (inputs["student_logits"].detach(), inputs["teacher_logits"], inputs["labels"])
    exported = torch.export.export(Distill(), args)
    torch.testing.assert_close(exported.module()(*args), Distill()(*args))


# --- opcheck ----------------------------------------------------------------------------------

# ops whose opcheck tests live elsewhere
OPCHECKED_ELSEWHERE = {
    "kd_loss_fwd": "tests/test_kd_loss.py",
    "kd_loss_fwd_inplace_": "tests/test_kd_loss.py",
    "cakd_loss_fwd": "tests/test_cakd.py",
    "sparse_kd_loss_fwd": "tests/test_sparse.py",
    "sparse_kd_loss_fwd_inplace_": "tests/test_sparse.py",
}
# the other ops: (args, opcheck's test_utils or None for all of them)
OPCHECK_HERE = {
    # uninitialised memory: eager and compiled outputs cannot be compared
    "empty_cached": (([3, 5], torch.float32), ("test_schema", "test_autograd_registration", "test_faketensor")),
    "release_cached_buffers": ((), None),
    "cached_buffer_bytes": ((), None),
    # a str result, which opcheck's compiled-vs-eager comparison cannot compare
    "build_info": ((), ("test_schema", "test_autograd_registration", "test_faketensor")),
    "parallel_threads_used": ((4,), None),
    # the value checks of a loss on logits, as an op that torch.compile keeps in the graph
    "check_logit_values": ((*make_pair((5, 37), seed=9), torch.tensor([0, 3, -100, 36, 2]), -100, True, 0.5),
                           None),
    # the fused lm_head's float32 accumulation of a bf16 weight gradient (a [6, 4] weight, 5 tokens)
    "addmm_widening_": ((torch.randn(6, 4), torch.randn(5, 6).bfloat16().t(), torch.randn(5, 4).bfloat16(), 1.0,
                         0.5), None),
    # a bool result
    "widening_gemm_available": ((torch.bfloat16,), ("test_schema", "test_autograd_registration", "test_faketensor")),
}


def kdkernels_ops():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("kdkernels::"))


def test_every_registered_op_has_an_opcheck():
    if not kdkernels.backend_info().get("cpu_build"):
        pytest.skip("the compiled kernels are not loaded, so no op is registered")
    unchecked = set(kdkernels_ops()) - set(OPCHECKED_ELSEWHERE) - set(OPCHECK_HERE)
    assert not unchecked, f"ops without an opcheck test: {sorted(unchecked)} (add them to OPCHECK_HERE)"


@pytest.mark.parametrize("op", sorted(OPCHECK_HERE))
def test_opcheck(op):
    if op not in kdkernels_ops():
        pytest.skip(f"kdkernels::{op} is not registered in this build")
    if op == "addmm_widening_" and not torch.ops.kdkernels.widening_gemm_available(torch.bfloat16):
        pytest.skip("this torch's BLAS has no GEMM of bf16 operands into float32")
    args, test_utils = OPCHECK_HERE[op]
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    torch.library.opcheck(getattr(torch.ops.kdkernels, op), args, **kwargs)
