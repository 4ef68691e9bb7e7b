"""The public loss functions. Each validates its arguments (kdkernels._checks) and then makes one
call down the road to a backend (kdkernels.ops.route); the docstrings are the reference for every
argument's shape and meaning.

Decomposed KL (cakd_loss, dkd_loss): for each row the classes split into a strongly correlated
set S and the rest W, and forward KL splits exactly:

    KL(p || q) = BCD + P_S * SCD + P_W * WCD
    BCD = KL([P_S, P_W] || [Q_S, Q_W]),  SCD = KL(p̂_S || q̂_S),  WCD = KL(p̂_W || q̂_W)

with p = softmax(teacher / T), q = softmax(student / T), P_g / Q_g the teacher / student mass of
group g and p̂, q̂ the distributions renormalised inside each group. CAKD frees the weights;
DKD is the case S = {label} (TCKD = BCD, NCKD = WCD).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from kdkernels import _checks, distributed
from kdkernels._amp import autocast_as_matmul_inputs
from kdkernels.ops import features as _features
from kdkernels.ops.fused_linear import fused_linear_loss
from kdkernels.ops.reduction import reduce_masked
from kdkernels.ops.route import CAKD, KD, logits_loss

Projection = _features.Projection


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Fused knowledge-distillation loss from logits.

    ``loss = ce_weight * CE(student_logits, labels) + kd_weight * T^2 * D(p_T || q_T)`` per row,
    where ``p_T = softmax(teacher_logits / T)``, ``q_T = softmax(student_logits / T)`` and ``D`` is
    the chosen divergence; CE uses the student at T = 1. Both terms are computed in one pass over
    each row, and the gradient is written during the forward pass (only when the student requires
    grad and grad mode is on).

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]``, float32 / bfloat16 / float16 (float64 runs on
            the reference backend). Any strides. Receives the gradient, in its own dtype.
        teacher_logits: same shape as ``student_logits``; never receives a gradient. ``-inf``
            entries mask vocabulary items (masked for the student too, they contribute nothing); a
            row entirely ``-inf`` has no teacher distribution: its KD term is 0, its CE term stays.
            NaN and ``+inf`` are rejected.
        labels: integer ``[N]`` / ``[B, S]``, optional. Rows whose label equals ``ignore_index``
            count for neither term and get zero gradient. Required when ``ce_weight > 0``.
        divergence: ``forward_kl`` (KL(p||q)), ``reverse_kl`` (KL(q||p)), ``jsd`` (generalized JSD
            with m = beta p + (1-beta) q; 0 at beta in {0, 1}), ``skew_kl`` (KL(p || beta p +
            (1-beta) q)), ``skew_reverse_kl`` (KL(q || (1-beta) p + beta q)), ``tvd``.
        temperature: ``T`` in ``[1e-6, 1e6]``, applied to both logits for the divergence.
        beta: mixing weight of ``jsd`` / skew weight of the skew divergences, in [0, 1].
        kd_weight, ce_weight: weights of the two terms (>= 0).
        scale_by_t2: multiply the divergence by ``T^2`` (Hinton et al.), on by default.
        ignore_index: label value that marks rows to ignore.
        reduction: ``mean`` (over non-ignored rows), ``batchmean`` (sum / ``student_logits.size(0)``,
            as ``F.kl_div``), ``sum`` or ``none`` (one value per row, shaped like ``labels``).
        backend: ``auto``, ``cpu`` (compiled C++), ``triton``, ``cuda`` or ``reference`` (PyTorch).
            The compiled backends give first-order gradients (differentiating them again raises);
            ``reference`` is differentiable to any order.

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).

    Raises:
        ValueError naming ``student_logits`` for a non-ignored row whose loss would be infinite
        because of the student's ``-inf`` entries: the whole row ``-inf`` (the teacher's not);
        with ``forward_kl`` (or ``skew_kl`` at ``beta=0``) a ``-inf`` where the teacher's logit
        is finite; with the CE term, the label on a ``-inf`` entry. ValueError naming
        ``teacher_logits`` when ``reverse_kl`` (or ``skew_reverse_kl`` at ``beta=0``) meets a
        teacher ``-inf`` where the student's logit is finite. ``-inf`` on both sides is masking,
        not an error.
    """
    if distributed.is_dtensor(student_logits):  # vocabulary-sharded (tensor-parallel) or replicated logits
        return distributed.dtensor_kd_loss(
            student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, beta=beta,
            kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            reduction=reduction, backend=backend)
    _checks.check_logits_pair(student_logits, teacher_logits)
    labels, reduction, cfg = _checks.check_kd_call(
        labels, student_logits.shape[:-1], student_logits.device, reduction, divergence=divergence,
        temperature=temperature, beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2,
        ignore_index=ignore_index)
    loss, _ = logits_loss(KD, student_logits, teacher_logits, labels, cfg, reduction, backend)
    return loss


