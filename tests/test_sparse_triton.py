"""The Triton sparse-teacher kernel without a GPU: run by the Triton interpreter on tiny CPU tensors
against the float64 oracle of tests/test_sparse.py, and compiled for sm_90 ahead of time (Triton's
typing rules, which the interpreter does not check). The interpreter cases run in one child pytest
process with TRITON_INTERPRET=1 (it must be set before triton is imported), reported by
``test_interpreter_cases``; vocabulary tiles shrink to 16 columns so every row spans several."""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from test_sparse import MODES_AND_DIVERGENCES, check, matrix_inputs, sparse_teacher  # noqa: E402
from conftest import make_pair  # noqa: E402
from triton_interpreter import (INTERPRETING, compile_in_child, interpreter_case, parent_case,  # noqa: E402
                                run_interpreter_cases)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")



@parent_case
def test_interpreter_cases():
    run_interpreter_cases(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if INTERPRETING:
        from kdkernels.backends.triton import sparse

        monkeypatch.setattr(sparse, "MAX_BLOCK", 16)


@interpreter_case
@pytest.mark.parametrize("mode,divergence", MODES_AND_DIVERGENCES)
def test_every_mode_and_divergence_matches_oracle(mode, divergence):
    # padding, an all-padding row, an ignored row, the CE blend at T = 2 (own softmax), T != T_gen
    student, ids, values, labels = matrix_inputs(torch.float32)
    check(student, ids, values, labels, backend="triton", missing_mass=mode, divergence=divergence,
          temperature=2.0, beta=0.3, kd_weight=0.7, ce_weight=0.4, reduction="sum")


@interpreter_case
@pytest.mark.parametrize("teacher_kind", ["logits", "probs"])
@pytest.mark.parametrize("mode", ["renormalize", "support", "residual"])
def test_teacher_kinds_at_unit_temperature(teacher_kind, mode):
    if (teacher_kind, mode) == ("logits", "residual"):
        mode = "support"  # residual refuses logits
    student, ids, values, labels = matrix_inputs(torch.float32, teacher_kind)
    check(student, ids, values, labels, backend="triton", teacher_kind=teacher_kind, missing_mass=mode,
          divergence="forward_kl" if mode == "renormalize" else "reverse_kl", ce_weight=0.5)


@interpreter_case
@pytest.mark.parametrize("mode", ["residual", "support"])
def test_full_support_equals_dense(mode):
    student, teacher = make_pair((3, 20))
    ids, values = sparse_teacher(teacher, 20)
    sparse = kdkernels.sparse_kd_loss(student, ids, values, missing_mass=mode, divergence="jsd", backend="triton")
    dense = kdkernels.kd_loss(student, teacher, divergence="jsd", backend="reference")
    torch.testing.assert_close(sparse, dense, rtol=2e-5, atol=1e-6)


@interpreter_case
def test_bf16_and_in_place_fused_linear():
    student, ids, values, labels = matrix_inputs(torch.bfloat16)
    check(student, ids, values, labels, backend="triton", missing_mass="residual", ce_weight=0.3, temperature=1.5)
    hidden, weight = torch.randn(6, 8), torch.randn(30, 8)
    ids, values = sparse_teacher(torch.randn(6, 30) * 3, 4)
    a = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values, backend="triton", chunk_size=4,
                                              missing_mass="residual")
    b = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values, backend="reference", chunk_size=4,
                                              missing_mass="residual")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@interpreter_case
def test_masked_support_entry_raises():
    student, ids, values, _ = matrix_inputs(torch.float32)
    student = student.clone()
    student[0, ids[0, 0]] = -math.inf
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.sparse_kd_loss(student, ids, values, backend="triton")


_COMPILE_SCRIPT = textwrap.dedent("""
    from kdkernels.backends.triton import sparse
    from triton_interpreter import compile_for_gpu

    types = {"ids_ptr": "*i64", "values_ptr": "*fp32", "labels_ptr": "*i64", "row_loss_ptr": "*fp32",
             "grad_scale_ptr": "*fp32", "student_row_stride": "i64", "vocab": "i32", "k": "i32", "pad_id": "i64",
             "ignore_index": "i64"}
    # residual over log-probs (its float64 rest mass) with skew KL, and support over probs: between
    # them every branch of the kernel but renormalize's few lines
    for missing, kind, divergence in [(1, 0, 3), (2, 2, 0), (0, 1, 0)]:
        constexprs = {"DIVERGENCE": divergence, "KIND": kind, "MISSING": missing, "USE_CE": True,
                      "CE_REUSES_Q": False, "COMPUTE_GRAD": True, "BLOCK": sparse.MAX_BLOCK, "K_BLOCK": 64}
        compile_for_gpu(sparse._sparse_kd_fwd_kernel, types, constexprs, arch=90, num_warps=8)
    print("compiled")
""")



@parent_case
def test_kernel_compiles_for_sm90():
    compile_in_child(_COMPILE_SCRIPT)
