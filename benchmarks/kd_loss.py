"""Benchmark of the fused KD loss from logits, forward + backward, beside its peers.

    python -m benchmarks.kd_loss                  # N=4096, V=32000, T=2; several minutes
    python -m benchmarks.kd_loss --quick          # N=1024, fewer repeats
    python -m benchmarks.kd_loss --divergences jsd,tvd --dtypes fp32 --json out.json

Peers, each configuration in its own process (benchmarks.harness):
  eager      the hand-written PyTorch formula (benchmarks.eager), in the logits' dtype
  compile    torch.compile of that same function (compilation happens in the untimed warmup)
  liger      Liger-Kernel's LigerKLDIVLoss / LigerJSD / LigerTVDLoss on top of eager
             log_softmax/softmax, where Liger has the divergence (Triton kernels: GPU only)
  kdkernels  kdkernels.kd_loss(..., reduction="batchmean", backend="cpu")

Two tables: forward KL at every --dtypes, and every --divergences at fp32. Columns: median time,
ratio to torch.compile of the same divergence and dtype, extra peak RSS (peak during the timed
steps minus RSS once the inputs exist) in MiB and as a multiple of the gradient tensor, the
bandwidth over three tensor passes (read student, read teacher, write gradient), and that bandwidth
as a percentage of a memory copy measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List

from benchmarks import harness

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
IMPLS = ("eager", "compile", "liger", "kdkernels")
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}
# The divergences Liger-Kernel offers as a loss on log-probabilities / probabilities.
LIGER_DIVERGENCES = ("forward_kl", "jsd", "tvd")
LOGIT_STD = 3.0  # spread of the random logits (LLM logits are of this order)
TENSOR_PASSES = 3  # read student, read teacher, write gradient: the bandwidth floor


def _liger_loss(divergence: str, temperature: float, beta: float) -> Callable[..., Any]:
    import importlib.util

    import torch.nn.functional as F

    if importlib.util.find_spec("liger_kernel") is None:
        raise RuntimeError("Liger-Kernel is not installed (pip install liger-kernel)")
    T = temperature
    if divergence == "forward_kl":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean")
        return lambda s, t: kl(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)) * (T * T)
    if divergence == "jsd":
        from liger_kernel.transformers.jsd import LigerJSD

        js = LigerJSD(beta=beta)  # same convention: m = beta p_teacher + (1 - beta) q_student
        return lambda s, t: js(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)) * (T * T)
    if divergence == "tvd":
        from liger_kernel.transformers.tvd import LigerTVDLoss

        tv = LigerTVDLoss(reduction="batchmean")
        return lambda s, t: tv(F.softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)) * (T * T)
    raise ValueError(f"Liger-Kernel has no {divergence} loss")


def loss_function(impl: str, divergence: str, temperature: float, beta: float,
                  backend: str = "cpu") -> Callable[..., Any]:
    """loss_fn(student_logits, teacher_logits) -> scalar batchmean loss of one implementation:
    "eager", "compile", "liger" or "kdkernels" (kd_loss on ``backend``)."""
    if impl == "kdkernels":
        import kdkernels

        def loss_fn(s, t):
            return kdkernels.kd_loss(s, t, divergence=divergence, temperature=temperature, beta=beta,
                                     reduction="batchmean", backend=backend)

        return loss_fn
    if impl == "liger":
        return _liger_loss(divergence, temperature, beta)
    import torch

    from benchmarks.eager import EAGER_LOSSES

    eager = EAGER_LOSSES[divergence]

    def eager_loss(s, t):
        return eager(s, t, temperature, beta)

    return torch.compile(eager_loss, dynamic=False) if impl == "compile" else eager_loss


def _probe_liger(loss_fn: Callable[..., Any], dtype) -> None:
    """Runs the Liger loss once on a tiny input, so that a platform it cannot run on is reported
    as such (its Triton kernels need a GPU driver) rather than as a failure mid-benchmark."""
    import torch

    student = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    try:
        loss_fn(student, torch.randn(2, 8, dtype=dtype)).backward()
    except Exception as exc:
        device = "CUDA" if torch.cuda.is_available() else "CPU"
        raise RuntimeError(f"Liger-Kernel's Triton kernel does not run on {device} tensors here "
                           f"({type(exc).__name__}: {exc})") from exc


def setup(impl: str, divergence: str, dtype: str, n: int, v: int, temperature: float,
          beta: float) -> Callable[[], None]:
    """Child-process setup for harness.measure: inputs and one forward + backward step."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype][0])
    loss_fn = loss_function(impl, divergence, temperature, beta)
    if impl == "liger":
        _probe_liger(loss_fn, torch_dtype)
    student = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype).requires_grad_(True)
    teacher = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype)
    return harness.fwd_bwd_step(loss_fn, student, teacher)


