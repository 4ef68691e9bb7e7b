"""Property-based tests: every drawn call of kd_loss (cpu backend), cakd_loss / dkd_loss and
fused_linear_kd_loss is either right or refused with a ValueError naming the argument at fault;
never NaN, never a silent 0, never a crash.

hypothesis draws shapes (N = 0 and V = 1 included, [N, V] and [B, S, V]), dtypes (float32,
bfloat16, float16, student and teacher apart), strides (sliced, transposed, row-stepped, an
expanded teacher), masks (-inf vocabulary columns on both sides, on one side only, whole rows of
either side), labels with ignored rows and ignore_index values, temperatures log-uniform over the
valid range [1e-6, 1e6] (and some outside it, which must be refused), beta over [0, 1] with values
next to both ends, every divergence and reduction, the KD / CE weights, scale_by_t2 and incoming
gradients.

"Right" is judged against the oracle below, written here from the definitions in the README
(Divergences; CAKD and DKD) and run in float64: loss and gradient errors at most twice those of
the same oracle run as eager PyTorch at the input's dtype (float32 math on the same rounded
inputs, gradient in the input dtype), plus the few-ulp floor of conftest. The oracle also says
which inputs must be refused: a non-ignored row whose loss is infinite or undefined because of
the student's -inf entries (a whole row; forward-KL-type divergences or CE meeting a student -inf
where the teacher or the label puts mass) raises a ValueError naming the student; a teacher row
that is entirely -inf has no KD term and keeps its CE term.

Profiles (registered in conftest.py): ``ci``, the default, derandomized and sized to run in well
under three minutes on two cores; ``long`` for a deeper search:
``pytest tests/test_properties.py --hypothesis-profile=long``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kdkernels  # noqa: E402
from conftest import DIVERGENCE_NAMES, max_abs_error, tolerance_floor  # noqa: E402

REDUCTIONS = ("mean", "batchmean", "sum", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
T_MIN, T_MAX = 1e-6, 1e6
# log of a probability that float32 arithmetic may flush to 0 (the smallest normal is e^-87.3)
UNDERFLOW = -80.0
INF = math.inf
EPS32 = torch.finfo(torch.float32).eps


# --- the float64 oracle ------------------------------------------------------------------------------

def _zero_where(x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """x with the `dead` entries replaced by 0, so that no inf reaches autograd through them."""
    return torch.where(dead, torch.zeros_like(x), x)


def log_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension; rows that are entirely -inf (no distribution) give 0s."""
    dead_rows = torch.isneginf(x).all(-1, keepdim=True)
    return torch.log_softmax(_zero_where(x, dead_rows), dim=-1)