@autocast_as_matmul_inputs("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                           "teacher_bias")
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """KD loss of a student lm_head against a teacher, without materialising [tokens, vocab] logits.

    Equal to ``kd_loss(student_logits, teacher_logits, labels, ...)`` with
    ``student_logits = softcap(logit_scale * (student_hidden @ student_weight.T + student_bias))``
    and the teacher's logits built the same way from ``teacher_hidden`` / ``teacher_weight`` /
    ``teacher_bias`` (or given as ``teacher_logits``), where ``softcap(y) = softcap * tanh(y /
    softcap)`` (Gemma's final-logit soft-capping; none when ``softcap`` is None). The tokens are
    processed ``chunk_size`` rows at a time: per chunk the logits GEMMs, the fused KD row kernel
    of ``backend`` (the one ``kd_loss`` uses), then the gradient GEMMs, so memory beyond the
    inputs and gradients is one chunk's logits. Gradients are computed in the forward pass, only
    for the tensors that require grad, and not at all under ``torch.no_grad()``. Under
    ``torch.autocast`` the lm_head inputs (hidden states, weights, biases) are cast to the
    autocast dtype, as a matmul's are; the loss math stays float32.

    Args:
        student_hidden: ``[N, H_s]`` or ``[B, S, H_s]`` final hidden states, float32 / bfloat16 /
            float16 (float64 runs on the reference backend).
        student_weight: lm_head weight ``[V_s, H_s]``, the same dtype (as ``nn.Linear.weight``).
        teacher_hidden: ``[N, H_t]`` / ``[B, S, H_t]``; ``H_t`` may differ from ``H_s``. Its dtype
            may differ from the student's. Never receives a gradient.
        teacher_weight: teacher lm_head weight ``[V_t, H_t]``. ``V_t`` may differ from ``V_s``
            (padded lm_heads): the shorter side's missing vocabulary columns are ``-inf`` logits,
            i.e. probability 0. If the *teacher* puts mass on ids the student lacks, forward KL is
            infinite and the call raises ValueError; pass ``teacher_weight[:V_s]`` to drop the
            teacher's padding instead.
        labels: integer ``[N]`` / ``[B, S]`` in ``[0, max(V_s, V_t))`` or ``ignore_index``;
            required when ``ce_weight > 0``. Ignored rows count nowhere and get zero gradient.
        teacher_logits: ready teacher logits ``[N, V_t]`` / ``[B, S, V_t]`` instead of
            ``teacher_hidden`` + ``teacher_weight`` (exactly one of the two must be given). Used
            as they are: ``softcap`` and ``logit_scale`` do not apply to them.
        student_bias, teacher_bias: optional lm_head biases ``[V_s]`` / ``[V_t]``.
        chunk_size: rows per chunk. Default: as many as fit in
            ``kdkernels.ops.fused_linear.DEFAULT_CHUNK_BYTES`` of per-chunk logits and gradient (160 MiB on CPU, 1 GiB on CUDA; on CPU the gradient
            overwrites the student logits chunk, unless ``softcap`` is set), but at least
            ``MIN_CHUNK_ROWS`` (128) rows.
        softcap: ``c > 0`` caps both lm_heads' logits to ``(-c, c)`` via ``c * tanh(y / c)``.
        logit_scale: ``> 0``, multiplies both lm_heads' logits before the soft cap.
        divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index,
        reduction, backend: as in :func:`kdkernels.kd_loss`; "mean" divides by the number of
            non-ignored tokens of the whole call, not per chunk. With "none" the gradients are
            computed in backward (they depend on each row's incoming gradient), which runs the
            logits GEMMs a second time from the saved inputs (changing one of them in place in
            between raises autograd's error). ``backend="reference"`` builds the whole logits and
            applies kd_loss's reference formula: no chunks, differentiable to any order.

    Returns:
        The loss: a scalar, or ``[N]`` / ``[B, S]`` for ``reduction="none"``; float32 (float64 for
        float64 input).
    """
    # FSDP2-sharded (DTensor) lm_heads: gathered once for the call, freed when it returns
    student_weight, student_bias, teacher_weight, teacher_bias = distributed.gather_sharded_weights(
        student_weight, student_bias, teacher_weight, teacher_bias)
    labels, reduction, cfg, chunk_size, softcap, logit_scale = _checks.check_lm_head_call(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
        labels, reduction, chunk_size, softcap, logit_scale, divergence=divergence, temperature=temperature,
        beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index)
    return fused_linear_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             teacher_bias, teacher_logits, labels, cfg, reduction, backend, chunk_size, softcap,
                             logit_scale)


