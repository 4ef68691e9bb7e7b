"""CAKD / DKD (decomposed KL): every grouping rule against the float64 reference,
the exact decomposition of forward KL, the closed-form gradient, DKD against the paper's formula,
numerics at the edges (temperatures, masked vocabulary, underflowing groups, empty groups, ignored
rows), ties, validation and the modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from conftest import assert_within_eager_error, make_labels, make_pair
from kdkernels._config import CAKDConfig
from kdkernels.backends.reference import cakd as reference_cakd
from kdkernels.nn import CAKDLoss, DKDLoss

# (groups, extra options); k = 100 takes the threshold-bisection selection, k <= 64 the buffer.
RULES = [
    ("label", {}),
    ("teacher_top1", {}),
    ("teacher_topk", {"k": 3}),
    ("teacher_topk", {"k": 100}),
    ("teacher_topk", {"k": 10_000}),  # k >= V: W is empty
    ("teacher_mass", {"mass": 0.3}),
    ("teacher_mass", {"mass": 0.9}),
]
RULE_IDS = [f"{g}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for g, o in RULES]
WEIGHTS = {"bcd_weight": 0.7, "scd_weight": 1.3, "wcd_weight": 2.1}
COMPONENTS = ("loss", "bcd", "scd", "wcd")


def run_loss(student, teacher, labels=None, *, fn=kdkernels.cakd_loss, grad_output=None, **options):
    """fn(..., return_components=True) and the student's gradient under grad_output (default 1)."""
    student = student.detach().clone().requires_grad_(True)
    result = fn(student, teacher, labels, return_components=True, **options)
    go = torch.ones_like(result.loss) if grad_output is None else grad_output.to(result.loss.dtype)
    result.loss.backward(go)
    return result, student.grad