def x_log_ratio(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x (log x - log y) entrywise, x = exp(log_x): 0 where x = 0, +inf where y = 0 < x."""
    x_dead, y_dead = torch.isneginf(log_x), torch.isneginf(log_y)
    lx, ly = _zero_where(log_x, x_dead), _zero_where(log_y, y_dead)
    terms = torch.where(x_dead, torch.zeros_like(lx), lx.exp() * (lx - ly))
    return torch.where(~x_dead & y_dead, torch.full_like(terms, INF), terms)


def log_mixture(w_p: float, log_p: torch.Tensor, w_q: float, log_q: torch.Tensor) -> torch.Tensor:
    """log(w_p p + w_q q), the weights formed on the host in float64."""
    parts = torch.stack([lp + math.log(w) for w, lp in ((w_p, log_p), (w_q, log_q)) if w > 0])
    dead = torch.isneginf(parts).all(0)
    mixed = torch.logsumexp(_zero_where(parts, dead.expand_as(parts)), dim=0)
    return torch.where(dead, torch.full_like(mixed, -INF), mixed)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, name: str, beta: float) -> torch.Tensor:
    """D(p || q) per row; p the teacher, q the student."""
    if name == "forward_kl":
        terms = x_log_ratio(log_p, log_q)
    elif name == "reverse_kl":
        terms = x_log_ratio(log_q, log_p)
    elif name == "jsd":
        # a side whose weight is 0 contributes nothing (not 0 * inf)
        log_m = log_mixture(beta, log_p, 1.0 - beta, log_q)
        terms = torch.zeros_like(log_p)
        if beta > 0:
            terms = terms + beta * x_log_ratio(log_p, log_m)
        if beta < 1:
            terms = terms + (1.0 - beta) * x_log_ratio(log_q, log_m)
    elif name == "skew_kl":
        terms = x_log_ratio(log_p, log_mixture(beta, log_p, 1.0 - beta, log_q))
    elif name == "skew_reverse_kl":
        terms = x_log_ratio(log_q, log_mixture(1.0 - beta, log_p, beta, log_q))
    else:
        terms = 0.5 * (log_p.exp() - log_q.exp()).abs()
    return terms.sum(-1)


def cross_entropy(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_softmax_rows(student).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def reduce(rows: torch.Tensor, reduction: str, batch_shape, valid: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(batch_shape[0], 1)
    return total / max(int(valid.sum()), 1)


# --- drawing the inputs --------------------------------------------------------------------------------

@dataclass
class Logits:
    """A drawn pair of logits with labels; the tensors are in their drawn dtype and layout."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: Optional[torch.Tensor]
    ignore_index: int
    description: Dict[str, object] = field(default_factory=dict)

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        return tuple(self.student.shape[:-1])

    def flat(self):
        vocab = self.student.shape[-1]
        labels = None if self.labels is None else self.labels.reshape(-1)
        return self.student.reshape(-1, vocab), self.teacher.reshape(-1, vocab), labels

    def valid_rows(self) -> torch.Tensor:
        student, _, labels = self.flat()
        if labels is None:
            return torch.ones(student.shape[0], dtype=torch.bool)
        return labels != self.ignore_index


def _values(shape, seed: int, scale: float, offset: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout (a fresh tensor, not requiring grad)."""
    if layout == "sliced" and values.shape[-1] > 0:  # every other column of a wider tensor
        wide = values.new_zeros((*values.shape[:-1], 2 * values.shape[-1]))
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "row_step" and values.shape[0] > 0:  # every other row of a taller tensor
        tall = values.new_zeros((2 * values.shape[0], *values.shape[1:]))
        tall[::2] = values
        return tall[::2]
    if layout == "transposed" and values.dim() == 2:
        return values.t().contiguous().t()
    return values.clone()


@st.composite
def batch_shapes(draw) -> Tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(0, 7)),)
    return (draw(st.integers(1, 3)), draw(st.integers(0, 4)))


@st.composite
def vocab_sizes(draw) -> int:
    # small, a few SIMD vectors with a ragged tail, or one
    return draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 16, 17, 33, 130])))


@st.composite
def temperatures(draw) -> float:
    valid = st.one_of(st.sampled_from([T_MIN, T_MAX, 1.0, 2.0, 4.0]),
                      st.floats(math.log10(T_MIN), math.log10(T_MAX)).map(lambda e: min(max(10.0 ** e, T_MIN), T_MAX)))
    invalid = st.sampled_from([0.0, -1.0, 0.99e-6, 1.01e6, 2e19, 3e-39, INF, math.nan])
    return draw(st.one_of(valid, valid, valid, valid, invalid))


@st.composite
def betas(draw) -> float:
    return draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-7, 1 - 1e-7, 1e-3, 1 - 1e-3]), st.floats(0.0, 1.0)))


@st.composite
def logits_pairs(draw, *, vocab=None, with_masks=True, dtypes=DTYPES) -> Logits:
    batch = draw(batch_shapes())
    vocab = draw(vocab_sizes()) if vocab is None else vocab
    shape = (*batch, vocab)
    dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.one_of(st.just(dtype), st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2 ** 16))
    scale = draw(st.sampled_from([0.05, 1.0, 3.0, 10.0, 40.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 100.0]))
    relation = draw(st.sampled_from(["correlated", "identical", "independent"]))
    student = _values(shape, seed, scale, offset)
    noise = _values(shape, seed + 1, scale, offset)
    teacher = {"correlated": 0.6 * student + 0.8 * noise, "identical": student, "independent": noise}[relation]

    rows = max(1, math.prod(batch))
    description = dict(shape=shape, dtype=dtype, teacher_dtype=teacher_dtype, seed=seed, scale=scale,
                       offset=offset, relation=relation)
    if with_masks and math.prod(batch) > 0:
        columns = st.lists(st.integers(0, vocab - 1), max_size=3)
        row_ids = st.lists(st.integers(0, rows - 1), max_size=2)
        masks = dict(both_columns=draw(columns), teacher_columns=draw(columns), student_columns=draw(columns),
                     teacher_rows=draw(row_ids), student_rows=draw(row_ids))
        description["masks"] = masks
        flat_s, flat_t = student.view(-1, vocab), teacher.view(-1, vocab)
        flat_s[:, masks["both_columns"]] = -INF
        flat_t[:, masks["both_columns"]] = -INF
        flat_t[:, masks["teacher_columns"]] = -INF
        flat_s[:, masks["student_columns"]] = -INF
        flat_t[masks["teacher_rows"]] = -INF
        flat_s[masks["student_rows"]] = -INF

    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    labels = None
    if draw(st.booleans()):
        flat_labels = draw(st.lists(st.integers(0, vocab - 1), min_size=math.prod(batch), max_size=math.prod(batch)))
        labels = torch.tensor(flat_labels, dtype=torch.int64).reshape(batch)
        for row in draw(st.lists(st.integers(0, rows - 1), max_size=3)) if labels.numel() else ():
            labels.view(-1)[row] = ignore_index
        description["labels"] = labels.tolist()
    layouts = ["contiguous", "sliced", "row_step", "transposed"]
    student = in_layout(student.to(dtype), draw(st.sampled_from(layouts)))
    teacher_layout = draw(st.sampled_from(layouts + ["expanded"]))
    if teacher_layout == "expanded" and shape[0] > 0:  # every row of the teacher is its first
        teacher = teacher[:1].to(teacher_dtype).expand(shape)
    else:
        teacher = in_layout(teacher.to(teacher_dtype), teacher_layout)
    description.update(student_stride=student.stride(), teacher_stride=teacher.stride())
    return Logits(student, teacher, labels, ignore_index, description)


# --- comparing a call with the oracle -------------------------------------------------------------------

@dataclass
class Expected:
    """What a call must return: `refuse` names the argument a ValueError must name (None: the
    call must succeed); `may_refuse` names one it may name instead of returning the value."""

    refuse: Optional[str] = None  # a regular expression: one of several argument names
    may_refuse: Optional[str] = None


def run(call, student_leaves: List[torch.Tensor], grad_output_of):
    """(loss, gradients of `student_leaves`) of call(), the gradients under grad_output_of(loss)."""
    loss = call()
    wanted = [t for t in student_leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_output_of(loss), allow_unused=True) if wanted else []
    return loss.detach(), list(grads)


def assert_matches(actual, eager, oracle, what, *, scale: float, floor_dtype=None):
    """actual within the precision rule of the oracle; +-inf exactly where the oracle, rounded to
    the result's dtype, is (a float16 gradient of 1e6 is inf in eager PyTorch too).

    The rule is conftest's (2x eager PyTorch's error + a few ulps of the result's magnitude),
    with a floor of one float32 ulp of `scale`, the magnitude of the terms the result is a
    difference of (e.g. q - p for a gradient, the log-sum-exps for a loss): on the tiny rows drawn
    here eager PyTorch is sometimes exact by luck where the cancellation is inherent."""
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    rounded = oracle.to(actual.dtype)
    infinite = torch.isinf(rounded)
    assert not torch.isnan(actual).any(), f"{what}: NaN {actual}"
    assert torch.equal(torch.isinf(actual), infinite) and torch.equal(actual[infinite], rounded[infinite]), \
        f"{what}: infinite entries {actual} where the oracle has {oracle}"
    actual, oracle = actual[~infinite], oracle[~infinite]
    eager = torch.nan_to_num(eager.double()[~infinite], nan=INF)  # a NaN in eager PyTorch: any error beats it
    err, eager_err = max_abs_error(actual, oracle), max_abs_error(eager, oracle)
    allowed = 2.0 * eager_err + max(tolerance_floor(oracle, floor_dtype or actual.dtype), EPS32 * scale)
    assert err <= allowed, (
        f"{what}: max error {err:.3e} vs float64 oracle exceeds 2 x eager error {eager_err:.3e} + floor "
        f"(allowed {allowed:.3e}); oracle magnitude {float(oracle.abs().max()) if oracle.numel() else 0:.3e}, "
        f"term scale {scale:.3e}")


@dataclass
class OracleResult:
    """The oracle's loss and gradients, and the magnitudes of the terms behind them (floors)."""

    loss: torch.Tensor
    grads: List[torch.Tensor]
    loss_scale: float
    grad_scales: List[float]


def check_call(call, expected: Expected, oracle_fn, leaves: List[torch.Tensor], grad_output_of):
    """Runs `call` and compares it with oracle_fn(dtype) -> OracleResult in float64 and in eager
    float32, or checks the refusal `expected` asks for."""
    if expected.refuse is not None:
        with pytest.raises(ValueError, match=expected.refuse):
            call()
        return
    try:
        loss, grads = run(call, leaves, grad_output_of)
    except ValueError as error:
        if expected.may_refuse is not None and expected.may_refuse in str(error):
            return
        raise
    oracle, eager = oracle_fn(torch.float64), oracle_fn(torch.float32)
    note(f"loss {loss}\noracle {oracle.loss}")
    assert loss.dtype == torch.float32
    assert_matches(loss, eager.loss, oracle.loss, "loss", scale=oracle.loss_scale, floor_dtype=torch.float32)
    if torch.isinf(oracle.loss).any():
        return  # the gradient of an infinite loss means nothing
    for i, (got, leaf) in enumerate(zip(grads, [t for t in leaves if t.requires_grad])):
        got = torch.zeros_like(leaf) if got is None else got
        assert got.dtype == leaf.dtype, f"gradient {i}: dtype {got.dtype} != {leaf.dtype}"
        assert_matches(got, eager.grads[i], oracle.grads[i], f"gradient {i}", scale=oracle.grad_scales[i])


def oracle_grads(loss, leaves, grad_output):
    """Gradients by autograd; zeros where the loss does not depend on a leaf (e.g. jsd at beta = 1)."""
    if not loss.requires_grad:
        return [torch.zeros_like(leaf) for leaf in leaves]
    return list(torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype), allow_unused=True,
                                    materialize_grads=True))


