"""Benchmark of the sparse-teacher KD loss (top-k teacher), forward + backward, beside its peers.

    python -m benchmarks.sparse                   # N=4096, V=32000, k=64; then fused-linear V=128000
    python -m benchmarks.sparse --quick           # N=1024, fewer repeats
    python -m benchmarks.sparse --n 64 --v 512 --k 8 --fused-v 1024 --fused-h 64 --repeat 1   # smoke run

Loss: the CE blend (0.5) plus forward KL (0.5) against the teacher's top-k log-probs, at
--missing-mass (default renormalize, DistillKit's default), T = 1. Each configuration runs in its own
process (benchmarks.harness). Peers:
  eager      the same formula in PyTorch: full log_softmax of the student, gather at the k ids
  compile    torch.compile of that function (compilation in the untimed warmup)
  kdkernels  kdkernels.sparse_kd_loss(..., backend="cpu")
  dense      kdkernels.kd_loss, forward KL + CE blend, against a dense teacher [N, V] on the same
             student logits: what the sparse loss replaces (it reads no dense teacher)
Second table: fused lm_head + sparse loss from hidden states (--fused-v, --fused-h), fp32 and bf16
lm_head: kdkernels' fused_linear_sparse_kd_loss against the full logits followed by sparse_kd_loss;
extra peak memory, and that minus the lm_head weight gradient [V, H] (which the step must hold).
Columns: median time, ratio to torch.compile and to dense kd_loss, extra peak RSS in MiB and per
gradient tensor.
    python -m benchmarks.sparse --impls none --fused-impls fused    # the fused-linear rows alone
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Dict, List

from benchmarks import harness

IMPLS = ("eager", "compile", "kdkernels", "dense")
FUSED_IMPLS = ("fused", "full_logits")
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}
MODES = ("renormalize", "residual", "support")
LOGIT_STD = 3.0
KD_WEIGHT = CE_WEIGHT = 0.5


def eager_sparse_loss(student, ids, values, labels, missing_mass: str, temperature: float = 1.0):
    """The sparse forward-KL + CE blend of kdkernels.sparse_kd_loss in plain PyTorch (batch mean)."""
    import torch
    import torch.nn.functional as F

    T = temperature
    logq = torch.log_softmax(student.float() / T, -1)  # [N, V]
    logq_support = logq.gather(-1, ids)  # [N, k]
    logp = torch.log_softmax(values.float() / T, -1)  # re-tempered teacher over its support
    if missing_mass == "support":
        logq_support = torch.log_softmax(student.gather(-1, ids).float() / T, -1)
    kd = (logp.exp() * (logp - logq_support)).sum(-1)
    if missing_mass == "residual":
        log_inside = torch.logsumexp(values.float(), -1).clamp(max=0)
        log_rest_t = torch.log(-torch.expm1(log_inside))
        log_rest_s = torch.logsumexp(logq.scatter(-1, ids, -math.inf), -1)
        kd = ((logp + log_inside[:, None]).exp() * (logp + log_inside[:, None] - logq_support)).sum(-1) \
            + log_rest_t.exp() * (log_rest_t - log_rest_s)
    return CE_WEIGHT * F.cross_entropy(student.float(), labels) + KD_WEIGHT * T * T * kd.mean()


def sparse_teacher(n: int, v: int, k: int):
    """k distinct ids per row (strided, no [N, V] temporary) and top-k-like log-probs holding 90%
    of the mass."""
    import torch

    rows = torch.arange(n)[:, None]
    ids = (rows * 7919 + torch.arange(k)[None, :] * (v // k)) % v
    values = torch.log_softmax(torch.randn(n, k) * 2, -1) + math.log(0.9)
    return ids, values


def loss_function(impl: str, missing_mass: str) -> Callable[..., Any]:
    import torch

    import kdkernels

    if impl == "kdkernels":
        return lambda s, ids, values, labels, _teacher: kdkernels.sparse_kd_loss(
            s, ids, values, labels, missing_mass=missing_mass, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT,
            backend="cpu")
    if impl == "dense":
        return lambda s, _ids, _values, labels, teacher: kdkernels.kd_loss(
            s, teacher, labels, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT, backend="cpu")

    def eager(s, ids, values, labels, _teacher):
        return eager_sparse_loss(s, ids, values, labels, missing_mass)

    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


def setup(impl: str, dtype: str, n: int, v: int, k: int, missing_mass: str) -> Callable[[], None]:
    """Child-process setup for harness.measure: inputs and one forward + backward step."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype][0])
    student = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype).requires_grad_(True)
    ids, values = sparse_teacher(n, v, k)
    labels = torch.randint(0, v, (n,))
    teacher = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype) if impl == "dense" else None
    return harness.fwd_bwd_step(loss_function(impl, missing_mass), student, ids, values, labels, teacher)