def clear_mass(teacher, temperature, mass, margin=5e-6):
    """The teacher_mass rule compares cumulative sums with `mass`, where float32 and float64 may
    legitimately disagree: returns the value nearest `mass` (in steps of 1e-4) that is at least
    `margin` away from every row's cumulative sums, so the test data has no boundary case."""
    probs = torch.softmax(teacher.double().reshape(-1, teacher.shape[-1]) / temperature, -1)
    cumulative = probs.sort(-1, descending=True).values.cumsum(-1).nan_to_num(nan=2.0)  # masked rows: NaN
    for step in range(200):
        candidate = mass + (step // 2 + 1) * 1e-4 * (1 if step % 2 else -1) if step else mass
        if float((cumulative - candidate).abs().min()) > margin:
            return candidate
    raise AssertionError("no mass value clear of the boundary near the requested one")


def with_clear_mass(extra, teacher, temperature):
    if "mass" not in extra:
        return extra
    return {**extra, "mass": clear_mass(teacher, temperature, extra["mass"])}


def check_against_reference(student, teacher, labels=None, *, fn=kdkernels.cakd_loss, grad_output=None,
                            backend="cpu", **options):
    """A fused kernel (`backend`) against the float64 oracle under the eager-error tolerance rule,
    for the loss, each component and the gradient."""
    kernel, grad = run_loss(student, teacher, labels, fn=fn, grad_output=grad_output, backend=backend, **options)
    eager, eager_grad = run_loss(student, teacher, labels, fn=fn, grad_output=grad_output, backend="reference",
                                 **options)
    oracle, oracle_grad = run_loss(student.double(), teacher.double(), labels, fn=fn, backend="reference",
                                   grad_output=None if grad_output is None else grad_output.double(), **options)
    for name in kernel._fields:
        assert_within_eager_error(getattr(kernel, name).detach(), getattr(eager, name).detach(),
                                  getattr(oracle, name).detach(), what=name,
                                  floor_dtype=torch.float32)
    assert grad.dtype == student.dtype
    assert_within_eager_error(grad, eager_grad, oracle_grad, what="gradient")
    return kernel, grad


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference


@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("temperature", (1.0, 0.25, 20.0))
@pytest.mark.parametrize("shape", ((41, 1271), (3, 7, 33), (4, 5000)), ids=str)
def test_rule_matches_float64_reference(groups, extra, temperature, shape):
    student, teacher = make_pair(shape, seed=1)
    labels = make_labels(shape[:-1], shape[-1], seed=1)
    extra = with_clear_mass(extra, teacher, temperature)
    check_against_reference(student, teacher, labels, groups=groups, temperature=temperature, **extra, **WEIGHTS)


@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision_inputs(groups, extra, dtype):
    # bf16 logits tie often: the selections must break ties exactly like the reference.
    student, teacher = make_pair((37, 1271), dtype, seed=2)
    labels = make_labels((37,), 1271, seed=2)
    extra = with_clear_mass(extra, teacher, 2.0)
    check_against_reference(student, teacher, labels, groups=groups, temperature=2.0, **extra, **WEIGHTS)


@pytest.mark.parametrize("groups,extra", [("teacher_topk", {"k": 5}), ("label", {})], ids=("top5", "label"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision_rows_the_one_pass_road_leaves(groups, extra, dtype):
    # bf16 / fp16 rows are read in place by the one-pass road; a row it leaves midway (thousands
    # of teacher ties at the k-th logit, no finite teacher logit in the first block) is widened
    # for the general road, whose float32 gradient is then narrowed
    student, teacher = make_pair((4, 3000), dtype, seed=6)
    teacher[0] = 1.0  # every class ties
    teacher[1, ::2] = teacher[1].max()  # 1500 classes tie at the top
    teacher[2, :2500] = float("-inf")  # the first block holds no finite teacher logit
    labels = make_labels((4,), 3000, seed=6)
    labels[2] = 2700
    check_against_reference(student, teacher, labels, groups=groups, temperature=2.0, **extra, **WEIGHTS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_top_k_with_a_finite_mask_far_below_the_rest(dtype):
    # a vocabulary masked with -1e9 (not -inf) around a few live classes: W's maximum is the mask,
    # while live classes that arrived as candidates and fell out of the top k sit 1e9 above it
    student, teacher = make_pair((3, 300), dtype, seed=8)
    teacher.fill_(-1e9)
    teacher[:, 10:31] = torch.arange(21, dtype=dtype)
    teacher[1, 200:240] = torch.linspace(-3, 25, 40).to(dtype)
    check_against_reference(student, teacher, groups="teacher_topk", k=5, temperature=2.0, **WEIGHTS)


@pytest.mark.parametrize("groups,extra", [("teacher_topk", {"k": 1171}), ("teacher_topk", {"k": 700}),
                                          ("teacher_mass", {"mass": 0.999999})], ids=str)
def test_large_s_over_masked_classes_and_a_partial_last_vector(groups, extra):
    # S chosen by the threshold search (k > 64, or a mass of thousands of classes), over a row of
    # 1271 classes (not a whole number of vectors) whose teacher is -inf on 200 of them: with
    # k = 1171, S reaches into the masked classes (the lowest indices among them), so the search
    # window's lower end is -inf and the lanes past the row's end must not be taken for classes
    student, teacher = make_pair((3, 1271), seed=12)
    teacher[:, 300:500] = -float("inf")
    teacher[1, 1200:] = -float("inf")
    check_against_reference(student, teacher, groups=groups, temperature=2.0, **extra, **WEIGHTS)


def test_mixed_student_and_teacher_dtypes():
    student, _ = make_pair((9, 300), torch.bfloat16, seed=3)
    _, teacher = make_pair((9, 300), torch.float32, seed=3)
    check_against_reference(student, teacher, groups="teacher_topk", k=4, **WEIGHTS)


@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("groups,extra", [RULES[0], RULES[2]], ids=[RULE_IDS[0], RULE_IDS[2]])
def test_reductions_ignored_rows_and_grad_output(reduction, groups, extra):
    student, teacher = make_pair((2, 9, 211), seed=4)
    labels = make_labels((2, 9), 211, seed=4, ignored=(slice(None), slice(2, 5)))
    shape = (2, 9) if reduction == "none" else ()
    grad_output = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5
    result, grad = check_against_reference(student, teacher, labels, groups=groups, reduction=reduction,
                                           temperature=2.0, grad_output=grad_output, **extra, **WEIGHTS)
    assert result.loss.shape == shape and result.bcd.shape == shape
    assert (grad[:, 2:5] == 0).all()
    if reduction == "none":
        assert (result.loss[:, 2:5] == 0).all() and (result.wcd[:, 2:5] == 0).all()


@pytest.mark.parametrize("scale_by_t2", (True, False))
def test_temperature_scaling(scale_by_t2):
    student, teacher = make_pair((6, 50), seed=6)
    kwargs = dict(groups="teacher_topk", k=2, temperature=3.0, reduction="none", **WEIGHTS)
    scaled = kdkernels.cakd_loss(student, teacher, scale_by_t2=scale_by_t2, **kwargs)
    plain = kdkernels.cakd_loss(student, teacher, scale_by_t2=False, **kwargs)
    torch.testing.assert_close(scaled, plain * (9.0 if scale_by_t2 else 1.0))


# ---------------------------------------------------------------------------------------------
# The decomposition and its gradient


def _teacher_group_masses(teacher, labels, groups, extra, temperature):
    cfg = CAKDConfig(groups=groups, top_k=extra.get("k", 1), mass=extra.get("mass", 0.5), temperature=temperature)
    in_s = reference_cakd.correlated_set(teacher.double(), labels, cfg)
    probs = torch.softmax(teacher.double() / temperature, -1)
    p_s = (probs * in_s).sum(-1)
    return p_s, 1 - p_s


@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_teacher_mass_weights_give_forward_kl(groups, extra, backend):
    # KL(p||q) = BCD + P_S SCD + P_W WCD, exactly, for any partition.
    student, teacher = make_pair((23, 301), seed=7)
    labels = make_labels((23,), 301, seed=7)
    cakd = kdkernels.cakd_loss(student, teacher, labels, groups=groups, bcd_weight=1.0, scd_weight="teacher_mass",
                               wcd_weight="teacher_mass", temperature=2.0, reduction="none", backend=backend,
                               **extra)
    kl = kdkernels.kd_loss(student, teacher, temperature=2.0, reduction="none", backend=backend)
    torch.testing.assert_close(cakd, kl, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
def test_components_decompose_forward_kl(groups, extra):
    student, teacher = make_pair((23, 301), seed=8)
    labels = make_labels((23,), 301, seed=8)
    parts = kdkernels.cakd_loss(student, teacher, labels, groups=groups, temperature=2.0, scale_by_t2=False,
                                reduction="none", return_components=True, **extra)
    p_s, p_w = _teacher_group_masses(teacher, labels, groups, extra, 2.0)
    kl = kdkernels.kd_loss(student, teacher, temperature=2.0, scale_by_t2=False, reduction="none", backend="reference")
    recomposed = parts.bcd.double() + p_s * parts.scd.double() + p_w * parts.wcd.double()
    torch.testing.assert_close(recomposed, kl.double(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("groups,extra", RULES[:6], ids=RULE_IDS[:6])
def test_gradient_closed_form(groups, extra):
    # dL/du_i = w_b (q_i - P_g q̂_i) + w_g (q̂_i - p̂_i), P_g the teacher mass of i's group, for any
    # weights: checked against autograd of the float64 reference, itself checked by gradcheck.
    T = 1.5
    student, teacher = make_pair((6, 17), torch.float64, seed=9)
    labels = make_labels((6,), 17, seed=9)
    cfg = CAKDConfig(groups=groups, top_k=extra.get("k", 1), mass=extra.get("mass", 0.5), temperature=T,
                     scale_by_t2=False, **WEIGHTS)
    assert torch.autograd.gradcheck(lambda s: reference_cakd.row_loss(s, teacher, labels, cfg)[0],
                                    (student.clone().requires_grad_(True),))
    grad = run_loss(student, teacher, labels, groups=groups, temperature=T, scale_by_t2=False, reduction="sum",
                    backend="reference", **extra, **WEIGHTS)[1]

    in_s = reference_cakd.correlated_set(teacher, labels, cfg)
    q, p = torch.softmax(student / T, -1), torch.softmax(teacher / T, -1)
    P_s, Q_s = (p * in_s).sum(-1, keepdim=True), (q * in_s).sum(-1, keepdim=True)
    P_g = torch.where(in_s, P_s, 1 - P_s)
    Q_g = torch.where(in_s, Q_s, 1 - Q_s)
    w_g = in_s.double() * WEIGHTS["scd_weight"] + (~in_s).double() * WEIGHTS["wcd_weight"]
    q_hat, p_hat = q / Q_g, p / P_g
    du = WEIGHTS["bcd_weight"] * (q - P_g * q_hat) + w_g * (q_hat - p_hat)
    torch.testing.assert_close(grad, du / T, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# DKD


def paper_dkd(student, teacher, labels, alpha, beta, T):
    """DKD (Zhao et al., CVPR 2022, Eq. 7), from the paper: binary target / non-target KL plus
    the KL among non-target classes, both at temperature T, times T^2, averaged over the batch."""
    gt = F.one_hot(labels, student.shape[-1]).bool()
    p_t, p_s = F.softmax(teacher / T, -1), F.softmax(student / T, -1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
    log_nt_t = F.log_softmax((teacher / T).masked_fill(gt, -math.inf), -1)
    log_nt_s = F.log_softmax((student / T).masked_fill(gt, -math.inf), -1)
    nckd = torch.where(gt, 0.0, log_nt_t.exp() * (log_nt_t - log_nt_s)).sum(-1)
    return (T * T * (alpha * tckd + beta * nckd)).mean(), tckd.mean(), nckd.mean()


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.5)])
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_dkd_matches_paper_formula(alpha, beta, T, backend):
    student, teacher = make_pair((31, 100), seed=10)
    labels = make_labels((31,), 100, seed=10)
    expected, tckd, nckd = paper_dkd(student.double(), teacher.double(), labels, alpha, beta, T)
    result = kdkernels.dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=T,
                                reduction="batchmean", return_components=True, backend=backend)
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.tckd.double(), tckd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.nckd.double(), nckd, rtol=1e-5, atol=1e-6)


def test_dkd_defaults_and_gradient():
    student, teacher = make_pair((3, 5, 64), seed=11)
    labels = make_labels((3, 5), 64, seed=11)
    check_against_reference(student, teacher, labels, fn=kdkernels.dkd_loss)
    expected = paper_dkd(student.double().reshape(15, 64), teacher.double().reshape(15, 64), labels.reshape(15),
                         1.0, 8.0, 4.0)[0]
    torch.testing.assert_close(kdkernels.dkd_loss(student, teacher, labels).double(), expected, rtol=1e-5, atol=1e-6)


def test_dkd_is_cakd_with_label_groups():
    student, teacher = make_pair((12, 80), seed=12)
    labels = make_labels((12,), 80, seed=12)
    dkd = kdkernels.dkd_loss(student, teacher, labels, alpha=0.5, beta=3.0, temperature=2.0)
    cakd = kdkernels.cakd_loss(student, teacher, labels, groups="label", bcd_weight=0.5, wcd_weight=3.0,
                               temperature=2.0)
    torch.testing.assert_close(dkd, cakd)


# ---------------------------------------------------------------------------------------------
# Edge cases: no NaN anywhere


@pytest.mark.parametrize("groups,extra", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("temperature", (0.25, 20.0))
def test_masked_vocab_and_extreme_temperatures(groups, extra, temperature):
    student, teacher = make_pair((17, 257), seed=13)
    labels = make_labels((17,), 257, seed=13, ignored=[3, 9])
    masked = torch.rand(17, 257, generator=torch.Generator().manual_seed(14)) < 0.3
    masked[5] = True      # row masked entirely: loss 0
    masked[6, 10:] = True  # few live classes
    masked[7, labels[7]] = True  # the label masked (S empty under the label rule)
    student = student.masked_fill(masked, -math.inf)
    teacher = teacher.masked_fill(masked, -math.inf)
    extra = with_clear_mass(extra, teacher, temperature)
    result, grad = check_against_reference(student, teacher, labels, groups=groups, temperature=temperature,
                                           reduction="none", **extra, **WEIGHTS)
    assert result.loss[5] == 0 and (grad[5] == 0).all() and (grad[masked] == 0).all()


@pytest.mark.parametrize("groups,extra", [RULES[1], RULES[2], RULES[5]], ids=[RULE_IDS[1], RULE_IDS[2], RULE_IDS[5]])
@pytest.mark.parametrize("peaked", ("teacher", "student", "both"))
def test_group_whose_mass_underflows(groups, extra, peaked):
    # The top classes hold all but ~e^-300 of the mass: W's mass underflows (even in float64),
    # yet its renormalised distribution and WCD are exact.
    student, teacher = make_pair((8, 300), seed=15)
    if peaked in ("teacher", "both"):
        teacher[:, 7] += 400.0
    if peaked in ("student", "both"):
        student[:, 7] += 400.0
    check_against_reference(student, teacher, groups=groups, temperature=1.0, **extra, **WEIGHTS)


def _teacher_layout(layout, V=5000):
    """Teacher rows [4, V] (three online-softmax blocks of 2048 classes) whose top classes arrive
    in the orders that the top-k rule's selection inside the statistics pass treats apart."""
    _, teacher = make_pair((4, V), seed=19)
    ramp = torch.arange(V, dtype=torch.float32) / V * 8.0
    if layout == "ascending":  # every block raises the k-th logit: earlier candidates join W late
        teacher += ramp
    elif layout == "descending":  # S lies in the first block
        teacher -= ramp
    elif layout == "top_k_hold_the_mass":  # W's mass underflows beside S's
        teacher[:, 4000:4005] += 120.0
    elif layout == "late_class_far_above_its_block":  # a first-block candidate, outranked, exps overflow
        teacher[:, :2048] -= 200.0
        teacher[:, 10] = 50.0
        teacher[:, 3000:3005] = 100.0
    elif layout == "ties_at_the_kth_logit":  # more tied classes than the pass keeps out of W
        teacher[:, :] = 1.0
        teacher[:, 4000:4002] = 2.0
    elif layout == "masked_first_block":  # no k-th logit in the first block
        teacher[:, :2100] = -math.inf
    elif layout == "first_block_w_only_outranked_candidates":  # W's first finite classes arrive as candidates
        teacher[:, :5] = -math.inf
        teacher[:, 16:2048] = -math.inf
    return teacher


@pytest.mark.parametrize("layout", ("random", "ascending", "descending", "top_k_hold_the_mass",
                                    "late_class_far_above_its_block", "ties_at_the_kth_logit",
                                    "masked_first_block", "first_block_w_only_outranked_candidates"))
@pytest.mark.parametrize("temperature", (1.0, 4.0))
def test_top_k_selected_during_the_statistics_pass(layout, temperature):
    teacher = _teacher_layout(layout)
    student, _ = make_pair(tuple(teacher.shape), seed=20)
    check_against_reference(student, teacher, groups="teacher_topk", k=5, temperature=temperature, **WEIGHTS)


@pytest.mark.parametrize("where", ("first", "block_edge", "last_partial_vector", "random"))
@pytest.mark.parametrize("peaked", (False, True))
def test_label_group_set_apart_during_the_statistics_pass(where, peaked):
    # DKD's S = {label}: one lane of one vector is kept out of W's maxima and sums.
    V = 5003  # three blocks, the last vector partial
    student, teacher = make_pair((6, V), seed=21)
    labels = {"first": torch.zeros(6, dtype=torch.long), "block_edge": torch.full((6,), 2047),
              "last_partial_vector": torch.full((6,), V - 1), "random": make_labels((6,), V, seed=21)}[where]
    if peaked:  # the label holds nearly all of the teacher's mass: W's mass underflows beside it
        teacher[torch.arange(6), labels] += 150.0
    check_against_reference(student, teacher, labels, groups="label", temperature=2.0, **WEIGHTS)
    check_against_reference(student, teacher, labels, fn=kdkernels.dkd_loss, temperature=2.0)


def test_teacher_group_without_mass_contributes_no_group_kl():
    # The label class is masked for the teacher only: P_S = 0, so SCD is 0 by convention while
    # BCD still pushes the student's mass out of S.
    student, teacher = make_pair((4, 30), seed=16)
    labels = torch.tensor([1, 2, 3, 4])
    teacher[torch.arange(4), labels] = -math.inf
    result, grad = check_against_reference(student, teacher, labels, groups="label", reduction="none", **WEIGHTS)
    assert (result.scd == 0).all() and torch.isfinite(result.bcd).all()


def test_all_ignored_batch_gives_zero():
    student, teacher = make_pair((5, 40), seed=17)
    labels = torch.full((5,), -100)
    result, grad = run_loss(student, teacher, labels, groups="teacher_topk", k=3, backend="cpu")
    assert all(float(value.detach()) == 0.0 for value in result) and (grad == 0).all()
    assert float(kdkernels.dkd_loss(student, teacher, labels)) == 0.0


def test_ties_go_to_the_lower_class_index():
    V = 50
    teacher = torch.zeros(3, V)
    teacher[1, 10:20] = 1.0  # ten tied maxima
    teacher[2] = torch.arange(V) % 5  # ties at every level
    student, _ = make_pair((3, V), seed=18)
    for k in (1, 3, 7):
        expected = reference_cakd.teacher_rank_order(teacher)[:, :k]
        assert (expected[1] == torch.arange(10, 10 + k)).all()
        in_s = torch.zeros(3, V, dtype=torch.bool).scatter(-1, expected, True)
        parts = reference_cakd.components(student.double(), teacher.double(), in_s, 1.0)
        result = kdkernels.cakd_loss(student, teacher, groups="teacher_topk", k=k, scale_by_t2=False,
                                     reduction="none", return_components=True, backend="cpu")
        for got, want in zip(result[1:], parts[:3]):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_student_compute_no_gradient():
    student, teacher = make_pair((6, 90), seed=19)
    with torch.no_grad():
        value = kdkernels.cakd_loss(student.requires_grad_(True), teacher, groups="teacher_top1")
    assert not value.requires_grad
    frozen = kdkernels.cakd_loss(student.detach(), teacher, groups="teacher_top1")
    torch.testing.assert_close(value, frozen)


@pytest.mark.parametrize("fn", ("cakd", "dkd"))
@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_second_backward_through_a_retained_graph_is_exact(fn, backend, reduction):
    student, teacher = make_pair((4, 30), seed=20)
    labels = make_labels((4,), 30, seed=20)
    student.requires_grad_(True)
    loss = (kdkernels.cakd_loss(student, teacher, groups="teacher_top1", reduction=reduction, backend=backend)
            if fn == "cakd" else kdkernels.dkd_loss(student, teacher, labels, reduction=reduction, backend=backend))
    (returned,) = torch.autograd.grad(loss.sum(), student, retain_graph=True)
    kept = returned.clone()
    loss.sum().backward(retain_graph=True)
    (3.0 * loss.sum()).backward()
    torch.testing.assert_close(student.grad, 4 * kept)
    assert torch.equal(returned, kept)  # the gradient handed out first was not rescaled later


def test_double_backward_raises_on_the_fused_kernel_and_works_on_the_reference():
    student, teacher = make_pair((3, 12), torch.float64, seed=29)
    fused = student.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(kdkernels.cakd_loss(fused, teacher.float(), groups="teacher_topk", k=3), fused,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        grad.pow(2).sum().backward()
    assert torch.autograd.gradgradcheck(
        lambda s: kdkernels.cakd_loss(s, teacher, groups="teacher_topk", k=3, temperature=2.0, backend="reference"),
        (student.requires_grad_(True),))


@pytest.mark.parametrize("fn", ("cakd", "dkd"))
def test_torch_compile_fullgraph_matches_eager(fn):
    torch._dynamo.reset()
    student, teacher = make_pair((6, 40), seed=30)
    labels = make_labels((6,), 40, seed=30, ignored=[2])

    def loss(s):
        if fn == "cakd":
            return kdkernels.cakd_loss(s, teacher, labels, groups="teacher_topk", k=4, temperature=2.0)
        return kdkernels.dkd_loss(s, teacher, labels)

    eager, compiled = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    expected = loss(eager)
    actual = torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled)
    torch.testing.assert_close(actual, expected)
    (2.0 * expected).backward()
    (2.0 * actual).backward()
    torch.testing.assert_close(compiled.grad, eager.grad)


def test_op_registration():
    student, teacher = make_pair((5, 40), seed=21)
    labels = make_labels((5,), 40, seed=21)
    args = (student, teacher, labels, torch.tensor(0.2), 1, 3, 0.5, 1.0, 1.0, 1.0, False, False, 2.0, True, -100, True)
    torch.library.opcheck(torch.ops.kdkernels.cakd_loss_fwd.default, args)


# ---------------------------------------------------------------------------------------------
# Validation and modules


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(groups="nearest"), ValueError, "groups"),
    (dict(groups="teacher_topk"), ValueError, "needs k"),
    (dict(groups="teacher_topk", k=0), ValueError, "k must be >= 1"),
    (dict(groups="teacher_topk", k=2.0), TypeError, "k must be an int"),
    (dict(groups="teacher_top1", k=3), ValueError, "k is only used"),
    (dict(groups="teacher_mass"), ValueError, "needs mass"),
    (dict(groups="teacher_mass", mass=0.0), ValueError, "mass"),
    (dict(groups="teacher_mass", mass=1.0), ValueError, "mass must be < 1"),
    (dict(groups="teacher_topk", k=2, mass=0.5), ValueError, "mass is only used"),
    (dict(groups="teacher_top1", bcd_weight=-1.0), ValueError, "bcd_weight"),
    (dict(groups="teacher_top1", scd_weight="student_mass"), ValueError, "scd_weight"),
    (dict(groups="teacher_top1", wcd_weight=math.nan), ValueError, "wcd_weight"),
    (dict(groups="teacher_top1", temperature=0.0), ValueError, "temperature"),
    (dict(groups="teacher_top1", reduction="avg"), ValueError, "reduction"),
    (dict(groups="teacher_top1", backend="tpu"), ValueError, "backend"),
    (dict(groups="teacher_topk", k=2 ** 70), ValueError, "k must be <="),
    (dict(groups="teacher_top1", ignore_index=-(2 ** 64)), ValueError, "ignore_index"),
    (dict(groups="teacher_top1", temperature=1e7), ValueError, "temperature"),
])
def test_bad_options_raise(kwargs, error, match):
    student, teacher = make_pair((3, 10), seed=22)
    with pytest.raises(error, match=match):
        kdkernels.cakd_loss(student, teacher, **kwargs)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_bad_data_raises(backend):
    student, teacher = make_pair((3, 10), seed=23)
    labels = torch.tensor([0, 5, 10])
    with pytest.raises(ValueError, match="labels"):
        kdkernels.cakd_loss(student, teacher, labels, groups="label", backend=backend)
    with pytest.raises(ValueError, match="labels"):
        kdkernels.cakd_loss(student, teacher, groups="label", backend=backend)
    bad = teacher.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.cakd_loss(student, bad, groups="teacher_topk", k=2, backend=backend)
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.cakd_loss(student, teacher[:, :9], groups="teacher_top1", backend=backend)
    with pytest.raises(TypeError, match="labels"):
        kdkernels.dkd_loss(student, teacher, labels.float(), backend=backend)


@pytest.mark.parametrize("case", ("whole_row", "strong_class", "weak_class"))
def test_student_neg_inf_where_the_teacher_has_mass_raises(case):
    # KL(p || q) and each of its parts is +inf where the teacher has mass and the student none.
    student, teacher = make_pair((3, 30), seed=24)
    if case == "whole_row":
        student[1] = -math.inf
    elif case == "strong_class":  # S of teacher_top1 has no student mass: BCD = +inf
        student[1, int(teacher[1].argmax())] = -math.inf
    else:  # a class of W: WCD = +inf
        student[1, int(teacher[1].argmin())] = -math.inf
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.cakd_loss(student, teacher, groups="teacher_top1", backend="cpu")
    labels = teacher.argmax(-1)
    with pytest.raises(ValueError, match="student_logits"):
        kdkernels.dkd_loss(student.requires_grad_(), teacher, labels, backend="cpu")


def test_student_neg_inf_where_the_teacher_is_masked_too_is_accepted():
    # -inf on both sides is masking, for an entry or a whole row (which then gives 0).
    student, teacher = make_pair((3, 30), seed=25)
    student[0, 4] = teacher[0, 4] = -math.inf
    student[1] = teacher[1] = -math.inf
    result, grad = run_loss(student, teacher, groups="teacher_topk", k=3, backend="cpu", reduction="none")
    assert result.loss[1] == 0 and (grad[1] == 0).all()
    assert torch.isfinite(result.loss).all() and torch.isfinite(grad).all()


def test_dkd_bad_arguments():
    student, teacher = make_pair((3, 10), seed=24)
    with pytest.raises(ValueError, match="labels"):
        kdkernels.dkd_loss(student, teacher, None)
    with pytest.raises(ValueError, match="alpha"):
        kdkernels.dkd_loss(student, teacher, torch.zeros(3, dtype=torch.long), alpha=-1.0)
    with pytest.raises(TypeError, match="beta"):
        kdkernels.dkd_loss(student, teacher, torch.zeros(3, dtype=torch.long), beta="8")


def test_modules_match_functions_and_validate_early():
    student, teacher = make_pair((2, 6, 70), seed=25)
    labels = make_labels((2, 6), 70, seed=25)
    options = dict(groups="teacher_topk", k=4, temperature=2.0, **WEIGHTS)
    torch.testing.assert_close(CAKDLoss(**options)(student, teacher, labels),
                               kdkernels.cakd_loss(student, teacher, labels, **options))
    torch.testing.assert_close(DKDLoss(beta=2.0)(student, teacher, labels),
                               kdkernels.dkd_loss(student, teacher, labels, beta=2.0))
    with pytest.raises(ValueError, match="k"):
        CAKDLoss(groups="teacher_topk")
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=-1.0)
    assert "groups='teacher_topk'" in repr(CAKDLoss(**options))


@pytest.mark.parametrize("backend", ("auto", "triton"))
def test_backend_without_a_cakd_kernel(monkeypatch, backend):
    # Where the chosen backend has no decomposed-KL kernel (today: the CUDA one), "auto" runs
    # the reference and an explicit request says so.
    from kdkernels import backends

    student, teacher = make_pair((4, 30), seed=26)
    expected = kdkernels.cakd_loss(student, teacher, groups="teacher_top1", backend="reference")
    load = backends.load
    monkeypatch.setattr(backends, "resolve", lambda name, tensor: "triton")
    monkeypatch.setattr(backends, "load", lambda name: load(name) if name == "reference"
                        else type("NoCakd", (), {"CHECKS_VALUES": True}))
    if backend == "triton":
        with pytest.raises(ValueError, match="no CAKD"):
            kdkernels.cakd_loss(student, teacher, groups="teacher_top1", backend=backend)
    else:
        torch.testing.assert_close(kdkernels.cakd_loss(student, teacher, groups="teacher_top1", backend=backend),
                                   expected)


def test_benchmark_peer_formulas_equal_the_losses():
    # benchmarks/cakd.py times these masked-softmax formulas beside the kernels: same values.
    from benchmarks.cakd import eager_cakd_topk, eager_dkd

    student, teacher = make_pair((16, 300), seed=27)
    labels = make_labels((16,), 300, seed=27)
    torch.testing.assert_close(eager_cakd_topk(student, teacher, 5, 2.0),
                               kdkernels.cakd_loss(student, teacher, groups="teacher_topk", k=5, temperature=2.0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_dkd(student, teacher, labels, 2.0),
                               kdkernels.dkd_loss(student, teacher, labels, temperature=2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
def test_empty_batch_gives_zero_loss_components_and_gradient(backend, reduction):
    student = torch.zeros(0, 7, requires_grad=True)
    teacher, labels = torch.zeros(0, 7), torch.zeros(0, dtype=torch.long)
    for result in (kdkernels.cakd_loss(student, teacher, groups="teacher_top1", reduction=reduction,
                                       return_components=True, backend=backend),
                   kdkernels.dkd_loss(student, teacher, labels, reduction=reduction, return_components=True,
                                      backend=backend)):
        for value in result:
            assert value.shape == ((0,) if reduction == "none" else ()) and float(value.detach().sum()) == 0.0
        result.loss.sum().backward()
        assert student.grad.shape == (0, 7)