def reduction_factor(reduction: str, batch_shape, valid: torch.Tensor) -> float:
    """d(reduced loss) / d(row loss) of a valid row."""
    if reduction == "mean":
        return 1.0 / max(int(valid.sum()), 1)
    if reduction == "batchmean":
        return 1.0 / max(batch_shape[0], 1)
    return 1.0


def finite_max(x: torch.Tensor) -> torch.Tensor:
    """Row-wise max of |x| over finite entries (0 for none) [N, V] -> [N]."""
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(-1) if x.shape[-1] else x.sum(-1)


def grad_outputs(draw):
    """A function loss -> incoming gradient: 1, a scalar != 1, or one value per row."""
    factor = draw(st.sampled_from([1.0, 1.0, 2.5, -0.5]))
    seed = draw(st.integers(0, 1000))

    def of(loss):
        if loss.dim() == 0:
            return torch.tensor(factor, dtype=loss.dtype)
        return _values(loss.shape, seed, 1.0, 0.0).to(loss.dtype)

    return of


# --- kd_loss ---------------------------------------------------------------------------------------------

@dataclass
class KDOptions:
    divergence: str
    temperature: float
    beta: float
    kd_weight: float
    ce_weight: float
    scale_by_t2: bool
    reduction: str


def kd_rows(student, teacher, labels, o: KDOptions, ignore_index: int) -> torch.Tensor:
    """The oracle's row losses [N] for [N, V] logits already in the math dtype."""
    T = o.temperature
    log_q = log_softmax_rows(student / T)
    log_p = log_softmax_rows(teacher / T)
    kd = divergence(log_p, log_q, o.divergence, o.beta)
    kd = torch.where(torch.isneginf(teacher).all(-1), torch.zeros_like(kd), kd)  # no teacher distribution
    rows = o.kd_weight * (T * T if o.scale_by_t2 else 1.0) * kd
    if labels is None:
        return rows
    valid = labels != ignore_index
    if o.ce_weight > 0:
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        rows = rows + o.ce_weight * _zero_where(cross_entropy(student, safe_labels), ~valid)
    return torch.where(valid, rows, torch.zeros_like(rows))


