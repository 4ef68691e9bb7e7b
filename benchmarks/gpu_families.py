"""The loss families of benchmarks/gpu_bench.py beyond kd_loss, on one CUDA device (or, for dry
runs, the CPU): one forward + backward step per (family, case, implementation), and what a row
relates its time to.

  cakd          cakd_loss (teacher top-8, teacher mass 0.5) and dkd_loss; peers: the masked-softmax
                formulas of benchmarks.cakd, eagerly and under torch.compile. Floor: 3 passes over
                [N, V] (read student, read teacher, write gradient), as kd_loss.
  sparse        sparse_kd_loss from a top-64 teacher (residual and renormalize); peers: the formula
                of benchmarks.sparse, eager and compiled. Floor: 2 passes (read student, write
                gradient): the teacher is k values per row.
  fused_linear  fused_linear_kd_loss (forward KL) from hidden states [N, H] and lm_heads [V, H];
                peers: the logits GEMMs + the eager loss, compiled, and Liger-Kernel's
                LigerFusedLinearJSDLoss (beta=0: forward KL). Floor: the 4 GEMMs, 8 N H V flops
                (student and teacher logits, the hidden-state and the weight gradient), related to
                a bf16 matmul of the same sizes timed in the same process; plus the largest error
                of the hidden-state gradient against float64 on the first rows.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable, List, Optional, Tuple

FAMILIES = ("cakd", "sparse", "fused_linear")
CASES = {
    "cakd": ("cakd_topk", "cakd_mass", "dkd"),
    "sparse": ("residual", "renormalize"),
    "fused_linear": ("forward_kl",),
}
IMPLS = {
    "cakd": ("kdkernels-triton", "eager", "compile"),
    "sparse": ("kdkernels-triton", "eager", "compile"),
    "fused_linear": ("kdkernels-triton", "kdkernels-cuda", "liger", "eager", "compile"),
}
# passes over [N, V] in the logits' dtype that a fused step cannot avoid (the "% copy" floor)
TENSOR_PASSES = {"cakd": 3, "sparse": 2}
TOP_K, MASS, SPARSE_K, TEMPERATURE = 8, 0.5, 64, 2.0
LOGIT_STD = 3.0
ERROR_ROWS = 256  # rows of the fused-linear gradient error against float64


def _backend(impl: str) -> str:
    return impl.split("-")[1]


def _labels(n: int, v: int, device):
    import torch

    return torch.randint(0, v, (n,), device=device, generator=torch.Generator(device=device).manual_seed(1))


def logits_step(family: str, case: str, impl: str, n: int, v: int, dtype, device) -> Callable[[], None]:
    """One forward + backward of a cakd or sparse row on fresh [N, V] inputs."""
    import torch

    from benchmarks import harness

    generator = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, v, device=device, generator=generator) * LOGIT_STD).to(dtype).requires_grad_(True)
    labels = _labels(n, v, device)
    if family == "cakd":
        teacher = (torch.randn(n, v, device=device, generator=generator) * LOGIT_STD).to(dtype)
        return harness.fwd_bwd_step(_cakd_loss(case, impl), student, teacher, labels)
    from benchmarks.sparse import sparse_teacher

    ids, values = (t.to(device) for t in sparse_teacher(n, v, SPARSE_K))
    return harness.fwd_bwd_step(_sparse_loss(case, impl), student, ids, values, labels)


def _cakd_loss(case: str, impl: str) -> Callable[..., Any]:
    import torch

    if impl.startswith("kdkernels-"):
        import kdkernels

        backend = _backend(impl)
        if case == "dkd":
            return lambda s, t, y: kdkernels.dkd_loss(s, t, y, temperature=TEMPERATURE, backend=backend)
        rule = dict(groups="teacher_topk", k=TOP_K) if case == "cakd_topk" else dict(groups="teacher_mass", mass=MASS)
        return lambda s, t, y: kdkernels.cakd_loss(s, t, temperature=TEMPERATURE, backend=backend, **rule)
    from benchmarks.cakd import eager_cakd_topk, eager_dkd

    if case == "cakd_mass":
        raise ValueError("no eager formula of the teacher_mass rule in benchmarks.cakd")

    def eager(s, t, y):
        return eager_dkd(s, t, y, TEMPERATURE) if case == "dkd" else eager_cakd_topk(s, t, TOP_K, TEMPERATURE)

    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


def _sparse_loss(case: str, impl: str) -> Callable[..., Any]:
    import torch

    from benchmarks.sparse import CE_WEIGHT, KD_WEIGHT, eager_sparse_loss

    if impl.startswith("kdkernels-"):
        import kdkernels

        backend = _backend(impl)
        return lambda s, ids, values, y: kdkernels.sparse_kd_loss(
            s, ids, values, y, missing_mass=case, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT, backend=backend)

    def eager(s, ids, values, y):
        return eager_sparse_loss(s, ids, values, y, case)

    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


# --- fused lm_head ---------------------------------------------------------------------------------

def lm_heads(n: int, h: int, v: int, dtype, device, seed: int = 0):
    """(student hidden [N, H] and lm_head [V, H] requiring grad, teacher hidden and lm_head),
    weights scaled so that the logits have std ~LOGIT_STD."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    scale = LOGIT_STD / h ** 0.5

    def randn(*shape, factor=1.0):
        return (torch.randn(*shape, device=device, generator=generator) * factor).to(dtype)

    return (randn(n, h).requires_grad_(True), randn(v, h, factor=scale).requires_grad_(True), randn(n, h),
            randn(v, h, factor=scale))


