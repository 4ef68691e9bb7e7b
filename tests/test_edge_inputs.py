"""Inputs at the edges of each loss's domain: underflowing probabilities under the skew
divergences at beta = 0, a reverse KL whose teacher masks what the student keeps, labels of narrow
or unsigned dtypes, ignore_index = 0 without labels, NaN in rows the loss ignores, empty batches,
autocast, and options that are not what they claim to be. Each case has one right answer (a value,
a zero, or a ValueError / TypeError naming the argument) and every backend gives it."""

from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from conftest import DIVERGENCE_NAMES, check_against_reference, make_labels, make_pair

BACKENDS = ("cpu", "reference")


def _float64_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row in float64, from log-softmax (no underflow); entries
    -inf in p count for nothing."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p > -math.inf, terms, torch.zeros_like(terms)).sum(-1)


# ---- skew divergences at beta = 0 are the plain KLs, also where a probability underflows -------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,plain", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_skew_at_beta_zero_is_the_plain_kl_where_probabilities_underflow(backend, divergence, plain):
    # the student's second class has probability e^-200: 0 in float32
    student = torch.tensor([[0.0, -200.0], [1.0, -150.0], [0.5, -0.5]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, -1.0], [0.2, 0.1]])
    if plain == "reverse_kl":
        student, teacher = teacher.clone(), student.clone()  # q spread, p with an underflowing entry
    s = student.clone().requires_grad_(True)
    loss = kdkernels.kd_loss(s, teacher, divergence=divergence, beta=0.0, reduction="sum", backend=backend)
    loss.backward()
    expected = (_float64_kl(teacher, student) if plain == "forward_kl" else _float64_kl(student, teacher)).sum()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 10.0
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-5)
    s64 = student.double().clone().requires_grad_(True)
    kdkernels.kd_loss(s64, teacher.double(), divergence=plain, reduction="sum", backend="reference").backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_kl_at_a_tiny_beta_stays_finite(backend):
    student = torch.tensor([[0.0, -200.0]], requires_grad=True)
    loss = kdkernels.kd_loss(student, torch.zeros(1, 2), divergence="skew_kl", beta=1e-30, backend=backend)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(student.grad).all()
    # m >= beta p, so log(p / m) <= -log(beta): the loss is at most -log(1e-30) / 2 per half-mass entry
    assert 0.0 < float(loss.detach()) <= -math.log(1e-30) + 1e-3


# ---- reverse KL: a teacher -inf where the student has mass is an infinite loss -----------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_teacher_masked_where_student_is_not_raises(backend):
    student, teacher = make_pair((3, 7), seed=3)
    teacher[1, 2] = -math.inf
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student, teacher, divergence="reverse_kl", backend=backend)
    with pytest.raises(ValueError, match="teacher_logits"):
        kdkernels.kd_loss(student, teacher, divergence="skew_reverse_kl", beta=0.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_masked_on_both_sides_is_fine(backend):
    student, teacher = make_pair((3, 7), seed=3)
    student[1, 2] = teacher[1, 2] = -math.inf
    s = student.clone().requires_grad_(True)
    loss = kdkernels.kd_loss(s, teacher, divergence="reverse_kl", backend=backend)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(s.grad).all()
    assert float(s.grad[1, 2]) == 0.0
    # the masked entry is outside both distributions: row 1's loss is that of its other six
    expected = _float64_kl(student, teacher)
    keep = [0, 1, 3, 4, 5, 6]
    assert math.isclose(float(expected[1]), float(_float64_kl(student[1:2, keep], teacher[1:2, keep])),
                        rel_tol=1e-12)
    expected = expected.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_masked_teacher_in_an_ignored_row_is_not_read(backend):
    student, teacher = make_pair((3, 7), seed=3)
    teacher[1, 2] = -math.inf
    labels = torch.tensor([1, -100, 4])
    loss = kdkernels.kd_loss(student, teacher, labels, divergence="reverse_kl", backend=backend)
    expected = _float64_kl(student[[0, 2]], teacher[[0, 2]]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# ---- labels of any integer dtype compare against ignore_index as integers ----------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes_ignore_rows_like_int64(backend, dtype):
    student, teacher = make_pair((6, 9), seed=11)
    labels = make_labels((6,), 9, seed=2)
    labels[[1, 4]] = -100
    expected = kdkernels.kd_loss(student, teacher, labels, ce_weight=0.5, backend=backend)
    narrow = labels.clone()
    if dtype == torch.uint8:  # no -100 in uint8: ignore rows with an index it can hold
        narrow[[1, 4]] = 200
        expected = kdkernels.kd_loss(student, teacher, narrow, ce_weight=0.5, ignore_index=200, backend=backend)
        loss = kdkernels.kd_loss(student, teacher, narrow.to(dtype), ce_weight=0.5, ignore_index=200,
                                 backend=backend)
    else:
        loss = kdkernels.kd_loss(student, teacher, narrow.to(dtype), ce_weight=0.5, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_labels_with_a_negative_ignore_index_count_every_row(backend):
    # -100 is not a uint8 value, so no row is ignored: the mean is over all rows (it used to wrap
    # -100 to 156 and drop rows labelled 156 from the divisor)
    student, teacher = make_pair((4, 200), seed=5)
    labels = torch.tensor([156, 3, 156, 7], dtype=torch.uint8)
    loss = kdkernels.kd_loss(student, teacher, labels, ce_weight=1.0, kd_weight=0.0, backend=backend)
    expected = torch.nn.functional.cross_entropy(student.double(), labels.long())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# ---- sparse losses: ignore_index = 0 without labels ignores nothing ----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_without_labels_ignores_no_row_whatever_ignore_index(backend):
    student, teacher = make_pair((5, 13), seed=8)
    values, ids = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    base = kdkernels.sparse_kd_loss(student, ids, values, backend=backend)
    with_zero = kdkernels.sparse_kd_loss(student, ids, values, ignore_index=0, backend=backend)
    assert float(base) > 0.0
    torch.testing.assert_close(with_zero, base, rtol=0, atol=0)
    per_row = kdkernels.sparse_kd_loss(student, ids, values, ignore_index=0, reduction="none", backend=backend)
    assert bool((per_row > 0).all())


def test_fused_linear_sparse_without_labels_ignores_no_row_whatever_ignore_index():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 6), torch.randn(13, 6)
    values, ids = torch.log_softmax(torch.randn(5, 13) * 2, -1).topk(4, dim=-1)
    base = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values)
    with_zero = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values, ignore_index=0)
    assert float(base) > 0.0
    torch.testing.assert_close(with_zero, base, rtol=0, atol=0)


