"""The Triton CAKD / DKD kernel without a GPU: run by the Triton interpreter on tiny CPU tensors
against the float64 reference at every grouping rule, dtype and reduction (the tolerance rule of
tests/conftest.py), plus ties, masking, bad values and the dispatch; and compiled for sm_80 /
sm_90 ahead of time (Triton's typing rules and register allocation, which the interpreter does not
check); on a GPU (skipped without one) every rule also runs at its real launch shape. The
interpreter cases run in one child pytest process (tests/triton_interpreter.py);
``TRITON_INTERPRET=1 pytest tests/test_cakd_triton.py`` shows each on its own, with vocabulary tiles
shrunk to 16 columns so every row spans several, with a ragged last one."""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from conftest import make_labels, make_pair  # noqa: E402
from test_cakd import WEIGHTS, check_against_reference, run_loss, with_clear_mass  # noqa: E402
from triton_interpreter import (INTERPRETING, compile_in_child, interpreter_case, parent_case,  # noqa: E402
                                run_interpreter_cases)

# The interpreter evaluates both sides of tl.where with numpy, which warns about the inf - inf or
# log(0) that the kernel then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Every grouping rule; top-k = 1 takes the one-pass maximum, other k the bisection; k >= V puts
# every class in S (W empty).
RULES = [
    ("label", {}),
    ("teacher_top1", {}),
    ("teacher_topk", {"k": 3}),
    ("teacher_topk", {"k": 30}),
    ("teacher_topk", {"k": 10_000}),
    ("teacher_mass", {"mass": 0.3}),
    ("teacher_mass", {"mass": 0.9}),
]
RULE_IDS = [f"{g}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for g, o in RULES]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@parent_case
def test_interpreter_cases():
    run_interpreter_cases(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if INTERPRETING:
        from kdkernels.backends.triton import cakd

        monkeypatch.setattr(cakd, "MAX_BLOCK", 16)


def check(student, teacher, labels=None, **options):
    return check_against_reference(student, teacher, labels, backend="triton", **options)


# --- values and gradients against the float64 reference -------------------------------------------

@interpreter_case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
def test_every_rule_and_dtype_matches_reference(groups, extra, dtype):
    student, teacher = make_pair((5, 45), dtype, seed=1)
    labels = make_labels((5,), 45, seed=1, ignored=[3])
    extra = with_clear_mass(extra, teacher, 2.0)
    result, grad = check(student, teacher, labels, groups=groups, temperature=2.0, reduction="none", **extra,
                         **WEIGHTS)
    assert result.loss[3] == 0 and (grad[3] == 0).all() and grad.dtype == dtype


@interpreter_case
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
def test_every_rule_and_reduction_with_incoming_gradient_matches_reference(groups, extra, reduction):
    student, teacher = make_pair((2, 3, 37), seed=2)
    labels = make_labels((2, 3), 37, seed=2, ignored=(0, 2))
    shape = (2, 3) if reduction == "none" else ()
    grad_output = torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.5
    extra = with_clear_mass(extra, teacher, 0.5)
    result, _ = check(student, teacher, labels, groups=groups, temperature=0.5, reduction=reduction,
                      grad_output=grad_output, scale_by_t2=reduction != "sum", **extra, **WEIGHTS)
    assert result.loss.shape == shape


@interpreter_case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dkd_matches_reference(dtype):
    student, teacher = make_pair((4, 40), dtype, seed=4)
    labels = make_labels((4,), 40, seed=4, ignored=[1])
    check(student, teacher, labels, fn=kdkernels.dkd_loss, alpha=0.5, beta=3.0, temperature=2.0)


@interpreter_case
def test_mixed_student_and_teacher_dtypes():
    student, _ = make_pair((3, 33), torch.bfloat16, seed=5)
    _, teacher = make_pair((3, 33), torch.float32, seed=5)
    check(student, teacher, groups="teacher_topk", k=4, **WEIGHTS)


@interpreter_case
@pytest.mark.parametrize("groups,extra", [RULES[1], RULES[2], RULES[5]], ids=[RULE_IDS[1], RULE_IDS[2], RULE_IDS[5]])
def test_teacher_mass_weights_give_forward_kl(groups, extra):
    student, teacher = make_pair((3, 40), seed=6)
    result = kdkernels.cakd_loss(student, teacher, groups=groups, scd_weight="teacher_mass",
                                 wcd_weight="teacher_mass", temperature=2.0, backend="triton", **extra)
    expected = kdkernels.kd_loss(student.double(), teacher.double(), temperature=2.0, backend="reference")
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


# --- selection: ties, masking, underflow ------------------------------------------------------------

@interpreter_case
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("groups,extra", [("teacher_top1", {}), ("teacher_topk", {"k": 3}),
                                          ("teacher_topk", {"k": 7}), ("teacher_mass", {"mass": 0.35})],
                         ids=("top1", "top3", "top7", "mass"))
def test_ties_go_to_the_lower_class_index(groups, extra, dtype):
    # whole rows of tied logits, tied maxima across a tile boundary, -0 beside +0
    V = 50
    teacher = torch.zeros(4, V, dtype=dtype)
    teacher[1, 10:20] = 1.0
    teacher[2] = (torch.arange(V) % 5).to(dtype)
    teacher[3, ::2] = -0.0
    teacher[3, 40:] = -1.0
    student, _ = make_pair((4, V), dtype, seed=7)
    result, _ = check(student, teacher, groups=groups, reduction="none", **extra, **WEIGHTS)
    assert torch.isfinite(result.loss).all()


@interpreter_case
@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
def test_masked_vocab_and_fully_masked_rows(groups, extra):
    student, teacher = make_pair((6, 41), seed=8)
    labels = make_labels((6,), 41, seed=8, ignored=[4])
    masked = torch.rand(6, 41, generator=torch.Generator().manual_seed(9)) < 0.3
    masked[1] = True  # row masked entirely: loss 0
    masked[2, 5:] = True  # few live classes
    masked[3, labels[3]] = True  # the label masked (S empty under the label rule)
    student = student.masked_fill(masked, -math.inf)
    teacher = teacher.masked_fill(masked, -math.inf)
    extra = with_clear_mass(extra, teacher, 2.0)
    result, grad = check(student, teacher, labels, groups=groups, temperature=2.0, reduction="none", **extra,
                         **WEIGHTS)
    assert result.loss[1] == 0 and (grad[1] == 0).all() and (grad[masked] == 0).all()


@interpreter_case
@pytest.mark.parametrize("groups,extra", [RULES[1], RULES[3], RULES[5]], ids=[RULE_IDS[1], RULE_IDS[3], RULE_IDS[5]])
def test_group_whose_mass_underflows(groups, extra):
    student, teacher = make_pair((3, 40), seed=10)
    teacher[:, 7] += 400.0
    student[:, 7] += 400.0
    check(student, teacher, groups=groups, temperature=1.0, **extra, **WEIGHTS)


@interpreter_case
def test_teacher_row_entirely_masked_gives_zero_and_teacher_masking_one_group_keeps_bcd():
    student, teacher = make_pair((4, 30), seed=11)
    labels = torch.tensor([1, 2, 3, 4])
    teacher[torch.arange(4), labels] = -math.inf  # P_S = 0: SCD is 0, BCD pushes the student out of S
    teacher[2] = -math.inf  # no teacher distribution: loss 0, gradient 0
    result, grad = check(student, teacher, labels, groups="label", reduction="none", **WEIGHTS)
    assert (result.scd == 0).all() and result.loss[2] == 0 and (grad[2] == 0).all()


@interpreter_case
def test_all_ignored_batch_gives_zero():
    student, teacher = make_pair((3, 20), seed=12)
    result, grad = run_loss(student, teacher, torch.full((3,), -100), groups="teacher_topk", k=3,
                            backend="triton")
    assert all(float(value.detach()) == 0.0 for value in result) and (grad == 0).all()


# --- bad values: NaN rows in the kernel, the ValueError at the call ----------------------------------

@interpreter_case
@pytest.mark.parametrize("case", ("whole_row", "strong_class", "weak_class"))
def test_student_neg_inf_where_the_teacher_has_mass_is_a_nan_row_and_raises(case):
    from kdkernels._config import CAKDConfig
    from kdkernels.backends.triton import cakd

    student, teacher = make_pair((3, 30), seed=13)
    if case == "whole_row":
        student[1] = -math.inf
    elif case == "strong_class":
        student[1, int(teacher[1].argmax())] = -math.inf
    else:
        student[1, int(teacher[1].argmin())] = -math.inf
    row_loss, components, grad = cakd.cakd_rows(student, teacher, None, torch.tensor(1.0),
                                                CAKDConfig(groups="teacher_top1"), True)
    # (a +inf group KL shows only once the gradient pass has summed it: the loss is the report)
    assert torch.isnan(row_loss[1]) and torch.isnan(components[1]).all()
    assert torch.isfinite(row_loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.cakd_loss(student.requires_grad_(), teacher, groups="teacher_top1", backend="triton")
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.dkd_loss(student, teacher, teacher.argmax(-1), backend="triton")


def _set(tensor_index, index, value):
    return lambda inputs: inputs[tensor_index].__setitem__(index, value)


BAD_VALUES = {  # name: (what it does to (student, teacher, labels), the argument the error names)
    "nan_teacher": (_set(1, (1, 17), math.nan), "teacher_logits"),
    "inf_teacher": (_set(1, (1, 4), math.inf), "teacher_logits"),
    "nan_student": (_set(0, (1, 0), math.nan), "student_logits"),
    "label_too_large": (_set(2, 1, 20), "labels"),
}


@interpreter_case
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_bad_values_raise_naming_the_argument(bad):
    spoil, argument = BAD_VALUES[bad]
    inputs = (*make_pair((3, 20), seed=14), torch.tensor([1, 2, 3]))
    spoil(inputs)
    student, teacher, labels = inputs
    with pytest.raises(ValueError, match=argument):
        kdkernels.cakd_loss(student.requires_grad_(), teacher, labels, groups="label", backend="triton")


# --- dispatch -------------------------------------------------------------------------------------

@interpreter_case
def test_route_runs_the_triton_kernel_not_the_reference():
    from kdkernels.ops.route import CAKD, Route

    student, _ = make_pair((2, 5))
    route = Route(CAKD, "triton", student)
    assert route.name == "triton" and route.module.cakd_rows.__module__ == "kdkernels.backends.triton.cakd"


@interpreter_case
def test_without_gradient_gives_the_same_losses():
    from kdkernels._config import CAKDConfig
    from kdkernels.backends.triton import cakd

    student, teacher = make_pair((4, 37), seed=15)
    cfg = CAKDConfig(groups="teacher_mass", mass=0.5, temperature=2.0)
    with_grad = cakd.cakd_rows(student, teacher, None, torch.tensor(0.25), cfg, True)
    without = cakd.cakd_rows(student, teacher, None, torch.tensor(0.25), cfg, False)
    assert without[2] is None
    torch.testing.assert_close(without[0], with_grad[0], rtol=0, atol=0)
    torch.testing.assert_close(without[1], with_grad[1], rtol=0, atol=0)


# --- ahead-of-time compilation for real GPUs -----------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    from kdkernels.backends.triton import cakd
    from triton_interpreter import compile_for_gpu

    types = {"labels_ptr": "*i64", "row_loss_ptr": "*fp32", "components_ptr": "*fp32", "grad_scale_ptr": "*fp32",
             "student_row_stride": "i64", "teacher_row_stride": "i64", "vocab": "i32", "ignore_index": "i32",
             "scd_teacher_mass": "i32", "wcd_teacher_mass": "i32"}
    block, num_warps = cakd.launch_shape(128256)
    for arch in (80, 90):
        for rule in (0, 1, 2):
            compile_for_gpu(cakd._cakd_fwd_kernel, types,
                            {"RULE": rule, "HAS_LABELS": True, "COMPUTE_GRAD": True, "BLOCK": block,
                             "SEL_BLOCK": cakd.selection_block(block)},
                            arch=arch, num_warps=num_warps)
    print("compiled")
""")



@parent_case
def test_kernel_compiles_for_sm80_and_sm90():
    compile_in_child(_COMPILE_SCRIPT)


# --- on a GPU ------------------------------------------------------------------------------------

@parent_case
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
def test_on_a_gpu_every_rule_matches_reference(groups, extra):
    # bf16 (ties are frequent), 1271 columns: several tiles of the real launch shape below the largest
    student, teacher = (t.cuda() for t in make_pair((41, 1271), torch.bfloat16, seed=21))
    labels = make_labels((41,), 1271, seed=21, ignored=[0, 40]).cuda()
    extra = with_clear_mass(extra, teacher, 2.0)
    check(student, teacher, labels, groups=groups, temperature=2.0, **extra, **WEIGHTS)