def kd_expected(case: Logits, o: KDOptions) -> Expected:
    """Which argument the call must (or may) be refused for: a bad option, or what the masks make
    of the rows. Any one of several faults may be the one reported."""
    faults = []
    if not (T_MIN <= o.temperature <= T_MAX):
        faults.append("temperature")
    if o.ce_weight > 0 and case.labels is None:
        faults.append("ce_weight")
        o = KDOptions(**{**vars(o), "ce_weight": 0.0})
    student, teacher, labels = case.flat()
    s_inf, t_inf = torch.isneginf(student), torch.isneginf(teacher)
    valid = case.valid_rows()
    teacher_dead = t_inf.all(-1)
    whole_student = s_inf.all(-1) & valid
    # KD terms that are +inf: forward-KL-type where the teacher has mass and the student none,
    # reverse-KL-type the other way round (the teacher's own -inf there)
    forward_type = o.divergence == "forward_kl" or (o.divergence == "skew_kl" and o.beta == 0.0)
    reverse_type = o.divergence == "reverse_kl" or (o.divergence == "skew_reverse_kl" and o.beta == 0.0)
    student_inf = whole_student & ~(teacher_dead & (o.ce_weight == 0 or labels is None))
    if forward_type or reverse_type:
        # Whether +inf shows depends on a probability that float arithmetic may round to 0 (an
        # entry far below the row's maximum at a small temperature): such draws are left out.
        T = o.temperature if not faults else 1.0
        log_p, log_q = log_softmax_rows(teacher.double() / T), log_softmax_rows(student.double() / T)
        unseen = (log_p < UNDERFLOW) & ~t_inf & s_inf if forward_type else (log_q < UNDERFLOW) & ~s_inf & t_inf
        assume(not (unseen.any(-1) & valid & ~teacher_dead).any())
    if forward_type:
        student_inf |= (s_inf & ~t_inf).any(-1) & ~teacher_dead & valid
    if o.ce_weight > 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        student_inf |= valid & s_inf.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if student_inf.any():
        faults.append("student_logits")
    if faults:
        return Expected(refuse="|".join(faults))
    if whole_student.any():  # both sides entirely -inf, no CE: masking, or refused
        return Expected(may_refuse="student_logits")
    if reverse_type and ((t_inf & ~s_inf).any(-1) & ~teacher_dead & valid).any():
        return Expected(may_refuse="teacher_logits")
    return Expected()


def kd_scales(student, teacher, o: KDOptions, valid, batch_shape, grad_output):
    """(loss term scale, [gradient term scale]): the log-sum-exps and logits a row loss is a
    difference of, and the weights on q - p in its gradient."""
    T, vocab = o.temperature, student.shape[-1]
    t2 = T * T if o.scale_by_t2 else 1.0
    log_v = math.log(max(vocab, 1))
    rows = (o.kd_weight * t2 * (finite_max(student / T) + finite_max(teacher / T) + log_v)
            + o.ce_weight * (finite_max(student) + log_v)) * valid
    loss_scale = float(reduce(rows, o.reduction, batch_shape, valid).abs().max()) if rows.numel() else 0.0
    grad_scale = ((o.kd_weight * t2 / T + o.ce_weight) * reduction_factor(o.reduction, batch_shape, valid)
                  * float(grad_output.abs().max() if grad_output.numel() else 0.0))
    return loss_scale, [grad_scale]


