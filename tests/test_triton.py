"""The Triton kd_loss kernels, without a GPU: run by the Triton interpreter on tiny CPU tensors
against the float64 reference (values and gradients), and compiled for sm_80 / sm_90 ahead of time
(which checks what the interpreter does not: Triton's typing rules and register allocation).

The interpreter cases run in one child pytest process with TRITON_INTERPRET=1
(tests/triton_interpreter.py): ``test_interpreter_cases`` reports its outcome. Running
``TRITON_INTERPRET=1 pytest tests/test_triton.py`` shows each case on its own. Vocabulary tiles
are shrunk to 16 columns so that every shape spans several tiles, with a ragged last one.
"""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from conftest import (DIVERGENCE_NAMES, STUDENT_NEG_INF_CASES, check_against_reference, loss_and_grad,  # noqa: E402
                      check_masked_teacher_row, make_labels, make_logits, make_pair, student_neg_inf_case)
from triton_interpreter import (INTERPRETING, compile_in_child, interpreter_case, parent_case,  # noqa: E402
                                run_interpreter_cases)

# The interpreter evaluates both sides of tl.where with numpy, which warns about the inf - inf or
# log(0) that the kernel then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

TILE = 16


@parent_case
def test_interpreter_cases():
    run_interpreter_cases(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if INTERPRETING:
        from kdkernels.backends.triton import kd_loss

        monkeypatch.setattr(kd_loss, "MAX_BLOCK", TILE)


@pytest.fixture
def interpreted():
    """The Triton backend module, its kernels interpreted."""
    from kdkernels.backends.triton import kd_loss

    return kd_loss


def check(student, teacher, labels=None, **kwargs):
    return check_against_reference(student, teacher, labels, backend="triton", **kwargs)


# --- values and gradients against the float64 reference -------------------------------------------

@interpreter_case
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_every_divergence_matches_reference(divergence, temperature):
    student, teacher = make_pair((4, 37), seed=1)
    check(student, teacher, divergence=divergence, temperature=temperature, beta=0.3)


@interpreter_case
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", (1.0, 2.0), ids=("ce_shares_softmax", "ce_own_softmax"))
def test_ce_blend_and_ignored_rows_match_reference(divergence, temperature):
    student, teacher = make_pair((5, 37), seed=2)
    labels = make_labels((5,), 37, ignored=[1, 3])
    result = check(student, teacher, labels, divergence=divergence, temperature=temperature,
                   kd_weight=0.7, ce_weight=0.6, reduction="none", grad_output=torch.randn(5))
    assert (result.loss[[1, 3]] == 0).all() and (result.grad[[1, 3]] == 0).all()


@interpreter_case
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
def test_reductions_and_incoming_gradient_match_reference(reduction):
    student, teacher = make_pair((2, 3, 29), seed=3)
    labels = make_labels((2, 3), 29, ignored=(0, 2))
    grad_output = torch.randn(2, 3) if reduction == "none" else torch.tensor(3.7)
    check(student, teacher, labels, grad_output=grad_output, reduction=reduction, temperature=2.0,
          ce_weight=0.2, scale_by_t2=reduction != "sum")


@interpreter_case
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_masked_vocab_columns_match_reference(divergence):
    student, teacher = make_pair((3, 40), seed=4)
    columns = [0, 15, 16, 17, 31, 39]  # first, last, and both sides of a tile boundary
    student[:, columns] = -math.inf
    teacher[:, columns] = -math.inf
    if divergence != "reverse_kl":  # KL(q || p) is +inf where only p vanishes
        teacher[1, 20] = -math.inf  # masked for the teacher only
    labels = torch.tensor([5, 22, 38])
    result = check(student, teacher, labels, divergence=divergence, temperature=2.0, ce_weight=0.3)
    assert (result.grad[:, columns] == 0).all()


@interpreter_case
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("divergence", ("forward_kl", "jsd", "tvd"))
def test_low_precision_inputs_match_reference(dtype, divergence):
    student, teacher = make_pair((3, 45), dtype, seed=5)
    labels = make_labels((3,), 45, ignored=[2])
    result = check(student, teacher, labels, divergence=divergence, temperature=2.0, ce_weight=0.5)
    assert result.grad.dtype == dtype


@interpreter_case
def test_mixed_student_and_teacher_dtypes():
    student, teacher = make_pair((3, 33), torch.bfloat16, teacher_dtype=torch.float32, seed=6)
    check(student, teacher, divergence="reverse_kl", temperature=2.0)


@interpreter_case
@pytest.mark.parametrize("shape", ((1, 1), (1, 17), (3, 2, 21)), ids=str)
def test_odd_shapes_match_reference(shape):
    student, teacher = make_pair(shape, seed=7)
    labels = make_labels(shape[:-1], shape[-1])
    check(student, teacher, labels, temperature=2.0, ce_weight=0.4)


@interpreter_case
@pytest.mark.parametrize("divergence", ("jsd", "skew_kl", "skew_reverse_kl"))
@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_mixture_endpoints_match_reference(divergence, beta):
    # The CE term keeps the reference's graph alive where the divergence stops depending on q.
    student, teacher = make_pair((3, 21), seed=8)
    result = check(student, teacher, make_labels((3,), 21), divergence=divergence, beta=beta,
                   temperature=2.0, ce_weight=0.3)
    if divergence == "jsd":  # the convention: JSD(0) = JSD(1) = 0, with exactly zero gradient
        kd_only = loss_and_grad(student, teacher, backend="triton", divergence="jsd", beta=beta,
                                temperature=2.0, reduction="none")
        assert (kd_only.loss.abs() <= 1e-6).all() and (kd_only.grad == 0).all()
    assert result.loss.isfinite()


@interpreter_case
@pytest.mark.parametrize("case", ("transposed", "row_stride", "expanded_teacher"))
def test_strided_inputs_match_reference(case):
    student, teacher = make_pair((24, 30), seed=9)
    if case == "transposed":
        student, teacher = student.t(), teacher.t()
    elif case == "row_stride":
        student, teacher = student[::5], teacher[::5]
    else:
        student, teacher = student[:3, :20], teacher[:1, :20].expand(3, 20)
    check(student, teacher, temperature=2.0, divergence="jsd")


@interpreter_case
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_nearly_identical_student_and_teacher_match_reference(interpreted, monkeypatch, divergence):
    # A tiny divergence must not drown in the rounding of the much larger logits. Rows of a few
    # dozen columns let eager PyTorch be exact by luck; rows this long (in tiles of 512) do not.
    monkeypatch.setattr(interpreted, "MAX_BLOCK", 512)
    student = make_logits((16, 1271), seed=37, scale=3.0)
    teacher = student + 1e-3 * make_logits((16, 1271), seed=38, scale=1.0)
    check(student, teacher, divergence=divergence, beta=0.3, temperature=2.0, reduction="none")


@interpreter_case
@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "skew_kl", "tvd"))
@pytest.mark.parametrize("magnitude", (30.0, 1e4))
def test_peaked_rows_match_reference(divergence, magnitude):
    student, teacher = make_pair((3, 33), seed=10, scale=magnitude)
    student[0] = teacher[0]  # identical peaks; row 1: all mass on different columns
    student[1], teacher[1] = -magnitude, -magnitude
    student[1, 3], teacher[1, 30] = magnitude, magnitude
    check(student, teacher, make_labels((3,), 33), divergence=divergence, ce_weight=0.5)