def fused_setup(impl: str, n: int, v: int, h: int, k: int, missing_mass: str, dtype: str = "fp32",
                chunk_size=None) -> Callable[[], None]:
    """Fused lm_head + sparse loss: hidden [n, h] and lm_head [v, h] in `dtype`, both requiring grad."""
    import torch

    import kdkernels

    torch_dtype = getattr(torch, DTYPES[dtype][0])
    hidden = torch.randn(n, h).to(torch_dtype).requires_grad_(True)
    weight = (torch.randn(v, h) * (LOGIT_STD / math.sqrt(h))).to(torch_dtype).requires_grad_(True)
    ids, values = sparse_teacher(n, v, k)
    labels = torch.randint(0, v, (n,))
    options = dict(missing_mass=missing_mass, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT)

    def step() -> None:
        if impl == "fused":
            loss = kdkernels.fused_linear_sparse_kd_loss(hidden, weight, ids, values, labels, chunk_size=chunk_size,
                                                         **options)
        else:
            loss = kdkernels.sparse_kd_loss(hidden @ weight.t(), ids, values, labels, **options)
        loss.backward()
        hidden.grad = weight.grad = None

    return step


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("sparse", __doc__, temperature=None)
    parser.add_argument("--k", type=int, default=64, help="teacher ids per row (default 64)")
    parser.add_argument("--missing-mass", choices=MODES, default="renormalize")
    harness.add_list_arg(parser, "--dtypes", DTYPES, help="comma list of fp32, bf16 (default both)")
    harness.add_list_arg(parser, "--impls", IMPLS, help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--fused-v", type=int, default=128000, help="fused-linear vocabulary (default 128000)")
    parser.add_argument("--fused-h", type=int, default=1024, help="fused-linear hidden size (default 1024)")
    harness.add_list_arg(parser, "--fused-dtypes", DTYPES, help="fused-linear lm_head dtypes (default both)")
    harness.add_list_arg(parser, "--fused-impls", FUSED_IMPLS,
                         help=f"comma list of {', '.join(FUSED_IMPLS)}, or none (default both)")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-linear table")
    harness.add_run_args(parser, repeat=7, time_budget_s=20.0, warmup=None)
    return harness.parse_run_args(parser, argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    configs = [(dtype, impl) for dtype in args.dtypes for impl in args.impls]
    harness.progress(f"sparse benchmark: N={args.n} V={args.v} k={args.k} {args.missing_mass}, "
                     f"{len(configs)} configurations, {harness.available_cpus()} threads")
    rows: List[Dict[str, Any]] = []
    for index, (dtype, impl) in enumerate(configs, 1):
        result = harness.measure("benchmarks.sparse:setup",
                                 {"impl": impl, "dtype": dtype, "n": args.n, "v": args.v, "k": args.k,
                                  "missing_mass": args.missing_mass},
                                 repeat=args.repeat, warmup=harness.warmup_for(impl, args), time_budget_s=args.time_budget,
                                 label=f"[{index}/{len(configs)}] {dtype} {impl}")
        rows.append(harness.measured_row({"dtype": dtype, "impl": impl}, result,
                                         grad_bytes=args.n * args.v * DTYPES[dtype][1]))
    harness.add_ratios(rows, "vs_compile", baseline=lambda row: row["impl"] == "compile", group_by=("dtype",))
    harness.add_ratios(rows, "vs_dense", baseline=lambda row: row["impl"] == "dense", group_by=("dtype",))
    fused_rows: List[Dict[str, Any]] = []
    if not args.no_fused:
        for dtype in args.fused_dtypes:
            weight_grad_mib = args.fused_v * args.fused_h * DTYPES[dtype][1] / harness.MIB
            for impl in args.fused_impls:
                result = harness.measure("benchmarks.sparse:fused_setup",
                                         {"impl": impl, "n": args.n, "v": args.fused_v, "h": args.fused_h,
                                          "k": args.k, "missing_mass": args.missing_mass, "dtype": dtype},
                                         repeat=max(1, min(args.repeat, 3)), warmup=1,
                                         time_budget_s=args.time_budget, label=f"fused-linear {dtype} {impl}")
                row = harness.measured_row({"dtype": dtype, "impl": impl, "weight_grad_mib": weight_grad_mib},
                                           result, grad_bytes=args.n * args.fused_v * DTYPES[dtype][1])
                if "error" not in row:
                    row["beyond_weight_grad_mib"] = row["extra_peak_mib"] - weight_grad_mib
                fused_rows.append(row)
    return {"rows": rows, "fused_rows": fused_rows}


_CONFIG_COLUMNS = [harness.Column("dtype", "dtype"), harness.IMPL_COLUMN]
COLUMNS = _CONFIG_COLUMNS + harness.measured_columns(
    harness.Column("x compile", "vs_compile", ".2f"), harness.Column("x dense kd_loss", "vs_dense", ".2f")) + [
    harness.PEAK_PER_GRAD_COLUMN]
FUSED_COLUMNS = _CONFIG_COLUMNS + [
    harness.Column("median ms", "median_ms", ".1f"), harness.Column("extra peak MiB", "extra_peak_mib", ".0f"),
    harness.Column("weight grad MiB", "weight_grad_mib", ".0f"),
    harness.Column("peak - weight grad MiB", "beyond_weight_grad_mib", ".0f"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    tables = (("rows", COLUMNS, f"sparse_kd_loss, forward KL ({args.missing_mass}) + CE, N={args.n}, V={args.v}, "
                                f"k={args.k}, fwd+bwd, {harness.available_cpus()} threads"),
              ("fused_rows", FUSED_COLUMNS, f"fused lm_head + sparse loss, N={args.n}, V={args.fused_v}, "
                                            f"H={args.fused_h}, k={args.k}, fwd+bwd"))
    for key, columns, title in tables:
        if results[key]:
            harness.print_table(results[key], columns, markdown=args.markdown, title=title)
    harness.print_failures(results["rows"] + results["fused_rows"], "dtype", "impl")
    if args.json:
        harness.write_json(args.json, {"title": "sparse", "meta": vars(args), **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