@st.composite
def kd_options(draw) -> KDOptions:
    return KDOptions(divergence=draw(st.sampled_from(DIVERGENCE_NAMES)), temperature=draw(temperatures()),
                     beta=draw(betas()), kd_weight=draw(st.sampled_from([0.5, 1.0, 2.5])),
                     ce_weight=draw(st.sampled_from([0.0, 0.3, 1.0])), scale_by_t2=draw(st.booleans()),
                     reduction=draw(st.sampled_from(REDUCTIONS)))


@given(case=logits_pairs(), options=kd_options(), data=st.data())
def test_kd_loss_is_right_or_refused(case, options, data):
    grad_output_of = grad_outputs(data.draw)
    note(f"{case.description}\n{options}")
    student = case.student.requires_grad_(True)

    def call():
        return kdkernels.kd_loss(student, case.teacher, case.labels, divergence=options.divergence,
                                 temperature=options.temperature, beta=options.beta, kd_weight=options.kd_weight,
                                 ce_weight=options.ce_weight, scale_by_t2=options.scale_by_t2,
                                 ignore_index=case.ignore_index, reduction=options.reduction, backend="cpu")

    def oracle(math_dtype):
        leaf = case.student.detach().clone().requires_grad_(True)
        if math_dtype == torch.float64:
            leaf = case.student.detach().double().requires_grad_(True)
        s, t, labels = Logits(leaf, case.teacher, case.labels, case.ignore_index).flat()
        rows = kd_rows(s.to(math_dtype), t.to(math_dtype), labels, options, case.ignore_index)
        valid = case.valid_rows()
        loss = reduce(rows, options.reduction, case.batch_shape, valid)
        grad_output = grad_output_of(loss)
        return OracleResult(loss.detach(), oracle_grads(loss, [leaf], grad_output),
                            *kd_scales(s.detach().double(), t.double(), options, valid, case.batch_shape, grad_output))

    check_call(call, kd_expected(case, options), oracle, [student], grad_output_of)


# --- cakd_loss / dkd_loss ---------------------------------------------------------------------------------

@dataclass
class CAKDOptions:
    groups: str  # a cakd_loss rule, or "dkd" (dkd_loss: S = {label}, weights alpha, 0, beta)
    k: Optional[int]
    mass: Optional[float]
    bcd_weight: float
    scd_weight: object  # a number, or "teacher_mass"
    wcd_weight: object
    temperature: float
    scale_by_t2: bool
    reduction: str

    def call(self, case: "Logits", student):
        common = dict(temperature=self.temperature, scale_by_t2=self.scale_by_t2, ignore_index=case.ignore_index,
                      reduction=self.reduction, backend="cpu")
        if self.groups == "dkd":
            return kdkernels.dkd_loss(student, case.teacher, case.labels, alpha=self.bcd_weight, beta=self.wcd_weight,
                                      **common)
        return kdkernels.cakd_loss(student, case.teacher, case.labels, groups=self.groups, k=self.k, mass=self.mass,
                                   bcd_weight=self.bcd_weight, scd_weight=self.scd_weight,
                                   wcd_weight=self.wcd_weight, **common)


def correlated_set(teacher, labels, o: CAKDOptions, ignore_index: int) -> torch.Tensor:
    """[N, V] membership of S: the label, or the teacher's top-k / top mass (ties: lower index first)."""
    n, vocab = teacher.shape
    if o.groups in ("label", "dkd"):
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        return F.one_hot(safe.long(), vocab).bool()
    order = torch.sort(teacher.double(), dim=-1, descending=True, stable=True).indices
    if o.groups == "teacher_mass":
        probs = torch.softmax(_zero_where(teacher.double(), torch.isneginf(teacher).all(-1, keepdim=True))
                              / o.temperature, -1).gather(-1, order)
        in_sorted = probs.cumsum(-1) - probs < o.mass
    else:
        in_sorted = torch.arange(vocab).expand(n, vocab) < (1 if o.groups == "teacher_top1" else o.k)
    return torch.zeros_like(in_sorted).scatter(-1, order, in_sorted)


