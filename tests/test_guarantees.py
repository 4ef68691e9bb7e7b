"""What every public loss promises beyond matching the reference on ordinary input: no silent wrong
answer. One test per failure class (the numbered cases below), parametrised over every public loss
and backend it applies to:

 1. backward never scales in place memory the user, or a later backward, can see: a second
    backward through a retained graph adds the right gradient, a result of torch.autograd.grad
    survives a later backward, and no gradient a caller holds is written by a later call (the CPU
    buffer cache hands freed mappings to the next call of the same size);
 2. zero tokens: loss 0 (an empty tensor for reduction="none") and zero gradients;
 3. a teacher row that is entirely -inf has no KD term, keeps its CE term and counts in the mean;
 4. student -inf entries that make a non-ignored row's loss infinite or undefined raise a
    ValueError naming student_logits; ignored rows are never looked at;
 5. the fused backends are first-order and say so when differentiated twice; backend="reference"
    gives the true second derivative;
 6. fused_linear_kd_loss(reduction="none") computes its gradients from the tensors of the forward
    pass, or raises autograd's in-place error when they were changed in between;
 7. temperatures outside [1e-6, 1e6] raise a ValueError naming temperature;
 8. the mixture weights (beta, 1 - beta) keep their precision for beta near 0 and 1;
 9. masked tokens / ignored rows contribute nothing, whatever they hold (NaN, +-inf);
10. every public loss traces under torch.compile(fullgraph=True) and matches eager;
11. a second backward after a scaled first one works (no spurious in-place error);
12. integer arguments beyond int64 give the right answer or a ValueError naming the argument.

The Triton backend runs here under the Triton interpreter, in one child pytest process with
TRITON_INTERPRET=1 (set before triton is imported; see tests/test_triton.py):
``test_triton_interpreter_cases`` reports its outcome, and ``TRITON_INTERPRET=1 pytest
tests/test_guarantees.py -k triton`` shows each case. Shapes are tiny on purpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from conftest import DIVERGENCE_NAMES, assert_within_eager_error, check_against_reference, make_labels, make_pair
from triton_interpreter import INTERPRETING, run_interpreter_cases

THIS_FILE = os.path.abspath(__file__)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

ROWS, VOCAB, HIDDEN = 6, 37, 8
IGNORE = -100
MIXTURES = ("jsd", "skew_kl", "skew_reverse_kl")


# --- the public losses under test, each from the same kind of random inputs ---------------------------

@dataclass
class Inputs:
    """`params`: the tensors that receive a gradient (fresh leaves); `fixed`: the rest."""

    params: List[torch.Tensor]
    fixed: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


def _randn(shape, seed, std=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def logits_inputs(seed=0, rows=ROWS, vocab=VOCAB, batch=None) -> Inputs:
    """Student/teacher logits and labels with one ignored row."""
    batch = (rows,) if batch is None else batch
    student, teacher = make_pair((*batch, vocab), seed=seed)
    labels = make_labels(batch, vocab, seed=seed)
    if labels.numel() > 1:
        labels.view(-1)[-1] = IGNORE
    return Inputs([student.requires_grad_(True)], {"teacher": teacher, "labels": labels})


def linear_inputs(seed=0, rows=ROWS, vocab=VOCAB, hidden=HIDDEN) -> Inputs:
    """Student hidden / lm_head weight / bias and a teacher lm_head, logits of std ~3."""
    params = [_randn((rows, hidden), seed), _randn((vocab, hidden), seed + 1, 3 / math.sqrt(hidden)),
              _randn((vocab,), seed + 2)]
    fixed = {"teacher_hidden": _randn((rows, hidden), seed + 3),
             "teacher_weight": _randn((vocab, hidden), seed + 4, 3 / math.sqrt(hidden)),
             "teacher_bias": _randn((vocab,), seed + 5),
             "labels": make_labels((rows,), vocab, seed=seed)}
    if rows > 1:
        fixed["labels"][-1] = IGNORE
    return Inputs([p.requires_grad_(True) for p in params], fixed)


def feature_inputs(seed=0, rows=ROWS, width=HIDDEN) -> Inputs:
    params = [_randn((rows, width), seed), _randn((width + 3, width), seed + 1, 1 / math.sqrt(width))]
    return Inputs([p.requires_grad_(True) for p in params], {"teacher_hidden": _randn((rows, width + 3), seed + 2)})


def _kd(inputs: Inputs, backend, **options):
    options = {"temperature": 2.0, "ce_weight": 0.3, "divergence": "jsd", "beta": 0.3, **options}
    return kdkernels.kd_loss(inputs.params[0], inputs.fixed["teacher"], inputs.fixed["labels"], backend=backend,
                             **options)


def _cakd(inputs: Inputs, backend, **options):
    options = {"temperature": 2.0, "groups": "teacher_topk", "k": 3, "scd_weight": 0.7, **options}
    return kdkernels.cakd_loss(inputs.params[0], inputs.fixed["teacher"], inputs.fixed["labels"], backend=backend,
                               **options)


def _dkd(inputs: Inputs, backend, **options):
    return kdkernels.dkd_loss(inputs.params[0], inputs.fixed["teacher"], inputs.fixed["labels"], backend=backend,
                              **options)


def _fused(inputs: Inputs, backend, **options):
    options = {"temperature": 2.0, "ce_weight": 0.3, "chunk_size": 4, **options}
    hidden, weight, bias = inputs.params
    teacher = {k: v for k, v in inputs.fixed.items() if k != "labels"}
    return kdkernels.fused_linear_kd_loss(hidden, weight, labels=inputs.fixed["labels"], student_bias=bias,
                                          backend=backend, **teacher, **options)


def _fused_materialised(inputs: Inputs, backend, **options):
    """fused_linear_kd_loss written out: the logits in full, then kd_loss (plain autograd)."""
    options = {"temperature": 2.0, "ce_weight": 0.3, **options}
    fixed = inputs.fixed
    teacher = F.linear(fixed["teacher_hidden"], fixed["teacher_weight"], fixed["teacher_bias"])
    return kdkernels.kd_loss(F.linear(*inputs.params), teacher, fixed["labels"], backend=backend, **options)


def _features(inputs: Inputs, backend, **options):
    hidden, projection = inputs.params
    return kdkernels.feature_alignment_loss(hidden, inputs.fixed["teacher_hidden"], projection, **options)


@dataclass(frozen=True)
class Loss:
    name: str
    call: Callable
    inputs: Callable
    backends: tuple


KERNEL_BACKENDS = ("cpu", "reference") + (("triton",) if INTERPRETING else ())
KD = Loss("kd_loss", _kd, logits_inputs, KERNEL_BACKENDS)
CAKD = Loss("cakd_loss", _cakd, logits_inputs, ("cpu", "reference"))
DKD = Loss("dkd_loss", _dkd, logits_inputs, ("cpu", "reference"))
FUSED = Loss("fused_linear_kd_loss", _fused, linear_inputs, KERNEL_BACKENDS)
FEATURES = Loss("feature_alignment_loss", _features, feature_inputs, ("torch",))
GRADIENT_LOSSES = (KD, CAKD, DKD, FUSED)


def cases(losses, only=None):
    """pytest params (loss, backend) for every backend of every loss; `only` keeps some backends."""
    return [pytest.param(loss, backend, id=f"{loss.name}-{backend}")
            for loss in losses for backend in loss.backends if only is None or backend in only]


def fused_backends(backends=KERNEL_BACKENDS):
    """The fused (first-order, compiled or GPU) backends among `backends`."""
    return tuple(b for b in backends if b != "reference")


def grads_of(loss_value, inputs: Inputs, grad_output=None, **kwargs):
    grad_output = torch.ones_like(loss_value) if grad_output is None else grad_output
    return torch.autograd.grad(loss_value, inputs.params, grad_output, **kwargs)


def fresh(inputs: Inputs) -> Inputs:
    """The same values as new leaves (for a second, independent computation)."""
    return Inputs([p.detach().clone().requires_grad_(True) for p in inputs.params],
                  {k: None if v is None else v.clone() for k, v in inputs.fixed.items()})


def set_entries(inputs: Inputs, where: str, index, value) -> None:
    """inputs[where][index] = value, where "student" is the first gradient input (replaced by a
    new leaf holding the value) and anything else a key of `fixed` (changed in place)."""
    if where == "student":
        changed = inputs.params[0].detach().clone()
        changed[index] = value
        inputs.params[0] = changed.requires_grad_(True)
    else:
        inputs.fixed[where][index] = value


def assert_same(actual, expected, what, rtol=1e-5, atol=1e-6):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}, gradient {i}: {m}")


def test_triton_interpreter_cases():
    pytest.importorskip("triton")
    run_interpreter_cases(THIS_FILE, "-k", "triton")


if INTERPRETING:  # the child process runs the interpreter cases themselves
    del test_triton_interpreter_cases


@pytest.fixture(autouse=True)
def small_triton_tiles(monkeypatch):
    # tiles of 16 columns, so that every row spans several tiles with a ragged last one
    if INTERPRETING:
        from kdkernels.backends.triton import kd_loss

        monkeypatch.setattr(kd_loss, "MAX_BLOCK", 16)


# --- 1. backward never scales memory the user or a later backward can see --------------------------

@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_1_second_backward_through_a_retained_graph_adds_the_right_gradient(loss, backend, reduction):
    inputs = loss.inputs(seed=1)
    value = loss.call(inputs, backend, reduction=reduction)
    # mean: the zero-copy path (incoming gradient 1) first; none: one incoming value per row
    first_output = torch.ones_like(value) if reduction == "mean" else _randn(value.shape, 11)
    value.backward(first_output, retain_graph=True)
    first = [p.grad.clone() for p in inputs.params]
    value.backward(3.0 * first_output)
    assert_same([p.grad for p in inputs.params], [4.0 * g for g in first],
                "x.grad after backward(g) then backward(3 g) must be 4x the first")


@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_1_autograd_grad_result_survives_a_later_backward(loss, backend):
    inputs = loss.inputs(seed=2)
    value = loss.call(inputs, backend)
    grads = grads_of(value, inputs, retain_graph=True)
    kept = [g.clone() for g in grads]
    (0.5 * value).backward(retain_graph=True)
    torch.autograd.grad(value, inputs.params, torch.tensor(-2.0))
    assert_same(grads, kept, "a gradient returned by torch.autograd.grad was changed by a later backward",
                rtol=0, atol=0)
    assert_same([p.grad for p in inputs.params], [0.5 * g for g in kept], "x.grad of (0.5 * loss).backward()")


@pytest.mark.parametrize("grad_output", (1.0, 2.5))
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_1_gradients_alias_nothing_a_later_call_writes(loss, backend, grad_output):
    """Acceptance 3: gradients handed out (by .backward() into .grad and by torch.autograd.grad) are
    never written by a later call of the same shape or a later backward, even once the graph that
    produced them is freed (its buffers may go back to the CPU cache)."""
    held, kept = [], []
    for seed in range(3):
        inputs = loss.inputs(seed=10 + seed)
        value = loss.call(inputs, backend)
        if seed % 2 == 0:
            grads = grads_of(value, inputs, torch.tensor(grad_output))
        else:
            value.backward(torch.tensor(grad_output))
            grads = [p.grad for p in inputs.params]
        del value, inputs  # the graph and its saved buffers are freed
        held.extend(grads)
        kept.extend(g.clone() for g in grads)
    kdkernels.empty_cpu_cache()
    assert_same(held, kept, "a gradient the caller holds was overwritten by a later call", rtol=0, atol=0)
    spans = sorted((g.data_ptr(), g.numel() * g.element_size()) for g in held if g.numel())
    for (start, size), (next_start, _) in zip(spans, spans[1:]):
        assert start + size <= next_start, "two gradients handed out share memory"


# --- 2. zero tokens ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ("mean", "batchmean", "sum", "none"))
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES + (FEATURES,)))
def test_2_zero_tokens_give_zero_loss_and_zero_gradients(loss, backend, reduction):
    # a call with tokens first, so that a reused (CPU-cached) buffer holds stale gradients
    loss.call(loss.inputs(seed=3), backend, reduction="sum").backward()
    for options in ({}, {"chunk_size": None}) if loss is FUSED else ({},):
        inputs = loss.inputs(seed=4, rows=0)
        value = loss.call(inputs, backend, reduction=reduction, **options)
        if reduction == "none":
            assert value.shape == (0,)
        else:
            assert value.shape == () and float(value) == 0.0, f"loss over zero tokens is {value}"
        value.sum().backward()
        for p in inputs.params:
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), \
                f"gradient over zero tokens is not zero: {p.grad}"
        with torch.no_grad():
            value = loss.call(loss.inputs(seed=5, rows=0), backend, reduction=reduction, **options)
        assert value.numel() == 0 if reduction == "none" else float(value) == 0.0


@pytest.mark.parametrize("loss,backend", cases((KD, CAKD, DKD)))
def test_2_zero_tokens_in_a_batch_of_empty_sequences(loss, backend):
    inputs = logits_inputs(seed=6, batch=(2, 0))
    value = loss.call(inputs, backend, reduction="batchmean")
    value.backward()
    assert float(value) == 0.0 and inputs.params[0].grad.shape == (2, 0, VOCAB)


# --- 3. a teacher row that is entirely -inf ------------------------------------------------------------

def _teacher_logits_inputs(loss: Loss, seed: int, masked_row: Optional[int] = None) -> Inputs:
    """Inputs with ready teacher logits (fused: teacher_logits instead of its lm_head), whose row
    `masked_row` is all -inf."""
    inputs = loss.inputs(seed=seed)
    if loss is FUSED:
        teacher = inputs.fixed
        teacher["teacher_logits"] = F.linear(teacher.pop("teacher_hidden"), teacher.pop("teacher_weight"),
                                             teacher.pop("teacher_bias"))
    if masked_row is not None:
        inputs.fixed["teacher_logits" if loss is FUSED else "teacher"][masked_row] = -math.inf
    return inputs


def _student_logits64(loss: Loss, inputs: Inputs) -> torch.Tensor:
    if loss is FUSED:
        hidden, weight, bias = (p.detach().double() for p in inputs.params)
        return F.linear(hidden, weight, bias)
    return inputs.params[0].detach().double()


@pytest.mark.parametrize("loss,backend", cases((KD, FUSED, CAKD, DKD)))
def test_3_fully_masked_teacher_row_has_no_kd_term_but_keeps_its_ce(loss, backend):
    ce_weight = 0.3 if loss in (KD, FUSED) else 0.0  # CAKD / DKD have no CE term: the row is 0
    masked = _teacher_logits_inputs(loss, seed=7, masked_row=1)
    rows = loss.call(masked, backend, reduction="none")
    assert torch.isfinite(rows).all(), f"row losses {rows}"
    student = _student_logits64(loss, masked)
    label = masked.fixed["labels"][1]
    expected_ce = ce_weight * F.cross_entropy(student[1:2], label.view(1)).item()
    assert rows[1].item() == pytest.approx(expected_ce, rel=1e-5, abs=1e-6), "the masked row's CE was dropped"
    # the other rows are unaffected, and the masked row counts in the mean like any valid row
    other_rows = loss.call(_teacher_logits_inputs(loss, seed=7), backend, reduction="none").detach()
    keep = [0, 2, 3, 4, 5]
    torch.testing.assert_close(rows.detach()[keep], other_rows[keep])
    mean = loss.call(fresh(masked), backend, reduction="mean")
    valid = int((masked.fixed["labels"] != IGNORE).sum())
    assert float(mean) == pytest.approx(float(rows.sum()) / valid, rel=1e-5)
    # the masked row's gradient: that of its CE term alone (through the lm_head for the fused loss)
    rows.sum().backward()
    expected = ce_weight * (student[1].softmax(-1) - F.one_hot(label, VOCAB).double())
    if loss is FUSED:
        expected = expected @ masked.params[1].detach().double()
    torch.testing.assert_close(masked.params[0].grad[1].double(), expected, rtol=1e-5, atol=1e-6)


# --- 4. student -inf entries that make the loss infinite or undefined ----------------------------------

def _student_minus_inf(loss: Loss, backend: str, case: str, divergence="forward_kl"):
    inputs = loss.inputs(seed=8)
    label = int(inputs.fixed["labels"][1])
    if case == "whole_row":
        set_entries(inputs, "student", 1, -math.inf)
    elif case == "teacher_mass_on_a_masked_entry":  # not the label: in W for DKD; a finite teacher entry
        set_entries(inputs, "student", (1, (label + 1) % VOCAB), -math.inf)
    else:  # the label of a CE row, masked on both sides: only the CE term sees it
        set_entries(inputs, "student", (1, label), -math.inf)
        set_entries(inputs, "teacher", (1, label), -math.inf)
    return loss.call(inputs, backend, **({"divergence": divergence} if loss is KD else {}))


STUDENT_INF_CASES = (
    [pytest.param(KD, b, "whole_row", d, id=f"kd_loss-{b}-whole_row-{d}") for b in KD.backends for d in DIVERGENCE_NAMES]
    + [pytest.param(KD, b, "teacher_mass_on_a_masked_entry", "forward_kl", id=f"kd_loss-{b}-teacher_mass-forward_kl")
       for b in KD.backends]
    + [pytest.param(KD, b, "label_of_a_ce_row", "reverse_kl", id=f"kd_loss-{b}-label-ce")
       for b in KD.backends]
    + [pytest.param(loss, b, case, None, id=f"{loss.name}-{b}-{case}") for loss in (CAKD, DKD) for b in loss.backends
       for case in ("whole_row", "teacher_mass_on_a_masked_entry")])


@pytest.mark.parametrize("loss,backend,case,divergence", STUDENT_INF_CASES)
def test_4_student_minus_inf_that_makes_a_row_infinite_is_refused(loss, backend, case, divergence):
    with pytest.raises(ValueError, match="student_logits"):
        _student_minus_inf(loss, backend, case, divergence)


@pytest.mark.parametrize("backend", FUSED.backends)
def test_4_teacher_mass_on_ids_the_student_lm_head_lacks_is_refused(backend):
    # the student's missing vocabulary columns are -inf logits: forward KL of a teacher with mass
    # there is infinite
    inputs = linear_inputs(seed=9)
    inputs.params[1] = inputs.params[1].detach()[: VOCAB - 5].clone().requires_grad_(True)
    inputs.params[2] = inputs.params[2].detach()[: VOCAB - 5].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="student"):
        _fused(inputs, backend, ce_weight=0.0)


@pytest.mark.parametrize("case", ("whole_row", "one_entry"))
@pytest.mark.parametrize("loss,backend", cases((KD, CAKD, DKD)))
def test_4_ignored_rows_are_never_looked_at(loss, backend, case):
    inputs = loss.inputs(seed=8)
    inputs.fixed["labels"][1] = IGNORE
    expected = loss.call(fresh(inputs), backend, reduction="none").detach()
    set_entries(inputs, "student", (1, slice(None) if case == "whole_row" else 3), -math.inf)
    value = loss.call(inputs, backend, reduction="none")
    value.sum().backward()
    torch.testing.assert_close(value.detach(), expected)
    grad = inputs.params[0].grad
    assert torch.isfinite(grad).all() and not grad[1].any()


# --- 5. double backward --------------------------------------------------------------------------------

def _gradient_penalty(loss: Loss, inputs: Inputs, backend: str):
    """d/dparams [loss + |d loss / d params|^2] (a gradient penalty)."""
    value = loss.call(inputs, backend)
    grads = torch.autograd.grad(value, inputs.params, create_graph=True)
    total = value + sum((g ** 2).sum() for g in grads)
    return torch.autograd.grad(total, inputs.params)


@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES, only=fused_backends()))
def test_5_fused_backends_refuse_double_backward(loss, backend):
    with pytest.raises(RuntimeError, match="reference"):
        _gradient_penalty(loss, loss.inputs(seed=12), backend)


@pytest.mark.parametrize("loss", GRADIENT_LOSSES, ids=lambda loss: loss.name)
def test_5_reference_backend_gives_the_true_second_derivative(loss):
    inputs = loss.inputs(seed=12)
    got = _gradient_penalty(loss, inputs, "reference")
    exact = Inputs([p.detach().double().requires_grad_(True) for p in inputs.params],
                   {k: v if v is None or not v.is_floating_point() else v.double() for k, v in inputs.fixed.items()})
    # the float64 oracle by plain autograd (for the fused loss: through the materialised logits)
    oracle = loss if loss is not FUSED else Loss(FUSED.name, _fused_materialised, FUSED.inputs, ("reference",))
    expected = _gradient_penalty(oracle, exact, "reference")
    assert_same(got, [e.float() for e in expected], "second derivative (gradient penalty)", rtol=1e-4, atol=1e-5)


# --- 6. fused_linear_kd_loss(reduction="none") and in-place changes after the forward pass -------------

@pytest.mark.parametrize("changed", ("teacher_weight", "teacher_hidden", "teacher_bias", "labels"))
@pytest.mark.parametrize("backend", FUSED.backends)
def test_6_in_place_change_after_forward_raises_or_is_not_seen(backend, changed):
    inputs = linear_inputs(seed=13)
    original = fresh(inputs)
    value = _fused(inputs, backend, reduction="none")
    row_weights = _randn(value.shape, 14)
    if changed == "labels":
        inputs.fixed["labels"].copy_(inputs.fixed["labels"].roll(1))
    else:
        inputs.fixed[changed].mul_(-2.0)
    try:
        got = grads_of(value, inputs, row_weights)
    except RuntimeError as error:
        assert "inplace" in str(error) or "in-place" in str(error) or "in place" in str(error), str(error)
        return
    expected = grads_of(_fused(original, backend, reduction="none"), original, row_weights)
    assert_same(got, expected, f"gradients after {changed} changed in place (silently wrong)")


# --- 7. temperature range ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", (5e-7, 2e6, 1.8e19, 2.9e-39, 1e-300, 1e300))
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_7_temperature_outside_the_valid_range_is_refused(loss, backend, temperature):
    with pytest.raises(ValueError, match="temperature"):
        loss.call(loss.inputs(seed=15), backend, temperature=temperature)


@pytest.mark.parametrize("temperature", (1e-6, 1e6))
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_7_temperature_at_the_ends_of_the_range_gives_finite_results(loss, backend, temperature):
    inputs = loss.inputs(seed=15)
    value = loss.call(inputs, backend, temperature=temperature)
    grads = grads_of(value, inputs)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("temperature", (1e-6, 1e6))
@pytest.mark.parametrize("backend", fused_backends())
def test_7_kd_loss_at_the_ends_of_the_range_matches_the_reference(backend, temperature):
    student, teacher = make_pair((ROWS, VOCAB), seed=16)
    check_against_reference(student, teacher, backend=backend, temperature=temperature)


# --- 8. mixture weights near 0 and 1 ----------------------------------------------------------------------

@pytest.mark.parametrize("beta", (1e-7, 1 - 1e-6, 1 - 1e-7))
@pytest.mark.parametrize("divergence", MIXTURES)
@pytest.mark.parametrize("backend", fused_backends())
def test_8_kd_loss_mixture_weight_near_the_ends_keeps_precision(backend, divergence, beta):
    student, teacher = make_pair((ROWS, 301), seed=17)
    check_against_reference(student, teacher, backend=backend, divergence=divergence, beta=beta)


@pytest.mark.parametrize("beta", (1e-7, 1 - 1e-6))
@pytest.mark.parametrize("divergence", MIXTURES)
@pytest.mark.parametrize("backend", fused_backends())
def test_8_fused_linear_mixture_weight_near_the_ends_keeps_precision(backend, divergence, beta):
    inputs = linear_inputs(seed=18, vocab=301)
    options = dict(divergence=divergence, beta=beta, ce_weight=0.0, temperature=1.0)
    got = _fused(inputs, backend, **options)
    got_grads = grads_of(got, inputs)
    # the logits in full, then the divergence by eager PyTorch (float32) and in float64
    results = {}
    for dtype in (torch.float32, torch.float64):
        cast = Inputs([p.detach().to(dtype).requires_grad_(True) for p in inputs.params],
                      {k: v if not v.is_floating_point() else v.to(dtype) for k, v in inputs.fixed.items()})
        value = _fused_materialised(cast, "reference", **options)
        results[dtype] = (value, grads_of(value, cast))
    (eager, eager_grads), (oracle, oracle_grads) = results[torch.float32], results[torch.float64]
    assert_within_eager_error(got.detach(), eager.detach(), oracle.detach(), what="loss")
    for name, g, e, o in zip(("hidden", "weight", "bias"), got_grads, eager_grads, oracle_grads):
        assert_within_eager_error(g, e, o, what=f"{name} gradient")


# --- 9. masked tokens and ignored rows contribute nothing, whatever they hold ------------------------------

@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("side", ("student_hidden", "teacher_hidden"))
@pytest.mark.parametrize("kind", ("mse", "cosine"))
def test_9_masked_tokens_holding_non_finite_values_contribute_nothing(kind, side, value, reduction):
    inputs = feature_inputs(seed=19)
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[2] = False
    clean = fresh(inputs)
    set_entries(inputs, "student" if side == "student_hidden" else side, (2, 1), value)
    got = _features(inputs, None, kind=kind, mask=mask, reduction=reduction)
    expected = _features(clean, None, kind=kind, mask=mask, reduction=reduction)
    assert torch.isfinite(got).all(), f"a masked token's {value} reached the loss: {got}"
    torch.testing.assert_close(got, expected)
    got_grads, expected_grads = grads_of(got, inputs), grads_of(expected, clean)
    assert torch.isfinite(got_grads[1]).all() and torch.isfinite(got_grads[0][mask]).all()
    torch.testing.assert_close(got_grads[1], expected_grads[1])
    assert (got_grads[0][2] == 0).all(), f"masked token's gradient {got_grads[0][2]}"


@pytest.mark.parametrize("value", (math.nan, math.inf), ids=("nan", "inf"))
@pytest.mark.parametrize("side", ("student", "teacher"))
@pytest.mark.parametrize("loss,backend", cases((KD, CAKD, DKD)))
def test_9_ignored_rows_holding_non_finite_logits_contribute_nothing(loss, backend, side, value):
    inputs = loss.inputs(seed=20)
    inputs.fixed["labels"][2] = IGNORE
    expected = loss.call(fresh(inputs), backend, reduction="none").detach()
    set_entries(inputs, side, (2, 3), value)
    got = loss.call(inputs, backend, reduction="none")
    got.sum().backward()
    torch.testing.assert_close(got.detach(), expected)
    grad = inputs.params[0].grad
    assert torch.isfinite(grad).all() and not grad[2].any()


# --- 10. torch.compile(fullgraph=True) --------------------------------------------------------------------

def _attention(inputs: Inputs, backend, **options):
    return kdkernels.attention_transfer_loss(inputs.params[0], inputs.fixed["teacher_features"], **options)


def attention_inputs(seed=0, rows=ROWS):
    return Inputs([_randn((2, rows, 5), seed).requires_grad_(True)], {"teacher_features": _randn((2, rows, 7), seed + 1)})


ATTENTION = Loss("attention_transfer_loss", _attention, attention_inputs, ("torch",))


@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES + (FEATURES, ATTENTION), only=("cpu", "reference", "torch")))
def test_10_every_loss_traces_with_fullgraph_and_matches_eager(loss, backend):
    # aot_eager traces forward and backward (AOT autograd) without Inductor's code generation
    torch._dynamo.reset()
    inputs = loss.inputs(seed=21)
    fixed = inputs.fixed

    def training_loss(*params):
        return 2.0 * loss.call(Inputs(list(params), fixed), backend)

    compiled = torch.compile(training_loss, fullgraph=True, backend="aot_eager")
    eager_inputs = fresh(inputs)
    got = compiled(*inputs.params)
    expected = training_loss(*eager_inputs.params)
    torch.testing.assert_close(got, expected)
    assert_same(grads_of(got, inputs, torch.tensor(0.7)), grads_of(expected, eager_inputs, torch.tensor(0.7)),
                "compiled vs eager")


@pytest.mark.parametrize("bad", ("nan_teacher", "temperature"))
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_10_bad_input_under_compile_is_a_clear_error(backend, bad):
    torch._dynamo.reset()
    inputs = logits_inputs(seed=22)
    temperature = 0.0 if bad == "temperature" else 2.0
    if bad == "nan_teacher":
        inputs.fixed["teacher"][1, 4] = math.nan
    compiled = torch.compile(lambda student: _kd(inputs, backend, temperature=temperature) + 0 * student.sum(),
                             fullgraph=True, backend="aot_eager")
    argument = "teacher_logits" if bad == "nan_teacher" else "temperature"
    with pytest.raises(Exception) as error:
        compiled(inputs.params[0])
    # a ValueError naming the argument, or torch.compile's report of that ValueError
    assert argument in str(error.value) and (error.type is ValueError or "ValueError" in str(error.value)), \
        f"{error.type.__name__}: {str(error.value)[:500]}"


# --- 11. a second backward after a scaled first one ------------------------------------------------------

@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_11_second_backward_after_a_scaled_one_works(loss, backend):
    inputs = loss.inputs(seed=23)
    value = loss.call(inputs, backend)
    once = fresh(inputs)
    single = grads_of(loss.call(once, backend), once)
    value.backward(torch.tensor(3.0), retain_graph=True)
    value.backward(torch.tensor(0.5))
    assert_same([p.grad for p in inputs.params], [3.5 * g for g in single], "x.grad after backward(3) + backward(0.5)")


# --- 12. integer arguments beyond int64 -------------------------------------------------------------------

HUGE_INTS = (2 ** 70, 2 ** 63, -(2 ** 63) - 1)


def _equal_or_refused(call, expected_call, argument):
    """call() equals expected_call(), or raises a ValueError naming `argument`."""
    try:
        got = call()
    except ValueError as error:
        assert argument in str(error), str(error)
        return
    torch.testing.assert_close(got, expected_call())


@pytest.mark.parametrize("huge", HUGE_INTS[:2])
@pytest.mark.parametrize("backend", CAKD.backends)
def test_12_cakd_k_beyond_int64_means_every_class(backend, huge):
    inputs = logits_inputs(seed=24)
    _equal_or_refused(lambda: _cakd(inputs, backend, k=huge), lambda: _cakd(inputs, backend, k=VOCAB), "k")


@pytest.mark.parametrize("huge", HUGE_INTS)
@pytest.mark.parametrize("loss,backend", cases(GRADIENT_LOSSES))
def test_12_ignore_index_beyond_int64_ignores_nothing(loss, backend, huge):
    inputs = loss.inputs(seed=25)
    inputs.fixed["labels"][-1] = 0
    _equal_or_refused(lambda: loss.call(inputs, backend, ignore_index=huge),
                      lambda: loss.call(inputs, backend, ignore_index=IGNORE), "ignore_index")


@pytest.mark.parametrize("backend", FUSED.backends)
def test_12_chunk_size_beyond_int64_is_one_chunk(backend):
    inputs = linear_inputs(seed=26)
    _equal_or_refused(lambda: _fused(inputs, backend, chunk_size=2 ** 70),
                      lambda: _fused(inputs, backend, chunk_size=ROWS), "chunk_size")