# --- rows with nothing to learn, bad values ----------------------------------------------------------

@interpreter_case
def test_all_ignored_batch_gives_zero_loss_and_gradient():
    student, teacher = make_pair((2, 19), torch.bfloat16, seed=11)
    result = loss_and_grad(student, teacher, torch.full((2,), -100), backend="triton", ce_weight=0.5)
    assert result.loss == 0 and (result.grad == 0).all() and result.grad.dtype == torch.bfloat16


@interpreter_case
def test_fully_masked_row_gives_zero_loss_and_gradient():
    student, teacher = make_pair((3, 20), seed=12)
    teacher[1] = -math.inf
    result = loss_and_grad(student, teacher, backend="triton", reduction="none", temperature=2.0)
    assert result.loss[1] == 0 and (result.grad[1] == 0).all()
    assert torch.isfinite(result.loss).all() and (result.loss[[0, 2]] > 0).all()


@interpreter_case
@pytest.mark.parametrize("divergence,temperature", (("forward_kl", 1.0), ("reverse_kl", 2.0), ("skew_kl", 2.0)))
def test_teacher_row_entirely_masked_keeps_its_ce_term(divergence, temperature):
    # No teacher distribution: the row's KD term is 0, its CE term (and gradient) stays.
    check_masked_teacher_row("triton", divergence=divergence, temperature=temperature)