def group_log_mass(log_x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """log of the mass of each row's group: logsumexp over the members; -inf for an empty group."""
    values = torch.where(member, log_x, torch.full_like(log_x, -INF))
    dead = torch.isneginf(values).all(-1)
    mass = torch.logsumexp(_zero_where(values, dead.unsqueeze(-1).expand_as(values)), dim=-1)
    return torch.where(dead, torch.full_like(mass, -INF), mass)


def group_kl(log_p, log_q, member, log_pg, log_qg) -> torch.Tensor:
    """KL of teacher and student renormalised inside the group, per row; 0 without teacher mass."""
    log_p_hat = torch.where(member, log_p - _zero_where(log_pg, torch.isneginf(log_pg)).unsqueeze(-1), -INF)
    log_q_hat = torch.where(member, log_q - _zero_where(log_qg, torch.isneginf(log_qg)).unsqueeze(-1), -INF)
    kl = x_log_ratio(log_p_hat, log_q_hat).sum(-1)
    return torch.where(torch.isneginf(log_pg), torch.zeros_like(kl), kl)


def cakd_rows(student, teacher, labels, o: CAKDOptions, ignore_index: int, in_s: torch.Tensor) -> torch.Tensor:
    """The oracle's row losses [N] for [N, V] logits already in the math dtype."""
    T = o.temperature
    log_q, log_p = log_softmax_rows(student / T), log_softmax_rows(teacher / T)
    groups = (in_s, ~in_s)
    log_pg = [group_log_mass(log_p, g) for g in groups]
    log_qg = [group_log_mass(log_q, g) for g in groups]
    bcd = (x_log_ratio(torch.stack(log_pg, -1), torch.stack(log_qg, -1))).sum(-1)
    rows = o.bcd_weight * bcd
    scd_weight = 0.0 if o.groups == "dkd" else o.scd_weight
    for weight, group, lp, lq in zip((scd_weight, o.wcd_weight), groups, log_pg, log_qg):
        if weight == "teacher_mass":
            weight = lp.detach().exp()
        if isinstance(weight, torch.Tensor) or weight > 0:  # a term of weight 0 is absent, not 0 * inf
            rows = rows + weight * group_kl(log_p, log_q, group, lp, lq)
    rows = (T * T if o.scale_by_t2 else 1.0) * rows
    dead = torch.isneginf(teacher).all(-1) | torch.isneginf(student).all(-1)
    if labels is not None:
        dead |= labels == ignore_index
    return torch.where(dead, torch.zeros_like(rows), rows)


def cakd_expected(case: Logits, o: CAKDOptions) -> Expected:
    faults = []
    if not (T_MIN <= o.temperature <= T_MAX):
        faults.append("temperature")
    student, teacher, labels = case.flat()
    s_inf, t_inf = torch.isneginf(student), torch.isneginf(teacher)
    valid = case.valid_rows()
    teacher_dead = t_inf.all(-1)
    T = o.temperature if not faults else 1.0
    log_p = log_softmax_rows(teacher.double() / T)
    assume(not ((log_p < UNDERFLOW) & ~t_inf & s_inf).any(-1)[valid & ~teacher_dead].any())
    if not faults and o.groups == "teacher_mass":  # S must not hinge on a rounding of the cumulative mass
        probs = torch.sort(log_p.exp(), -1, descending=True).values.cumsum(-1)
        assume(not ((probs - o.mass).abs() < 1e-4)[valid & ~teacher_dead].any())
    if o.groups in ("teacher_top1", "teacher_topk") and teacher.shape[-1] > 1:  # nor on a near tie
        ranked = torch.sort(teacher.double(), -1, descending=True).values
        k = 1 if o.groups == "teacher_top1" else min(o.k, teacher.shape[-1] - 1)
        gap = (ranked[:, k - 1] - ranked[:, k]).abs()
        assume(not ((gap > 0) & (gap < 1e-4 * ranked[:, k - 1].abs().clamp(min=1)))[valid].any())
    # forward-KL-type: teacher mass on a student -inf entry makes the row +inf; a whole student
    # row -inf has no distribution
    student_inf = ((s_inf & ~t_inf).any(-1) | (s_inf.all(-1) & ~teacher_dead)) & ~teacher_dead & valid
    if student_inf.any():
        faults.append("student_logits")
    if faults:
        return Expected(refuse="|".join(faults))
    if (s_inf.all(-1) & valid).any():
        return Expected(may_refuse="student_logits")
    return Expected()


@st.composite
def cakd_options(draw, vocab: int) -> CAKDOptions:
    groups = draw(st.sampled_from(["label", "teacher_top1", "teacher_topk", "teacher_mass", "dkd"]))
    group_weight = st.one_of(st.sampled_from([0.5, 1.0, 8.0]), st.just("teacher_mass"))
    return CAKDOptions(
        groups=groups, k=draw(st.integers(1, vocab + 2)) if groups == "teacher_topk" else None,
        mass=draw(st.floats(0.05, 0.95)) if groups == "teacher_mass" else None,
        bcd_weight=draw(st.sampled_from([0.5, 1.0, 2.0])),
        scd_weight=draw(group_weight) if groups != "dkd" else 0.0,
        wcd_weight=draw(group_weight) if groups != "dkd" else draw(st.sampled_from([0.5, 1.0, 8.0])),
        temperature=draw(temperatures()), scale_by_t2=draw(st.booleans()), reduction=draw(st.sampled_from(REDUCTIONS)))


@given(data=st.data())
def test_cakd_and_dkd_losses_are_right_or_refused(data):
    case = data.draw(logits_pairs())
    options = data.draw(cakd_options(case.student.shape[-1]))
    if options.groups in ("label", "dkd") and case.labels is None:
        case.labels = torch.zeros(case.batch_shape, dtype=torch.int64)
    grad_output_of = grad_outputs(data.draw)
    note(f"{case.description}\n{options}")
    student = case.student.requires_grad_(True)
    _, teacher_2d, labels_1d = case.flat()
    in_s = correlated_set(teacher_2d, labels_1d, options, case.ignore_index)

    def oracle(math_dtype):
        leaf = case.student.detach().to(math_dtype if math_dtype == torch.float64 else case.student.dtype)
        leaf.requires_grad_(True)
        s, t, labels = Logits(leaf, case.teacher, case.labels, case.ignore_index).flat()
        rows = cakd_rows(s.to(math_dtype), t.to(math_dtype), labels, options, case.ignore_index, in_s)
        valid = case.valid_rows()
        loss = reduce(rows, options.reduction, case.batch_shape, valid)
        grad_output = grad_output_of(loss)
        weights = sum(w for w in (options.bcd_weight, options.scd_weight, options.wcd_weight)
                      if not isinstance(w, str)) + 2.0 * ("teacher_mass" in (options.scd_weight, options.wcd_weight))
        as_kd = KDOptions("forward_kl", options.temperature, 0.0, weights, 0.0, options.scale_by_t2, options.reduction)
        return OracleResult(loss.detach(), oracle_grads(loss, [leaf], grad_output),
                            *kd_scales(s.detach().double(), t.double(), as_kd, valid, case.batch_shape, grad_output))

    check_call(lambda: options.call(case, student), cakd_expected(case, options), oracle, [student], grad_output_of)


# --- fused_linear_kd_loss -----------------------------------------------------------------------------------

@dataclass
class LinearCase:
    """A drawn fused-linear call: the student lm_head (leaves), the teacher's, and the options."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher: Dict[str, Optional[torch.Tensor]]
    labels: Optional[torch.Tensor]
    ignore_index: int
    lm_options: Dict[str, object]
    description: Dict[str, object] = field(default_factory=dict)

    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]


def lm_logits(hidden, weight, bias, lm_options, vocab: int, math_dtype) -> torch.Tensor:
    """softcap(logit_scale * (hidden @ weight^T + bias)) in full, [N, vocab] with -inf padding, in
    the tensors' own dtype as a model computes it (eager PyTorch) or in float64 (the oracle)."""
    lm_dtype = torch.float64 if math_dtype == torch.float64 else hidden.dtype
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).to(lm_dtype), weight.to(lm_dtype),
                      None if bias is None else bias.to(lm_dtype)) * lm_options["logit_scale"]
    if lm_options["softcap"] is not None:
        logits = lm_options["softcap"] * torch.tanh(logits / lm_options["softcap"])
    logits = logits.to(math_dtype)
    pad = logits.new_full((logits.shape[0], vocab - logits.shape[1]), -INF)
    return torch.cat([logits, pad], dim=-1)


