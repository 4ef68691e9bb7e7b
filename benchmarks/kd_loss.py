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
FLOOR_COPIES = TENSOR_PASSES / 2  # a copy reads one tensor and writes one: the floor is 1.5 copies


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
        raise RuntimeError(f"Liger-Kernel's Triton kernel does not run on {device} tensors on this machine "
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("kd_loss", __doc__)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixing weight (default 0.5)")
    parser.add_argument("--skew-alpha", type=float, default=0.1,
                        help="skew weight of skew_kl / skew_reverse_kl (default 0.1, as DistiLLM)")
    harness.add_list_arg(parser, "--dtypes", DTYPES, default=["fp32", "bf16"],
                         help="dtypes of the forward-KL table (default fp32,bf16)")
    harness.add_list_arg(parser, "--divergences", DIVERGENCES, help="divergences of the fp32 table (default: all)")
    harness.add_list_arg(parser, "--impls", IMPLS, help="implementations to run (default: all)")
    parser.add_argument("--thp", action="store_true",
                        help="run every child with THP_MEM_ALLOC_ENABLE=1 (PyTorch allocates with huge pages)")
    harness.add_run_args(parser, repeat=7, time_budget_s=20.0, warmup=None, png="kd_loss")
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


def _copy_ms(args: argparse.Namespace, dtype: str) -> float:
    nbytes = args.n * args.v * DTYPES[dtype][1]
    return harness.copy_time_ms(nbytes, label=f"memory copy of one [N, V] {dtype} tensor "
                                              f"({nbytes / harness.MIB:.0f} MiB)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    env = {"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else {}
    configs = _configurations(args)
    dtypes = list(dict.fromkeys(config["dtype"] for config in configs))
    harness.progress(f"kd_loss benchmark: N={args.n} V={args.v} T={args.temperature}, {len(configs)} "
                     f"configurations + a memory copy per dtype, {harness.available_cpus()} threads")
    copy_ms = {dtype: _copy_ms(args, dtype) for dtype in dtypes}

    rows = []
    for index, config in enumerate(configs, 1):
        divergence, dtype, impl = config["divergence"], config["dtype"], config["impl"]
        result = harness.measure(
            "benchmarks.kd_loss:setup",
            {"impl": impl, "divergence": divergence, "dtype": dtype, "n": args.n, "v": args.v,
             "temperature": args.temperature, "beta": _beta_for(divergence, args)},
            repeat=args.repeat, warmup=harness.warmup_for(impl, args), time_budget_s=args.time_budget, env=env,
            label=f"[{index}/{len(configs)}] {divergence} {dtype} {impl}")
        rows.append(_row(config, result, args, copy_ms[dtype]))
    harness.add_ratios(rows, "vs_compile", baseline=lambda row: row["impl"] == "compile",
                       group_by=("divergence", "dtype"))
    return {"rows": rows, "copy_ms": copy_ms}


def _row(config: Dict[str, Any], result: Dict[str, Any], args: argparse.Namespace,
         copy_ms: float) -> Dict[str, Any]:
    """One table row. The memory floor of a fused loss is reading two [N, V] tensors and writing
    one: FLOOR_COPIES times the copy of one [N, V] tensor of the same dtype."""
    grad_bytes = args.n * args.v * DTYPES[config["dtype"]][1]
    row = harness.measured_row(config, result, grad_bytes=grad_bytes)
    if "error" in row:
        return row
    row.update(floor_ms=FLOOR_COPIES * copy_ms, vs_floor=row["median_ms"] / (FLOOR_COPIES * copy_ms),
               **harness.bandwidth(TENSOR_PASSES * grad_bytes, row["median_ms"],
                                   harness.copy_gbs(grad_bytes, copy_ms)))
    return row


COLUMNS = [harness.IMPL_COLUMN] + harness.measured_columns(harness.Column("x compile", "vs_compile", ".2f")) + [
    harness.Column("x floor", "vs_floor", ".2f"),
    harness.PEAK_PER_GRAD_COLUMN,
    harness.Column("GB/s", "gbs", ".1f"),
    harness.Column("% copy", "pct_copy", ".0f"),
]


def main(argv=None) -> int:
    args, setup_info, setup_line = harness.start(parse_args, argv)
    results = run(args)
    rows = results["rows"]
    meta = {"n": args.n, "v": args.v, "temperature": args.temperature, "beta": args.beta,
            "skew_alpha": args.skew_alpha, "repeat": args.repeat, "warmup": args.warmup,
            "threads": harness.available_cpus(), "copy_ms": results["copy_ms"], "thp": args.thp,
            "setup": setup_info}
    shape = f"N={args.n}, V={args.v}, T={args.temperature}, fwd+bwd, {harness.available_cpus()} threads"
    forward_rows = [r for r in rows if r["divergence"] == "forward_kl" and r["dtype"] in args.dtypes]
    divergence_rows = [r for r in rows if r["dtype"] == "fp32" and r["divergence"] in args.divergences]
    print(f"\nSetup: {setup_line}")
    if forward_rows:
        harness.print_table(forward_rows, [harness.Column("dtype", "dtype")] + COLUMNS,
                            markdown=args.markdown, title=f"Forward KL ({shape})")
    if divergence_rows:
        harness.print_table(divergence_rows, [harness.Column("divergence", "divergence")] + COLUMNS,
                            markdown=args.markdown,
                            title=f"Divergences at fp32 ({shape}; jsd beta={args.beta}, "
                                  f"skew alpha={args.skew_alpha})")
    copies = ", ".join(f"{dtype} {ms:.3g} ms" for dtype, ms in results["copy_ms"].items())
    print(f"\ncopy of one [N, V] tensor: {copies}. 'x floor': median over the memory floor, "
          f"{FLOOR_COPIES:g}x that copy (a fused loss reads two [N, V] tensors and writes one). "
          f"GB/s counts {TENSOR_PASSES} passes over [N, V] in the logits' dtype; '% copy' relates it to the copy.")
    harness.print_failures(rows, "impl", "divergence", "dtype")
    if args.json:
        harness.write_json(args.json, {"title": "kd_loss", "meta": meta, "rows": rows})
    harness.plot_bars(args.png, rows, group=lambda row: f"{row['divergence']} {row['dtype']}",
                      title=f"kd_loss beside its peers ({shape})", setup=setup_line, floor_key="floor_ms",
                      floor_label=f"memory floor ({FLOOR_COPIES:g}x copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