# ---- module constructors accept every valid option set ----------------------------------------

@pytest.mark.parametrize("teacher_kind", ["logprobs", "probs"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_reverse_kl", "tvd", "forward_kl"])
def test_sparse_modules_accept_residual_mass_with_any_divergence(teacher_kind, divergence):
    options = dict(missing_mass="residual", divergence=divergence, teacher_kind=teacher_kind)
    criterion = kdkernels.nn.SparseKDLoss(**options)
    fused = kdkernels.nn.FusedLinearSparseKDLoss(**options)
    student, teacher = make_pair((3, 10), seed=4)
    probs, ids = torch.softmax(teacher, -1).topk(3, dim=-1)
    values = probs if teacher_kind == "probs" else probs.log()
    assert math.isfinite(float(criterion(student, ids, values)))
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    assert math.isfinite(float(fused(hidden, weight, ids, values)))


# ---- NaN in a row the loss ignores reaches no gradient -----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fused_linear_nan_hidden_in_an_ignored_row(backend, sparse):
    torch.manual_seed(1)
    hidden = torch.randn(6, 5)
    weight = torch.randn(11, 5)
    teacher_weight = torch.randn(11, 5)
    labels = make_labels((6,), 11, seed=3)
    labels[2] = -100
    clean = hidden.clone()
    clean[2] = 0.0
    hidden[2] = math.nan

    def run(h):
        h = h.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if sparse:
            values, ids = torch.log_softmax(h.detach().nan_to_num() @ teacher_weight.T, -1).topk(3, dim=-1)
            loss = kdkernels.fused_linear_sparse_kd_loss(h, w, ids, values, labels, ce_weight=0.5, backend=backend)
        else:
            loss = kdkernels.fused_linear_kd_loss(h, w, h.detach().nan_to_num(), teacher_weight, labels,
                                                  ce_weight=0.5, backend=backend)
        loss.backward()
        return loss, h.grad, w.grad

    loss, grad_h, grad_w = run(hidden)
    ref_loss, ref_h, ref_w = run(clean)
    assert torch.isfinite(grad_w).all() and torch.isfinite(grad_h).all()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad_w, ref_w)
    torch.testing.assert_close(grad_h, ref_h)
    assert float(grad_h[2].abs().max()) == 0.0


# ---- autocast: the sparse fused-linear loss casts its lm_head inputs like a matmul -------------

def test_fused_linear_sparse_under_autocast_matches_bf16_inputs():
    torch.manual_seed(2)
    hidden = torch.randn(4, 8, dtype=torch.bfloat16)  # what an autocast model hands on
    weight = torch.randn(17, 8)                        # a float32 parameter
    values, ids = torch.log_softmax(torch.randn(4, 17) * 2, -1).topk(5, dim=-1)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kdkernels.fused_linear_sparse_kd_loss(hidden, w, ids, values)
    loss.backward()
    expected = kdkernels.fused_linear_sparse_kd_loss(hidden, weight.bfloat16(), ids, values)
    torch.testing.assert_close(loss, expected)
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


# ---- feature losses ----------------------------------------------------------------------------

def test_attention_transfer_nan_teacher_raises():
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    teacher[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match="teacher_features"):
        kdkernels.attention_transfer_loss(student, teacher)


def test_attention_transfer_nan_student_raises():
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    student[0, 1, 1] = math.inf
    with pytest.raises(ValueError, match="student_features"):
        kdkernels.attention_transfer_loss(student, teacher)


@pytest.mark.parametrize("reduction,shape", [("mean", ()), ("sum", ()), ("none", (0,))])
def test_attention_transfer_empty_batch(reduction, shape):
    student = torch.randn(0, 3, 4, requires_grad=True)
    loss = kdkernels.attention_transfer_loss(student, torch.randn(0, 3, 5), reduction=reduction)
    assert tuple(loss.shape) == shape and bool((loss == 0).all())
    loss.sum().backward()
    assert student.grad.shape == student.shape


def test_feature_alignment_projection_dtype_mismatch_is_a_type_error():
    student, teacher = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5)
    with pytest.raises(TypeError, match="projection"):
        kdkernels.feature_alignment_loss(student, teacher, torch.randn(5, 4))
    with pytest.raises(TypeError, match="projection_bias"):
        kdkernels.feature_alignment_loss(student.float(), teacher, torch.randn(5, 4),
                                         projection_bias=torch.randn(5, dtype=torch.float64))