@st.composite
def linear_cases(draw) -> LinearCase:
    batch = draw(batch_shapes())
    tokens = math.prod(batch)
    dtype = draw(st.sampled_from(DTYPES))
    hidden_size, teacher_hidden_size = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    student_vocab = draw(st.integers(1, 24))
    teacher_vocab = draw(st.one_of(st.just(student_vocab), st.integers(1, 24)))
    vocab = max(student_vocab, teacher_vocab)
    seed = draw(st.integers(0, 2 ** 16))
    std = draw(st.sampled_from([0.1, 1.0, 3.0]))
    requires = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))

    def param(shape, offset, scale=1.0, requires_grad=False, layout="contiguous"):
        values = in_layout(_values(shape, seed + offset, scale, 0.0).to(dtype), layout)
        return values.requires_grad_(requires_grad)

    hidden = param((*batch, hidden_size), 0, 1.0, requires[0], draw(st.sampled_from(["contiguous", "sliced"])))
    weight = param((student_vocab, hidden_size), 1, std / math.sqrt(hidden_size), requires[1])
    bias = param((student_vocab,), 2, std, requires[2]) if draw(st.booleans()) else None
    lm_options = dict(softcap=draw(st.sampled_from([None, 5.0, 30.0])), logit_scale=draw(st.sampled_from([1.0, 0.5, 2.0])))
    if draw(st.booleans()):  # the teacher's lm_head
        teacher = dict(teacher_hidden=param((*batch, teacher_hidden_size), 3),
                       teacher_weight=param((teacher_vocab, teacher_hidden_size), 4, std / math.sqrt(teacher_hidden_size)),
                       teacher_bias=param((teacher_vocab,), 5, std) if draw(st.booleans()) else None)
    else:  # ready teacher logits, with -inf columns or rows
        logits = _values((*batch, teacher_vocab), seed + 6, std * 3, 0.0).to(dtype)
        if tokens:
            flat = logits.view(-1, teacher_vocab)
            flat[:, draw(st.lists(st.integers(0, teacher_vocab - 1), max_size=2))] = -INF
            flat[draw(st.lists(st.integers(0, tokens - 1), max_size=1))] = -INF
        teacher = dict(teacher_logits=logits)
    ignore_index = draw(st.sampled_from([-100, 0]))
    labels = None
    if draw(st.booleans()):
        labels = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=tokens, max_size=tokens)),
                              dtype=torch.int64).reshape(batch)
        if tokens:
            labels.view(-1)[draw(st.lists(st.integers(0, tokens - 1), max_size=2))] = ignore_index
    chunk_size = draw(st.one_of(st.none(), st.integers(1, tokens + 2)))
    description = dict(batch=batch, dtype=dtype, hidden=(hidden_size, teacher_hidden_size),
                       vocab=(student_vocab, teacher_vocab), seed=seed, std=std, requires=requires,
                       bias=bias is not None, teacher=sorted(k for k, v in teacher.items() if v is not None),
                       labels=None if labels is None else labels.tolist(), chunk_size=chunk_size, **lm_options)
    return LinearCase(hidden, weight, bias, teacher, labels, ignore_index,
                      dict(lm_options, chunk_size=chunk_size), description)