class CAKDResult(NamedTuple):
    """cakd_loss(..., return_components=True): the loss and its unweighted parts (at temperature
    T, without the T^2 factor; reduced like the loss, detached)."""

    loss: torch.Tensor
    bcd: torch.Tensor
    scd: torch.Tensor
    wcd: torch.Tensor


class DKDResult(NamedTuple):
    """dkd_loss(..., return_components=True): the loss, TCKD and NCKD (unweighted, without T^2)."""

    loss: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor


def cakd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    groups: str,
    k: Optional[int] = None,
    mass: Optional[float] = None,
    bcd_weight: float = 1.0,
    scd_weight: Union[float, str] = 1.0,
    wcd_weight: Union[float, str] = 1.0,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, CAKDResult]:
    """Correlation-aware KD loss: ``T^2 * (bcd_weight * BCD + scd_weight * SCD + wcd_weight * WCD)``
    per row (see the module docstring), fused: one pass chooses S, one gathers per-group
    statistics in log space and one writes the loss terms and the gradient.

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]``, float32 / bfloat16 / float16 (float64 runs on
            the reference backend). Receives the gradient, in its own dtype.
        teacher_logits: same shape; no gradient. ``-inf`` entries are masked vocabulary (zero
            probability); NaN and ``+inf`` are rejected.
        labels: integer ``[N]`` / ``[B, S]``; required for ``groups="label"``, optional otherwise.
            Rows whose label equals ``ignore_index`` have loss 0 and gradient 0.
        groups: how S is chosen per row:
            ``"label"``: S = {label};
            ``"teacher_top1"``: S = the teacher's most probable class;
            ``"teacher_topk"``: S = the teacher's ``k`` most probable classes (all of them if
            ``k >= V``, then W is empty);
            ``"teacher_mass"``: S = the fewest most probable teacher classes (at temperature T)
            whose probabilities sum to ``>= mass``; the class that crosses ``mass`` is included.
            The sum is compared with ``mass`` lowered by a relative 2^-16, so that a sum equal to
            ``mass`` in exact arithmetic (a uniform teacher) reaches it on every backend. Among
            equal teacher logits the lower class index ranks first, so S is deterministic.
        k: size of S for ``teacher_topk`` (int >= 1); only for that rule.
        mass: teacher mass S reaches for ``teacher_mass``, in (0, 1); only for that rule.
        bcd_weight, scd_weight, wcd_weight: weights (>= 0) of the three parts. ``scd_weight`` /
            ``wcd_weight`` may be ``"teacher_mass"``: the teacher's mass P_S / P_W of each row, a
            constant for the gradient; with ``bcd_weight=1`` and both set so the loss is forward KL.
            A group holding no teacher probability at all (every teacher logit in it ``-inf``)
            contributes no SCD / WCD.
        temperature: ``T`` in ``[1e-6, 1e6]``, applied to both logits.
        scale_by_t2: multiply the loss by ``T^2`` (on by default).
        ignore_index: label value that marks rows to ignore.
        reduction: ``mean`` (over non-ignored rows), ``batchmean`` (sum / ``size(0)``), ``sum`` or
            ``none`` (one value per row, shaped like the batch dimensions).
        return_components: also return BCD, SCD, WCD (unweighted, without ``T^2``, detached),
            reduced the same way, as a :class:`CAKDResult`.
        backend: ``auto``, ``cpu`` (compiled C++) or ``reference`` (PyTorch).

    Returns:
        The loss (a scalar, or the batch shape for ``reduction="none"``; float32, float64 for
        float64 input), or a :class:`CAKDResult` with ``return_components=True``.
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    labels = _checks.check_labels(labels, student_logits.shape[:-1], student_logits.device)
    reduction = _checks.check_reduction(reduction)
    cfg = _checks.make_cakd_config(groups=groups, k=k, mass=mass, bcd_weight=bcd_weight,
                                   scd_weight=scd_weight, wcd_weight=wcd_weight, temperature=temperature,
                                   scale_by_t2=scale_by_t2, ignore_index=ignore_index,
                                   has_labels=labels is not None)
    loss, parts = logits_loss(CAKD, student_logits, teacher_logits, labels, cfg, reduction, backend)
    return CAKDResult(loss, *parts) if return_components else loss


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, DKDResult]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * (alpha * TCKD + beta * NCKD)`` per row, with
    TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y]) (the label's binary split) and NCKD the KL between
    teacher and student renormalised over the non-label classes. Defaults are the paper's.

    The same fused kernel as :func:`cakd_loss` with ``groups="label"``, ``bcd_weight=alpha``,
    ``wcd_weight=beta``; the other arguments mean the same there. ``labels`` is required.
    With ``return_components=True`` returns a :class:`DKDResult` (TCKD, NCKD unweighted, without
    ``T^2``, detached, reduced like the loss).
    """
    _checks.check_logits_pair(student_logits, teacher_logits)
    if labels is None:
        raise ValueError("labels is required by dkd_loss (the target class of each row)")
    labels = _checks.check_labels(labels, student_logits.shape[:-1], student_logits.device)
    reduction = _checks.check_reduction(reduction)
    cfg = _checks.make_cakd_config(groups="label", k=None, mass=None,
                                   bcd_weight=_checks.check_weight("alpha", alpha), scd_weight=0.0,
                                   wcd_weight=_checks.check_weight("beta", beta), temperature=temperature,
                                   scale_by_t2=scale_by_t2, ignore_index=ignore_index, has_labels=True)
    loss, (tckd, _, nckd) = logits_loss(CAKD, student_logits, teacher_logits, labels, cfg, reduction, backend)
    return DKDResult(loss, tckd, nckd) if return_components else loss


