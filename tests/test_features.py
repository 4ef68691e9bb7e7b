"""Feature-alignment losses against the formulas written out by hand, gradients, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.nn import AttentionTransferLoss, FeatureAlignmentLoss

SHAPES = [(7, 5, 9), (3, 4, 5, 6)]  # (rows..., D_s, D_t) read as [*lead, D_s] and [*lead, D_t]


def _pair(lead, d_s, d_t, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, d_s, generator=generator, dtype=dtype).requires_grad_()
    teacher = torch.randn(*lead, d_t, generator=generator, dtype=dtype)
    weight = (0.3 * torch.randn(d_t, d_s, generator=generator, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(d_t, generator=generator, dtype=dtype)).requires_grad_()
    return student, teacher, weight, bias


def _hand_token_loss(projected, teacher, kind):
    """Per-token hint loss in plain loops over the feature dimension (the documented formulas)."""
    flat_p = projected.reshape(-1, projected.shape[-1]).tolist()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).tolist()
    out = []
    for p_row, t_row in zip(flat_p, flat_t):
        if kind == "mse":
            out.append(sum((a - b) ** 2 for a, b in zip(p_row, t_row)) / len(p_row))
        else:
            dot = sum(a * b for a, b in zip(p_row, t_row))
            norm_p = max(sum(a * a for a in p_row) ** 0.5, 1e-8)
            norm_t = max(sum(b * b for b in t_row) ** 0.5, 1e-8)
            out.append(1.0 - dot / (norm_p * norm_t))
    return torch.tensor(out, dtype=torch.float64).reshape(projected.shape[:-1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_hint_loss_matches_hand_formula(shape, kind, reduction):
    *lead, d_s, d_t = shape
    student, teacher, weight, bias = _pair(lead, d_s, d_t)
    loss = kdkernels.feature_alignment_loss(student, teacher, weight, projection_bias=bias, kind=kind,
                                            reduction=reduction)
    tokens = _hand_token_loss(student.detach() @ weight.detach().T + bias.detach(), teacher, kind)
    expected = {"mean": tokens.mean(), "batchmean": tokens.sum() / lead[0], "sum": tokens.sum(),
                "none": tokens}[reduction]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_mask_drops_tokens_from_the_mean(kind):
    student, teacher, weight, _ = _pair([4, 6], 5, 8)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    loss = kdkernels.feature_alignment_loss(student, teacher, weight, kind=kind, mask=mask)
    kept = kdkernels.feature_alignment_loss(student[mask], teacher[mask], weight, kind=kind)
    torch.testing.assert_close(loss, kept)
    nothing = kdkernels.feature_alignment_loss(student, teacher, weight, kind=kind,
                                               mask=torch.zeros(4, 6, dtype=torch.bool))
    assert nothing.item() == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("held", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_masked_tokens_contribute_nothing_whatever_they_hold(kind, reduction, held):
    student, teacher, weight, bias = _pair([4, 6], 5, 8)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.4
    options = dict(projection_bias=bias, kind=kind, mask=mask, reduction=reduction)
    clean = kdkernels.feature_alignment_loss(student, teacher, weight, **options)
    clean_grads = torch.autograd.grad(clean.sum(), (student, weight, bias))
    dirty_student, dirty_teacher = student.detach().clone(), teacher.clone()
    dirty_student[~mask] = held
    dirty_teacher[~mask] = held
    dirty_student.requires_grad_(True)
    dirty = kdkernels.feature_alignment_loss(dirty_student, dirty_teacher, weight, **options)
    dirty_grads = torch.autograd.grad(dirty.sum(), (dirty_student, weight, bias))
    torch.testing.assert_close(dirty, clean)
    for actual, expected in zip(dirty_grads, clean_grads):
        torch.testing.assert_close(actual, expected * (mask[..., None] if actual.dim() == 3 else 1))


def test_a_counted_token_holding_nan_in_the_teacher_is_refused():
    student, teacher, weight, _ = _pair([4, 6], 5, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    teacher[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_hidden"):
        kdkernels.feature_alignment_loss(student, teacher, weight, mask=mask)


def test_projection_forms_agree():
    student, teacher, weight, bias = _pair([5], 6, 4)
    linear = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    by_tensor = kdkernels.feature_alignment_loss(student, teacher, weight, projection_bias=bias)
    by_module = kdkernels.feature_alignment_loss(student, teacher, linear)
    torch.testing.assert_close(by_tensor, by_module)
    same_width = kdkernels.feature_alignment_loss(student[:, :4], teacher)  # no projection
    torch.testing.assert_close(same_width, F.mse_loss(student[:, :4], teacher))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hint_loss_gradients(kind):
    student, teacher, weight, bias = _pair([3, 4], 5, 6)
    teacher.requires_grad_()

    def loss_fn(s, w, b):
        return kdkernels.feature_alignment_loss(s, teacher, w, projection_bias=b, kind=kind)

    assert torch.autograd.gradcheck(loss_fn, (student, weight, bias))
    loss_fn(student, weight, bias).backward()
    assert teacher.grad is None  # the teacher never receives a gradient


def test_cosine_of_a_zero_vector_is_finite():
    student = torch.zeros(2, 3, requires_grad=True)
    loss = kdkernels.feature_alignment_loss(student, torch.randn(2, 3), kind="cosine")
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype):
    student, teacher, _, _ = _pair([6, 3], 8, 8, dtype=torch.float32)
    low = kdkernels.feature_alignment_loss(student.to(dtype), teacher.to(dtype), kind="cosine")
    assert low.dtype == torch.float32
    reference = kdkernels.feature_alignment_loss(student.to(dtype).double(), teacher.to(dtype).double(),
                                                 kind="cosine")
    torch.testing.assert_close(low.double(), reference, rtol=1e-5, atol=1e-6)


def test_module_owns_a_learned_projection():
    align = FeatureAlignmentLoss(5, 9, kind="cosine")
    assert [tuple(p.shape) for p in align.parameters()] == [(9, 5), (9,)]
    student, teacher, _, _ = _pair([4], 5, 9, dtype=torch.float32)
    loss = align(student, teacher)
    loss.backward()
    assert align.projection.weight.grad is not None and student.grad is not None
    expected = kdkernels.feature_alignment_loss(student, teacher, align.projection, kind="cosine")
    torch.testing.assert_close(loss, expected)
    assert list(FeatureAlignmentLoss(4, 4, project=False).parameters()) == []


def _hand_attention_loss(student, teacher, p, channel_dim):
    losses = []
    for s, t in zip(student, teacher):  # per sample
        maps = []
        for features in (s, t):
            pooled = features.abs().pow(p).mean(dim=channel_dim - 1 if channel_dim > 0 else channel_dim)
            flat = pooled.flatten()
            maps.append(flat / max(float(flat.norm()), 1e-8))
        losses.append(float(((maps[0] - maps[1]) ** 2).sum()))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("shape_s, shape_t, channel_dim", [
    ((3, 7, 5), (3, 7, 11), -1),          # transformer hidden states, channels last
    ((2, 4, 3, 5), (2, 6, 3, 5), 1),      # conv feature maps, channels first
])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attention_transfer_matches_hand_formula(shape_s, shape_t, channel_dim, p):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(*shape_s, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*shape_t, generator=generator, dtype=torch.float64)
    per_sample = kdkernels.attention_transfer_loss(student, teacher, p=p, channel_dim=channel_dim, reduction="none")
    torch.testing.assert_close(per_sample.detach(), _hand_attention_loss(student.detach(), teacher, p, channel_dim))
    mean = AttentionTransferLoss(p=p, channel_dim=channel_dim)(student, teacher)
    torch.testing.assert_close(mean, per_sample.mean())
    assert torch.autograd.gradcheck(
        lambda s: kdkernels.attention_transfer_loss(s, teacher, p=p, channel_dim=channel_dim), (student,))


HINT_BAD_INPUTS = [
    (dict(student_hidden=[1.0, 2.0]), TypeError, "student_hidden"),
    (dict(teacher_hidden=torch.zeros(4, 3, dtype=torch.long)), TypeError, "teacher_hidden"),
    (dict(teacher_hidden=torch.zeros(5, 3)), ValueError, "teacher_hidden"),
    (dict(student_hidden=torch.zeros(4)), ValueError, "student_hidden"),
    (dict(teacher_hidden=torch.full((4, 3), float("nan"))), ValueError, "teacher_hidden"),
    (dict(teacher_hidden=torch.zeros(4, 6)), ValueError, "projection"),  # widths differ, no projection
    (dict(projection=torch.zeros(6, 5)), ValueError, "projection"),
    (dict(projection=torch.zeros(6, 3), projection_bias=torch.zeros(5)), ValueError, "projection_bias"),
    (dict(projection="linear"), TypeError, "projection"),
    (dict(projection=torch.nn.Linear(3, 7), teacher_hidden=torch.zeros(4, 6)), ValueError, "projection"),
    (dict(kind="l1"), ValueError, "kind"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(mask=torch.ones(4)), TypeError, "mask"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
]


@pytest.mark.parametrize("overrides, error, name", HINT_BAD_INPUTS, ids=[f"{e.__name__}-{n}-{i}" for i, (_, e, n) in
                                                                          enumerate(HINT_BAD_INPUTS)])
def test_hint_loss_bad_input_names_the_argument(overrides, error, name):
    arguments = dict(student_hidden=torch.zeros(4, 3), teacher_hidden=torch.zeros(4, 3))
    arguments.update(overrides)
    with pytest.raises(error, match=name):
        kdkernels.feature_alignment_loss(**arguments)


@pytest.mark.parametrize("arguments, error, name", [
    (dict(student_dim=0, teacher_dim=4), ValueError, "student_dim"),
    (dict(student_dim=4, teacher_dim=2.5), TypeError, "teacher_dim"),
    (dict(student_dim=4, teacher_dim=4, kind="huber"), ValueError, "kind"),
    (dict(student_dim=4, teacher_dim=8, project=False), ValueError, "project"),
])
def test_module_bad_arguments(arguments, error, name):
    with pytest.raises(error, match=name):
        FeatureAlignmentLoss(**arguments)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(student_features=torch.zeros(2, 3)), ValueError, "student_features"),
    (dict(teacher_features=torch.zeros(2, 4)), ValueError, "teacher_features"),
    (dict(teacher_features=torch.zeros(2, 5, 6)), ValueError, "teacher_features"),
    (dict(channel_dim=0), ValueError, "channel_dim"),
    (dict(channel_dim=3), ValueError, "channel_dim"),
    (dict(p=0.0), ValueError, "p"),
    (dict(reduction="max"), ValueError, "reduction"),
])
def test_attention_transfer_bad_input_names_the_argument(overrides, error, name):
    arguments = dict(student_features=torch.zeros(2, 4, 3), teacher_features=torch.zeros(2, 4, 6))
    arguments.update(overrides)
    with pytest.raises(error, match=name):
        kdkernels.attention_transfer_loss(**arguments)