def test_feature_alignment_nan_student_raises_unless_masked():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    student[1, 2] = math.nan
    with pytest.raises(ValueError, match="student_hidden"):
        kdkernels.feature_alignment_loss(student, teacher)
    mask = torch.tensor([True, False, True])
    loss = kdkernels.feature_alignment_loss(student, teacher, mask=mask)
    expected = (student[[0, 2]] - teacher[[0, 2]]).pow(2).mean()
    torch.testing.assert_close(loss, expected)


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1, 0, "no", None, 1.0])
def test_scale_by_t2_must_be_a_bool(value):
    student, teacher = make_pair((2, 5))
    with pytest.raises(TypeError, match="scale_by_t2"):
        kdkernels.kd_loss(student, teacher, scale_by_t2=value)
    with pytest.raises(TypeError, match="scale_by_t2"):
        kdkernels.cakd_loss(student, teacher, groups="teacher_topk", k=2, scale_by_t2=value)


@pytest.mark.parametrize("name", ["batch_size", "sequences_per_shard", "k"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_teacher_cache_sizes_must_be_positive_ints(tmp_path, name, value):
    pytest.importorskip("safetensors")
    from kdkernels import teacher_cache

    options = {"k": 2, "batch_size": 2, "sequences_per_shard": 2, name: value}
    teacher = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 7))
    with pytest.raises(ValueError, match=name):
        teacher_cache.build_teacher_cache(teacher, torch.zeros(3, 4, dtype=torch.long), str(tmp_path / "c"),
                                          progress=False, **options)
    assert not (tmp_path / "c" / "manifest.json").exists()


# ---- CAKD's mass rule at an exact tie -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab,mass,expected_size", [(10, 0.5, 5), (8, 0.25, 2), (20, 0.75, 15), (1000, 0.5, 500)])
def test_cakd_mass_rule_stops_where_a_uniform_teacher_reaches_the_mass(backend, vocab, mass, expected_size):
    # a uniform teacher reaches `mass` exactly after mass * V classes: that many form S, on every
    # backend (float32 probabilities of 1/V must not make the sum fall short and take one more)
    student = make_pair((2, vocab), seed=6)[0]
    teacher = torch.zeros(2, vocab)
    result = kdkernels.cakd_loss(student, teacher, groups="teacher_mass", mass=mass, bcd_weight=1.0,
                                 scd_weight=0.0, wcd_weight=0.0, temperature=1.0, reduction="none",
                                 return_components=True, backend=backend)
    # BCD compares [P_S, 1 - P_S] = [|S| / V, 1 - |S| / V] with the student's mass on the same S:
    # the teacher ranks ties by index, so S = the first |S| classes
    q = torch.softmax(student.double(), -1)
    for size in (expected_size - 1, expected_size, expected_size + 1):
        p_s, q_s = size / vocab, q[:, :size].sum(-1)
        bcd = p_s * torch.log(p_s / q_s) + (1 - p_s) * torch.log((1 - p_s) / (1 - q_s))
        if size == expected_size:
            torch.testing.assert_close(result.bcd.double(), bcd, rtol=1e-5, atol=1e-6)
        else:
            assert not torch.allclose(result.bcd.double(), bcd, rtol=1e-5, atol=1e-6)


# ---- high temperatures: nearly equal distributions, tiny divergences ----------------------------

@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("beta", [0.3, 0.5])
@pytest.mark.parametrize("temperature", [10.0, 50.0])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("shape", [(16, 1000), (4, 5000)], ids=["one_block", "three_blocks"])
def test_high_temperature_values_within_twice_eager_error(backend, divergence, temperature, beta, shape):
    # At T = 50 the tempered distributions differ by ~5% per class and a divergence is ~1e-4: an
    # error that is constant over a row (the rounding of a normaliser) is then a large share of it.
    # 5000 classes span three of the CPU kernel's online-softmax blocks.
    student, teacher = make_pair(shape, seed=12)
    check_against_reference(student, teacher, backend=backend, divergence=divergence, temperature=temperature,
                            beta=beta, reduction="none")