def linear_teacher_logits(case: LinearCase, vocab: int, math_dtype) -> torch.Tensor:
    if case.teacher.get("teacher_logits") is not None:
        logits = case.teacher["teacher_logits"].reshape(-1, case.teacher["teacher_logits"].shape[-1]).to(math_dtype)
        return torch.cat([logits, logits.new_full((logits.shape[0], vocab - logits.shape[1]), -INF)], -1)
    return lm_logits(case.teacher["teacher_hidden"], case.teacher["teacher_weight"], case.teacher["teacher_bias"],
                     case.lm_options, vocab, math_dtype)


@given(case=linear_cases(), options=kd_options(), data=st.data())
def test_fused_linear_kd_loss_is_right_or_refused(case, options, data):
    grad_output_of = grad_outputs(data.draw)
    note(f"{case.description}\n{options}")
    vocab = max(case.description["vocab"])  # the shorter side's missing columns are -inf
    batch = tuple(case.hidden.shape[:-1])

    def call():
        return kdkernels.fused_linear_kd_loss(
            case.hidden, case.weight, labels=case.labels, student_bias=case.bias, **case.teacher, **case.lm_options,
            divergence=options.divergence, temperature=options.temperature, beta=options.beta,
            kd_weight=options.kd_weight, ce_weight=options.ce_weight, scale_by_t2=options.scale_by_t2,
            ignore_index=case.ignore_index, reduction=options.reduction, backend="cpu")

    def logits_case(math_dtype, leaves=None) -> Logits:
        hidden, weight, bias = leaves or (case.hidden.detach(), case.weight.detach(),
                                          None if case.bias is None else case.bias.detach())
        student = lm_logits(hidden, weight, bias, case.lm_options, vocab, math_dtype).reshape(*batch, vocab)
        teacher = linear_teacher_logits(case, vocab, math_dtype).reshape(*batch, vocab)
        return Logits(student, teacher, case.labels, case.ignore_index)

    def oracle(math_dtype):
        leaves = [None if t is None else t.detach().to(math_dtype if math_dtype == torch.float64 else t.dtype)
                  .requires_grad_(t.requires_grad) for t in (case.hidden, case.weight, case.bias)]
        logits = logits_case(math_dtype, leaves)
        s, t, labels = logits.flat()
        rows = kd_rows(s, t, labels, options, case.ignore_index)
        valid = logits.valid_rows()
        loss = reduce(rows, options.reduction, batch, valid)
        grad_output = grad_output_of(loss)
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = oracle_grads(loss, wanted, grad_output) if wanted else []
        loss_scale, (logit_scale,) = kd_scales(s.detach().double(), t.detach().double(), options, valid, batch,
                                               grad_output)
        logit_scale *= case.lm_options["logit_scale"]
        # d/dhidden = g @ W, d/dweight = g^T @ hidden, d/dbias = sum_rows g
        hidden_2d = case.hidden.detach().double().reshape(-1, case.hidden.shape[-1])
        row_sums = {"hidden": float(case.weight.detach().double().abs().sum(0).max()),
                    "weight": float(hidden_2d.abs().sum(0).max()) if hidden_2d.numel() else 0.0,
                    "bias": float(hidden_2d.shape[0])}
        names = [n for n, leaf in zip(("hidden", "weight", "bias"), leaves) if leaf is not None and leaf.requires_grad]
        # the logits' gradient is rounded to the lm_head's dtype before its GEMMs (in eager PyTorch
        # too): one ulp of that dtype, not of float32, of the terms
        rounding = torch.finfo(case.hidden.dtype).eps / EPS32
        return OracleResult(loss.detach(), grads, loss_scale, [rounding * logit_scale * row_sums[n] for n in names])

    expected = kd_expected(logits_case(torch.float64), options)
    # the fused loss has no student_logits / teacher_logits argument to name: its lm_head's
    expected = Expected(*(None if e is None else e.replace("student_logits", "student").replace("teacher_logits", "teacher")
                          for e in (expected.refuse, expected.may_refuse)))
    check_call(call, expected, oracle, case.leaves(), grad_output_of)