@interpreter_case
@pytest.mark.parametrize("case", STUDENT_NEG_INF_CASES)
def test_student_neg_inf_that_makes_the_loss_infinite_is_a_nan_row_and_raises(case):
    from kdkernels.backends import triton as triton_backend

    student, teacher, labels, options = student_neg_inf_case(case)
    cfg = kdkernels._checks.make_config(temperature=2.0, beta=0.5, kd_weight=1.0, scale_by_t2=True,
                                        ignore_index=-100, has_labels=labels is not None,
                                        **{"ce_weight": 0.0, **options})
    row_loss, _ = triton_backend.rows(student, teacher, labels, torch.tensor(1.0), cfg, True)
    assert torch.isnan(row_loss[1]) and torch.isfinite(row_loss[[0, 2]]).all()
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.kd_loss(student.requires_grad_(), teacher, labels, backend="triton", temperature=2.0, **options)


@interpreter_case
def test_reverse_kl_teacher_neg_inf_under_student_mass_is_a_nan_row_and_raises():
    from kdkernels.backends import triton as triton_backend

    student, teacher = make_pair((3, 20), seed=45)
    teacher[1, 4] = -math.inf
    cfg = kdkernels._checks.make_config(divergence="reverse_kl", temperature=2.0, beta=0.5, kd_weight=1.0,
                                        ce_weight=0.0, scale_by_t2=True, ignore_index=-100, has_labels=False)
    row_loss, _ = triton_backend.rows(student, teacher, None, torch.tensor(1.0), cfg, True)
    assert torch.isnan(row_loss[1]) and torch.isfinite(row_loss[[0, 2]]).all()
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student.clone().requires_grad_(), teacher, backend="triton", divergence="reverse_kl",
                          temperature=2.0)
    student[1, 4] = -math.inf  # masked on both sides: a finite row
    check(student, teacher, divergence="reverse_kl", temperature=2.0)


@interpreter_case
@pytest.mark.parametrize("divergence", ("jsd", "skew_kl", "skew_reverse_kl"))
def test_mixture_weights_near_one_keep_full_precision(divergence):
    student, teacher = make_pair((3, 20), seed=44)
    check(student, teacher, divergence=divergence, beta=0.999999, temperature=2.0)


@interpreter_case
@pytest.mark.parametrize("bad,argument", (("nan_teacher", "teacher_logits"), ("inf_teacher", "teacher_logits"),
                                          ("nan_student", "student_logits"), ("label_too_large", "labels"),
                                          ("negative_label", "labels")))