def _parse_list(text: str, allowed) -> List[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kd_loss", description=__doc__.split("\n")[0])
    parser.add_argument("--v", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixing weight (default 0.5)")
    parser.add_argument("--skew-alpha", type=float, default=0.1,
                        help="skew weight of skew_kl / skew_reverse_kl (default 0.1, as DistiLLM)")
    parser.add_argument("--dtypes", type=lambda s: _parse_list(s, DTYPES), default=["fp32", "bf16"],
                        help="dtypes of the forward-KL table (default fp32,bf16)")
    parser.add_argument("--divergences", type=lambda s: _parse_list(s, DIVERGENCES), default=list(DIVERGENCES),
                        help="divergences of the fp32 table (default: all)")
    parser.add_argument("--impls", type=lambda s: _parse_list(s, IMPLS), default=list(IMPLS),
                        help="implementations to run (default: all)")
    parser.add_argument("--thp", action="store_true",
                        help="run every child with THP_MEM_ALLOC_ENABLE=1 (PyTorch allocates with huge pages)")
    harness.add_run_args(parser, repeat=7, time_budget_s=20.0, warmup=None,
                         warmup_help="untimed steps (default: 2 for torch.compile, which compiles in "
                                     "them, 1 otherwise)")
    return harness.parse_run_args(parser, argv)


def _configurations(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """(divergence, dtype, impl) to run: forward KL at every dtype, then the rest at fp32."""
    pairs = [("forward_kl", dtype) for dtype in args.dtypes]
    pairs += [(divergence, "fp32") for divergence in args.divergences if (divergence, "fp32") not in pairs]
    return [{"divergence": divergence, "dtype": dtype, "impl": impl}
            for divergence, dtype in pairs for impl in args.impls
            if impl != "liger" or divergence in LIGER_DIVERGENCES]


def _beta_for(divergence: str, args: argparse.Namespace) -> float:
    return args.skew_alpha if divergence.startswith("skew") else args.beta


def _warmup_for(impl: str, args: argparse.Namespace) -> int:
    if args.warmup is not None:
        return args.warmup
    return 2 if impl == "compile" else 1


def run(args: argparse.Namespace) -> Dict[str, Any]:
    env = {"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else {}
    configs = _configurations(args)
    fp32_grad_bytes = args.n * args.v * 4
    harness.progress(f"kd_loss benchmark: N={args.n} V={args.v} T={args.temperature}, "
                     f"{len(configs)} configurations + a memory copy, {harness.available_cpus()} threads")
    copy_gbs = harness.copy_bandwidth_gbs(fp32_grad_bytes)
    harness.progress(f"memory copy: {copy_gbs:.1f} GB/s")

    rows = []
    for index, config in enumerate(configs, 1):
        divergence, dtype, impl = config["divergence"], config["dtype"], config["impl"]
        result = harness.measure(
            "benchmarks.kd_loss:setup",
            {"impl": impl, "divergence": divergence, "dtype": dtype, "n": args.n, "v": args.v,
             "temperature": args.temperature, "beta": _beta_for(divergence, args)},
            repeat=args.repeat, warmup=_warmup_for(impl, args), time_budget_s=args.time_budget, env=env,
            label=f"[{index}/{len(configs)}] {divergence} {dtype} {impl}")
        rows.append(_row(config, result, args, copy_gbs))
    harness.add_ratios(rows, "vs_compile", baseline=lambda row: row["impl"] == "compile",
                       group_by=("divergence", "dtype"))
    return {"rows": rows, "copy_gbs": copy_gbs}


def _row(config: Dict[str, Any], result: Dict[str, Any], args: argparse.Namespace,
         copy_gbs: float) -> Dict[str, Any]:
    row = dict(config)
    if "error" in result:
        row["error"] = result["error"]
        return row
    grad_bytes = args.n * args.v * DTYPES[config["dtype"]][1]
    row.update(median_ms=result["median_ms"], min_ms=result["min_ms"],
               extra_peak_mib=result["extra_peak_mib"],
               peak_per_grad=result["extra_peak_mib"] * harness.MIB / grad_bytes,
               retained_mib=result["retained_mib"], steps=len(result["times_ms"]),
               **harness.bandwidth(TENSOR_PASSES * grad_bytes, result["median_ms"], copy_gbs))
    return row


COLUMNS_COMMON = [
    harness.Column("impl", "impl"),
    harness.Column("median ms", "median_ms", ".1f"),
    harness.Column("min ms", "min_ms", ".1f"),
    harness.Column("x compile", "vs_compile", ".2f"),
    harness.Column("extra peak MiB", "extra_peak_mib", ".0f"),
    harness.Column("peak / grad", "peak_per_grad", ".2f"),
    harness.Column("GB/s", "gbs", ".1f"),
    harness.Column("% copy", "pct_copy", ".0f"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    rows = results["rows"]
    meta = {"n": args.n, "v": args.v, "temperature": args.temperature, "beta": args.beta,
            "skew_alpha": args.skew_alpha, "repeat": args.repeat, "warmup": args.warmup,
            "threads": harness.available_cpus(), "copy_gbs": results["copy_gbs"], "thp": args.thp}
    shape = f"N={args.n}, V={args.v}, T={args.temperature}, fwd+bwd, {harness.available_cpus()} threads"
    forward_rows = [r for r in rows if r["divergence"] == "forward_kl" and r["dtype"] in args.dtypes]
    divergence_rows = [r for r in rows if r["dtype"] == "fp32" and r["divergence"] in args.divergences]
    if forward_rows:
        harness.print_table(forward_rows, [harness.Column("dtype", "dtype")] + COLUMNS_COMMON,
                            markdown=args.markdown, title=f"Forward KL ({shape})")
    if divergence_rows:
        harness.print_table(divergence_rows, [harness.Column("divergence", "divergence")] + COLUMNS_COMMON,
                            markdown=args.markdown,
                            title=f"Divergences at fp32 ({shape}; jsd beta={args.beta}, "
                                  f"skew alpha={args.skew_alpha})")
    print(f"\nmemory copy: {results['copy_gbs']:.1f} GB/s (read + write); "
          f"GB/s counts {TENSOR_PASSES} passes over [N, V] in the logits' dtype")
    for row in rows:
        if "error" in row:
            print(f"n/a: {row['impl']} {row['divergence']} {row['dtype']}: {row['error']}")
    if args.json:
        harness.write_json(args.json, {"title": "kd_loss", "meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