def feature_alignment_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: Projection = None,
    *,
    projection_bias: Optional[torch.Tensor] = None,
    kind: str = "mse",
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hint loss between projected student hidden states and teacher hidden states.

    Args:
        student_hidden: ``[..., D_s]`` floating (e.g. ``[B, S, D_s]`` or ``[N, D_s]``).
        teacher_hidden: ``[..., D_t]`` with the same leading sizes; detached (no gradient).
        projection: ``None`` (then ``D_s`` must equal ``D_t``), a weight ``[D_t, D_s]`` applied as
            ``h W^T + projection_bias``, or a callable (e.g. an ``nn.Linear``) from ``[..., D_s]``
            to ``[..., D_t]``. The weight/callable receives the gradient: it is learned.
        projection_bias: ``[D_t]``, only with a weight tensor.
        kind: ``mse`` (mean over the feature dimension of the squared difference) or ``cosine``
            (``1 - cos``); the formulas are in kdkernels.ops.features.
        mask: optional bool ``[...]`` (the leading sizes): tokens where it is False count for
            nothing, whatever they hold (e.g. padding; NaN / inf there are never read into the
            loss or the gradients).
        reduction: ``mean`` (over counted tokens; 0 when none), ``batchmean`` (sum / size(0)),
            ``sum``, or ``none`` (one value per token, shaped like the leading sizes).

    Returns:
        float32 loss (float64 for float64 input): a scalar, or ``[...]`` for ``reduction="none"``.
    """
    _checks.check_feature_pair(student_hidden, teacher_hidden)
    kind = _checks.check_choice("kind", kind, _features.FEATURE_KINDS)
    reduction = _checks.check_reduction(reduction)
    mask = _checks.check_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    _checks.check_counted_finite("student_hidden", student_hidden, mask)
    _checks.check_counted_finite("teacher_hidden", teacher_hidden, mask)
    return reduce_masked(_features.hint_token_loss(student_hidden, teacher_hidden, projection, projection_bias,
                                                   kind, mask), mask, reduction)


def attention_transfer_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    p: float = 2.0,
    channel_dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Attention transfer: squared distance of the normalised channel-pooled maps, per sample.

    Args:
        student_features: ``[B, ...]`` floating, e.g. ``[B, S, D_s]`` hidden states (channels last)
            or ``[B, C_s, H, W]`` feature maps (``channel_dim=1``).
        teacher_features: same rank, same sizes except along ``channel_dim``; detached.
        p: exponent of the pooling, > 0 (2 in the paper).
        channel_dim: the dimension pooled away; not the batch dimension 0.
        reduction: ``mean``/``batchmean`` (over samples), ``sum`` or ``none`` (``[B]``).
    """
    _checks.check_attention_pair(student_features, teacher_features, channel_dim)
    p = _checks.check_exponent(p)
    reduction = _checks.check_reduction(reduction)
    _checks.check_counted_finite("student_features", student_features, None)
    _checks.check_counted_finite("teacher_features", teacher_features, None)
    return reduce_masked(_features.attention_sample_loss(student_features, teacher_features, p, channel_dim),
                         None, reduction)