def test_bad_values_make_their_row_nan_and_kd_loss_raises(bad, argument):
    # The kernel reports a bad row as NaN (no host synchronisation inside it); kd_loss turns that
    # into the same ValueError the CPU backend raises.
    from kdkernels._config import KDConfig
    from kdkernels.backends import triton as triton_backend

    student, teacher = make_pair((3, 20), seed=13)
    labels = torch.tensor([1, 2, 3])
    if bad == "nan_teacher":
        teacher[1, 17] = math.nan
    elif bad == "inf_teacher":
        teacher[1, 4] = math.inf
    elif bad == "nan_student":
        student[1, 0] = math.nan
    elif bad == "label_too_large":
        labels[1] = 20
    else:
        labels[1] = -3
    cfg = KDConfig(temperature=2.0, ce_weight=0.5)
    row_loss, grad = triton_backend.rows(student, teacher, labels, torch.tensor(1.0), cfg, True)
    assert torch.isnan(row_loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(row_loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    with pytest.raises(ValueError, match=argument):
        kdkernels.kd_loss(student.requires_grad_(), teacher, labels, backend="triton", ce_weight=0.5,
                          temperature=2.0)


# --- the backend contract ------------------------------------------------------------------------------

def _ce_blend_config(divergence, kd_weight):
    return kdkernels._checks.make_config(divergence=divergence, temperature=2.0, beta=0.4, kd_weight=kd_weight,
                                         ce_weight=0.5, scale_by_t2=True, ignore_index=-100, has_labels=True)


@interpreter_case
@pytest.mark.parametrize("divergence", ("forward_kl", "skew_reverse_kl"))
def test_rows_without_gradient_gives_the_same_losses(interpreted, divergence):
    student, teacher = make_pair((4, 37), seed=14)
    labels = make_labels((4,), 37, ignored=[0])
    cfg = _ce_blend_config(divergence, kd_weight=1.0)
    scale = torch.tensor(0.25)
    with_grad, grad = interpreted.rows(student, teacher, labels, scale, cfg, True)
    without_grad, none = interpreted.rows(student, teacher, labels, scale, cfg, False)
    assert none is None and grad.shape == student.shape
    torch.testing.assert_close(without_grad, with_grad, rtol=0, atol=0)


@interpreter_case
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "jsd"))
def test_rows_inplace_writes_the_same_gradient_over_the_student_logits(interpreted, divergence, dtype):
    # CE blend at T != 1: the label's logit and the T = 1 softmax are read from the student row
    # the gradient overwrites
    student, teacher = make_pair((4, 37), dtype, seed=15)
    labels = make_labels((4,), 37, ignored=[2])
    cfg = _ce_blend_config(divergence, kd_weight=0.5)
    scale = torch.tensor(0.25)
    expected_loss, expected_grad = interpreted.rows(student, teacher, labels, scale, cfg, True)
    buffer = student.clone()
    row_loss = interpreted.rows_inplace(buffer, teacher, labels, scale, cfg)
    torch.testing.assert_close(row_loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(buffer, expected_grad, rtol=0, atol=0)


@interpreter_case
@pytest.mark.parametrize("factor", (1.0, 3.5))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_scale_unless_one_scales_in_place(interpreted, dtype, factor):
    grad = make_logits((3, 5000), dtype, seed=17)
    expected = (grad.float() * factor).to(dtype)
    from kdkernels.backends.triton import scale

    result = scale.scale_unless_one_(grad, torch.tensor(factor))
    assert result.data_ptr() == grad.data_ptr()
    # The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): one bf16 ulp.
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 and factor != 1.0 else 0.0
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=0)


@interpreter_case
def test_auto_on_cpu_tensors_still_picks_the_cpu_kernel():
    student, _ = make_pair((2, 5))
    assert kdkernels.backends.resolve("auto", student) in ("cpu", "reference")
    assert kdkernels.backends.resolve("triton", student) == "triton"


# --- ahead-of-time compilation for real GPUs -----------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    from kdkernels.backends.triton import kd_loss, scale
    from triton_interpreter import compile_for_gpu

    types = {"labels_ptr": "*i64", "row_loss_ptr": "*fp32", "grad_scale_ptr": "*fp32", "student_row_stride": "i64",
             "teacher_row_stride": "i64", "vocab": "i32", "ignore_index": "i32"}
    block, num_warps = kd_loss.launch_shape(128256)
    # Every divergence with labels, CE and gradient for sm_90; the leanest variant, and sm_80.
    variants = [(90, divergence, True, True) for divergence in range(6)]
    variants += [(90, 0, False, False), (80, 0, True, True)]
    for arch, divergence, has_labels, compute_grad in variants:
        constexprs = {"DIVERGENCE": divergence, "HAS_LABELS": has_labels, "USE_CE": has_labels,
                      "CE_REUSES_Q": False, "COMPUTE_GRAD": compute_grad, "BLOCK": block}
        compile_for_gpu(kd_loss._kd_loss_fwd_kernel, types, constexprs, arch=arch, num_warps=num_warps)
    compile_for_gpu(scale._scale_unless_one_kernel, {"factor_ptr": "*fp32", "numel": "i32"}, {"BLOCK": 4096},
                    arch=90, num_warps=8)
    print("compiled")
""")



@parent_case
def test_kernels_compile_for_sm80_and_sm90():
    compile_in_child(_COMPILE_SCRIPT)