def fused_linear_loss(impl: str) -> Callable[..., Any]:
    """loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight): forward KL at T,
    batch mean."""
    import torch

    if impl.startswith("kdkernels-"):
        import kdkernels

        backend = _backend(impl)
        return lambda hs, ws, ht, wt: kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, temperature=TEMPERATURE,
                                                                     reduction="batchmean", backend=backend)
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise RuntimeError("Liger-Kernel is not installed")
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta=0: Liger's generalised JSD is KL(teacher || student), forward KL; no hard loss
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE)
        return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt, torch.zeros(hs.shape[0], dtype=torch.long,
                                                                        device=hs.device))
    from benchmarks.eager import lm_head_forward_kl

    def eager(*lm_heads):
        return lm_head_forward_kl(*lm_heads, TEMPERATURE)

    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


def fused_linear_step(impl: str, n: int, h: int, v: int, dtype, device) -> Callable[[], None]:
    from benchmarks import harness

    student_hidden, *rest = lm_heads(n, h, v, dtype, device)
    loss_fn = fused_linear_loss(impl)

    def step() -> None:
        harness.fwd_bwd_step(loss_fn, student_hidden, *rest)()
        rest[0].grad = None

    return step


def hidden_grad_error(impl: str, rows: int, h: int, v: int, dtype, device) -> float:
    """Largest error of dL/d(student hidden) against the float64 forward-KL formula on `rows` rows,
    relative to the largest exact entry. The implementation's gradient is first fitted to the
    exact one by one scale factor (least squares), so that a peer that scales its loss otherwise
    (Liger's temperature convention) is judged by its rounding alone."""
    from benchmarks.eager import forward_kl

    student_hidden, student_weight, teacher_hidden, teacher_weight = lm_heads(rows, h, v, dtype, device, seed=3)
    fused_linear_loss(impl)(student_hidden, student_weight, teacher_hidden, teacher_weight).backward()
    exact_hidden = student_hidden.detach().double().requires_grad_(True)
    forward_kl(exact_hidden @ student_weight.detach().double().t(),
               teacher_hidden.double() @ teacher_weight.double().t(), TEMPERATURE).backward()
    grad, exact = student_hidden.grad.double(), exact_hidden.grad
    scale = float((grad * exact).sum() / (grad * grad).sum().clamp_min(1e-300))
    return float((grad * scale - exact).abs().max() / exact.abs().max().clamp_min(1e-300))


def matmul_step(n: int, h: int, v: int, dtype, device) -> Callable[[], None]:
    """One [N, H] @ [H, V] GEMM in `dtype` (2 N H V flops): the matmul throughput of the device."""
    import torch

    a = torch.randn(n, h, device=device).to(dtype)
    b = torch.randn(v, h, device=device).to(dtype)
    out = torch.empty(n, v, device=device, dtype=dtype)
    return lambda: torch.mm(a, b.t(), out=out)


def fused_linear_flops(n: int, h: int, v: int) -> float:
    return 8.0 * n * h * v


def rows_of(family: str, impls: Optional[List[str]] = None) -> List[Tuple[str, str]]:
    """(case, impl) pairs of a family, in the order they run."""
    chosen = [impl for impl in IMPLS[family] if impls is None or impl in impls]
    return [(case, impl) for case in CASES[family] for impl in chosen
            if not (family == "cakd" and case == "cakd_mass" and impl in ("eager", "compile"))]


def pct(value: Optional[float], of: Optional[float]) -> Optional[float]:
    return 100.0 * value / of if value and of and not math.isnan(of) else None
