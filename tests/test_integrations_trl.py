"""kdkernels.integrations.trl.generalized_jsd_loss against TRL GKD's formula, written here from
its definition (and against TRL itself when it is installed)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_within_eager_error, make_labels, make_pair
from kdkernels.integrations.trl import generalized_jsd_loss

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
SHAPE = (3, 7, 33)  # [B, S, V]


def gkd_terms(student_logits, teacher_logits, beta, temperature):
    """TRL's per-entry terms: F.kl_div(input, target, log_target=True) = e^target (target - input);
    beta = 0: kl_div(log q, log p) = KL(p || q); beta = 1: kl_div(log p, log q) = KL(q || p);
    otherwise beta kl_div(log m, log p) + (1 - beta) kl_div(log m, log q), m = beta p + (1 - beta) q."""
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    kl_div = lambda input, target: F.kl_div(input, target, reduction="none", log_target=True)  # noqa: E731
    if beta == 0:
        return kl_div(log_q, log_p)
    if beta == 1:
        return kl_div(log_p, log_q)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return beta * kl_div(log_m, log_p) + (1 - beta) * kl_div(log_m, log_q)


def gkd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction="batchmean"):
    """TRL's masking (labels == -100 dropped) and reductions."""
    terms = gkd_terms(student_logits, teacher_logits, beta, temperature)
    if labels is not None:
        terms = terms[labels != -100]
    if reduction == "batchmean":
        return terms.sum() / (max(int((labels != -100).sum()), 1) if labels is not None else terms.size(0))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def loss_and_grad(loss_fn, student, teacher, labels, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_fn(student, teacher, labels, **kwargs)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype) if loss.dim() else None)
    return loss.detach(), student.grad


def compare_with_formula(student, teacher, labels, **kwargs):
    """kdkernels vs the formula in float64 (oracle) and in float32 (eager): loss and gradient."""
    ours = loss_and_grad(generalized_jsd_loss, student, teacher, labels, **kwargs)
    eager = loss_and_grad(gkd_loss, student, teacher, labels, **kwargs)
    oracle = loss_and_grad(gkd_loss, student.double(), teacher.double(), labels, **kwargs)
    assert_within_eager_error(ours[0], eager[0], oracle[0], what="loss", floor_dtype=torch.float32)
    assert_within_eager_error(ours[1], eager[1], oracle[1], what="gradient")


@pytest.mark.parametrize("masked", [False, True], ids=["no labels", "labels with -100"])
@pytest.mark.parametrize("beta, temperature", list(itertools.product(BETAS, TEMPERATURES)))
def test_matches_trl_formula(beta, temperature, masked):
    student, teacher = make_pair(SHAPE, seed=int(beta * 10 + temperature * 3))
    labels = make_labels(SHAPE[:2], SHAPE[2], ignored=(slice(None), slice(0, 3))) if masked else None
    compare_with_formula(student, teacher, labels, beta=beta, temperature=temperature)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("masked", [False, True], ids=["no labels", "labels with -100"])
def test_reductions_match_trl(reduction, beta, masked):
    student, teacher = make_pair(SHAPE, seed=3)
    labels = make_labels(SHAPE[:2], SHAPE[2], ignored=(slice(None), slice(2, 5))) if masked else None
    compare_with_formula(student, teacher, labels, beta=beta, temperature=2.0, reduction=reduction)


def test_two_dimensional_logits_batchmean_divides_by_rows():
    student, teacher = make_pair((11, 29), seed=4)
    compare_with_formula(student, teacher, None, beta=0.5, temperature=1.0)


def test_num_items_in_batch_divides_the_sum():
    student, teacher = make_pair(SHAPE, seed=5)
    labels = make_labels(SHAPE[:2], SHAPE[2], ignored=(0, slice(None)))
    total = generalized_jsd_loss(student, teacher, labels, beta=0.3, reduction="sum")
    assert float(generalized_jsd_loss(student, teacher, labels, beta=0.3, num_items_in_batch=40)) == pytest.approx(
        float(total) / 40, rel=1e-6)


def test_all_positions_ignored_gives_zero():
    student, teacher = make_pair(SHAPE, seed=6)
    labels = torch.full(SHAPE[:2], -100)
    for reduction in ("batchmean", "sum", "mean"):
        assert float(generalized_jsd_loss(student, teacher, labels, reduction=reduction)) == 0.0


@pytest.mark.parametrize("bad, match", [(dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature"),
                                        (dict(reduction="avg"), "reduction")])
def test_bad_arguments_are_refused(bad, match):
    student, teacher = make_pair(SHAPE, seed=7)
    for reduction in ("batchmean", "none"):
        with pytest.raises(ValueError, match=match):
            generalized_jsd_loss(student, teacher, **{"reduction": reduction, **bad})


def _trl_generalized_jsd_loss():
    """TRL's own function, if TRL (and what its GKD module imports) is installed."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        GKDTrainer = pytest.importorskip("trl").GKDTrainer  # TRL versions before trl.experimental
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("masked", [False, True], ids=["no labels", "labels with -100"])
@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.1, 2.0), (0.5, 0.5), (0.9, 1.0), (1.0, 2.0)])
def test_matches_trl_itself(beta, temperature, masked):
    trl_loss = _trl_generalized_jsd_loss()
    student, teacher = make_pair(SHAPE, seed=8)
    labels = make_labels(SHAPE[:2], SHAPE[2], ignored=(slice(None), slice(0, 2))) if masked else None
    ours = loss_and_grad(generalized_jsd_loss, student, teacher, labels, beta=beta, temperature=temperature)
    theirs = loss_and_grad(lambda s, t, y, **kw: trl_loss(s, t, y, **kw), student, teacher, labels,
                           beta=beta, temperature=temperature)
    oracle = loss_and_grad(gkd_loss, student.double(), teacher.double(), labels, beta=beta, temperature=temperature)
    assert_within_eager_error(ours[0], theirs[0], oracle[0], what="loss", floor_dtype=torch.float32)
    assert_within_eager_error(ours[1], theirs[1], oracle[1], what="gradient")
    assert math.isclose(float(ours[0]), float(theirs[0]), rel_tol=1e-5)
