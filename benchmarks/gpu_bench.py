"""GPU benchmark of the fused KD loss, forward + backward, beside its peers, on one CUDA device.

    python -m benchmarks.gpu_bench                    # bf16; N=8192 V=128256 and N=4096 V=32000
    python -m benchmarks.gpu_bench --shapes 8192x128256 --divergences forward_kl,jsd --out results
    python -m benchmarks.gpu_bench --sweep            # also time the Triton kernel's launch shapes
    python -m benchmarks.gpu_bench --dry-run          # smoke test of this script on the CPU, tiny

Implementations, each in its own process per shape (an error, even one that breaks the CUDA
context, costs only that implementation's rows):
  kdkernels-triton, kdkernels-cuda  kd_loss(..., reduction="batchmean", backend=...), forward and
                    backward; the backward multiplies the saved gradient by the incoming gradient,
                    one more pass over the gradient
  triton-kernel, cuda-kernel        the backend's rows() alone: the one kernel that writes the row
                    losses and the gradient
  eager, compile    the hand-written PyTorch formula (benchmarks.eager) and torch.compile of it
  liger             Liger-Kernel's LigerKLDIVLoss / LigerJSD on eager log_softmax / softmax
                    (benchmarks.kd_loss), where Liger has the divergence and is installed
Then, at the first shape, the other loss families (benchmarks.gpu_families: cakd_loss / dkd_loss,
sparse_kd_loss, and fused_linear_kd_loss at hidden size --hidden with its % of the measured bf16
matmul throughput and its gradient error against float64), each beside its peers; the launch-shape
sweep comes last. Every configuration runs in its own process; a failing one reads n/a.
Times are CUDA-event medians of --repeat steps after the warmup (torch.compile compiles there).
GB/s counts 3 passes over [N, V] in the logits' dtype (read student, read teacher, write gradient:
6 bytes per element at bf16), the least a fused implementation moves; "% copy" relates it to a
device-to-device copy measured in the same run. "extra peak MiB" is torch.cuda.max_memory_allocated
during one step minus what was allocated before it (the inputs): exact for CUDA memory, so no
separate process is needed for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks import gpu_families, harness
from benchmarks.kd_loss import DTYPES, LIGER_DIVERGENCES, LOGIT_STD, TENSOR_PASSES, _liger_loss

# In the order they run: what a short time budget must not miss first, torch.compile (slow to
# compile) last.
IMPLS = ("kdkernels-triton", "kdkernels-cuda", "triton-kernel", "cuda-kernel", "eager", "liger", "compile")
PEERS = ("eager", "compile", "liger")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
DEFAULT_SHAPES = ((8192, 128256), (4096, 32000))
# Triton launch shapes (BLOCK, num_warps) timed by --sweep.
SWEEP = ((2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32))
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Child side: one configuration


def _inputs(device, dtype, n: int, v: int):
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, v, device=device, generator=generator) * LOGIT_STD).to(dtype)
    teacher = (torch.randn(n, v, device=device, generator=generator) * LOGIT_STD).to(dtype)
    return student.requires_grad_(True), teacher


def _kd_config(request: Dict[str, Any]):
    from kdkernels import _checks

    return _checks.make_config(divergence=request["divergence"], temperature=request["temperature"],
                               beta=request["beta"], kd_weight=1.0, ce_weight=0.0, scale_by_t2=True,
                               ignore_index=-100, has_labels=False)


def _step(request: Dict[str, Any], student, teacher) -> Callable[[], Any]:
    """One forward + backward of the requested implementation (the gradient is dropped after)."""
    import torch

    impl, divergence = request["impl"], request["divergence"]
    temperature, beta = request["temperature"], request["beta"]
    if impl == "copy":
        destination = torch.empty_like(teacher)
        return lambda: destination.copy_(teacher)
    if impl.endswith("-kernel"):
        from kdkernels import backends

        backend = impl.split("-")[0]
        backends.resolve(backend, student)  # raises when this backend cannot run here
        rows = backends.load(backend).rows
        cfg = _kd_config(request)
        scale = torch.tensor(1.0 / student.shape[0], device=student.device)
        detached = student.detach()
        return lambda: rows(detached, teacher, None, scale, cfg, True)
    if impl.startswith("kdkernels-"):
        import kdkernels

        backend = impl.split("-")[1]

        def loss_fn(s, t):
            return kdkernels.kd_loss(s, t, divergence=divergence, temperature=temperature, beta=beta,
                                     reduction="batchmean", backend=backend)
    elif impl == "liger":
        loss_fn = _liger_loss(divergence, temperature, beta)
    else:
        from benchmarks.eager import EAGER_LOSSES

        eager = EAGER_LOSSES[divergence]

        def loss_fn(s, t):
            return eager(s, t, temperature, beta)

        if impl == "compile":
            loss_fn = torch.compile(loss_fn, dynamic=False)
    return harness.fwd_bwd_step(loss_fn, student, teacher)


class _Timer:
    """Milliseconds of fn(): CUDA events on a GPU, the wall clock on the CPU (dry runs)."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def _extra_peak_mib(step: Callable[[], Any], timer: _Timer) -> Optional[float]:
    torch = timer.torch
    if not timer.cuda:
        return None
    timer.sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    timer.sync()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def _time_steps(step: Callable[[], Any], timer: _Timer, warmup: int, repeat: int) -> Dict[str, Any]:
    for _ in range(warmup):
        step()
    timer.sync()
    times = [timer(step) for _ in range(repeat)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "steps": len(times)}


def _run_family_child(request: Dict[str, Any], device, dtype, timer: "_Timer") -> Dict[str, Any]:
    """{"cases": {case: timing or {"error": ...}}} of one implementation of a loss family."""
    family, impl, n, v, h = request["family"], request["impl"], request["n"], request["v"], request["h"]
    results: Dict[str, Any] = {}
    for case in request["cases"]:
        try:
            if impl == "matmul":
                step = gpu_families.matmul_step(n, h, v, dtype, device)
            elif family == "fused_linear":
                step = gpu_families.fused_linear_step(impl, n, h, v, dtype, device)
            else:
                step = gpu_families.logits_step(family, case, impl, n, v, dtype, device)
            result = _time_steps(step, timer, request["warmup"], request["repeat"])
            result["extra_peak_mib"] = _extra_peak_mib(step, timer)
            del step
            if family == "fused_linear" and impl != "matmul":
                result["grad_error"] = gpu_families.hidden_grad_error(impl, min(n, gpu_families.ERROR_ROWS), h, v,
                                                                      dtype, device)
        except Exception as exc:  # this case only
            result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        results[case] = result
    return {"cases": results}


def run_request(request: Dict[str, Any]) -> Dict[str, Any]:
    """One request, run in a child process by harness.run_in_child: {"divergences": {name: timing or
    {"error": ...}}}, {"cases": ...} or {"sweep": [...]}"""
    import torch

    device = torch.device(request["device"])
    dtype = getattr(torch, DTYPES[request["dtype"]][0])
    if request.get("family", "kd") != "kd":
        return _run_family_child(request, device, dtype, _Timer(device))
    student, teacher = _inputs(device, dtype, request["n"], request["v"])
    timer = _Timer(device)
    if request["impl"] == "triton-sweep":
        return {"sweep": _sweep(dict(request, divergence="forward_kl"), student, teacher, timer)}
    results = {}
    for divergence in request["divergences"]:
        try:
            step = _step(dict(request, divergence=divergence), student, teacher)
            result = _time_steps(step, timer, request["warmup"], request["repeat"])
            result["extra_peak_mib"] = _extra_peak_mib(step, timer)
        except Exception as exc:  # this divergence only
            result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        results[divergence] = result
        student.grad = None
    return {"divergences": results}


def _sweep(request: Dict[str, Any], student, teacher, timer: _Timer) -> List[Dict[str, Any]]:
    """The Triton kernel alone at each (BLOCK, num_warps) of SWEEP."""
    import torch

    from kdkernels.backends.triton import kd_loss as triton_kd_loss

    cfg = _kd_config(request)
    scale = torch.tensor(1.0 / student.shape[0], device=student.device)
    detached = student.detach()
    rows = []
    for block, num_warps in SWEEP:
        def step():
            return triton_kd_loss.rows(detached, teacher, None, scale, cfg, True, block=block,
                                       num_warps=num_warps)

        try:
            rows.append({"block": block, "num_warps": num_warps,
                         **_time_steps(step, timer, request["warmup"], request["repeat"])})
        except Exception as exc:  # e.g. too many registers for this shape: report, go on
            rows.append({"block": block, "num_warps": num_warps, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


# ----------------------------------------------------------------------------------------------
# Parent side


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are NxV[,NxV...], got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("gpu_bench", __doc__, v=None)
    parser.add_argument("--shapes", type=_parse_shapes, default=list(DEFAULT_SHAPES),
                        help="NxV list (default 8192x128256,4096x32000)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    harness.add_list_arg(parser, "--divergences", DIVERGENCES, default=["forward_kl", "jsd"],
                         help="divergences to time (default forward_kl,jsd)")
    harness.add_list_arg(parser, "--impls", IMPLS, help=f"implementations (default: all of {', '.join(IMPLS)})")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixing / skew weight (default 0.5)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the Triton kernel's launch shapes (last)")
    harness.add_list_arg(parser, "--families", ("kd",) + gpu_families.FAMILIES,
                         help="loss families (default: kd,cakd,sparse,fused_linear); the others run at the first shape")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size H of the fused_linear rows")
    parser.add_argument("--time-budget", type=float, default=360.0,
                        help="seconds for the whole run; configurations past it are reported as skipped")
    parser.add_argument("--child-timeout", type=float, default=180.0, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="directory for gpu_bench.md and gpu_bench.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, shape 4x256, 2 steps, no torch.compile: exercises this script only")
    args = parser.parse_args(argv)
    args.device = "cuda"
    if args.dry_run:
        args.device, args.shapes, args.repeat, args.warmup, args.hidden = "cpu", [(4, 256)], 2, 1, 32
        args.impls = [impl for impl in args.impls if impl != "compile"]
    return args


def _bytes_per_step(n: int, v: int, dtype: str) -> int:
    return TENSOR_PASSES * n * v * DTYPES[dtype][1]


def run(args: argparse.Namespace, on_progress: Callable[[Dict[str, Any]], None] = lambda results: None
        ) -> Dict[str, Any]:
    """Every configuration; on_progress(results so far) after each child process (so that a run
    cut short still leaves its tables). The launch-shape sweep runs right after the first shape."""
    started = time.perf_counter()
    results: Dict[str, Any] = {"rows": [], "copies": {}, "sweep": [], "family_rows": [], "matmul_tflops": None,
                               "wall_s": 0.0}

    def request(impl: str, n: int, v: int, divergences=("forward_kl",)) -> Dict[str, Any]:
        return {"impl": impl, "device": args.device, "dtype": args.dtype, "n": n, "v": v,
                "divergences": list(divergences), "temperature": args.temperature, "beta": args.beta,
                "warmup": args.warmup, "repeat": args.repeat}

    def timed(req: Dict[str, Any], label: str) -> Dict[str, Any]:
        left = args.time_budget - (time.perf_counter() - started)
        if left <= 0:
            result = {"error": "skipped: time budget spent"}
        else:
            harness.progress(f"  running {label} ...")
            # The last child may overrun the budget by at most a minute.
            result = harness.run_in_child("benchmarks.gpu_bench:run_request", req,
                                          time_limit_s=min(args.child_timeout, left + 60))
        parts = result.get("divergences") or result.get("cases") or {"": result}
        harness.progress(f"  {label}: " + ", ".join(
            f"{name} " * bool(name) + (f"n/a ({r['error']})" if "error" in r else f"{r['median_ms']:.3f} ms")
            for name, r in parts.items() if "sweep" not in r))
        return result

    def finish_step() -> None:
        _add_peer_ratios(results["rows"])
        _add_peer_ratios(results["family_rows"], "case")
        results["wall_s"] = time.perf_counter() - started
        on_progress(results)

    for index, (n, v) in enumerate(args.shapes):
        shape = f"{n}x{v}"
        harness.progress(f"shape N={n} V={v} {args.dtype}")
        copy = timed(request("copy", n, v), f"{shape} device copy").get("divergences", {}).get("forward_kl", {})
        copy = copy or {"error": "no result"}
        copy_gbs = None if "error" in copy else harness.copy_gbs(n * v * DTYPES[args.dtype][1], copy["median_ms"])
        results["copies"][shape] = {"copy_gbs": copy_gbs, **copy}
        for impl in args.impls if "kd" in args.families else ():
            divergences = [d for d in args.divergences if impl != "liger" or d in LIGER_DIVERGENCES]
            if not divergences:
                continue
            result = timed(request(impl, n, v, divergences), f"{shape} {impl}")
            for divergence in divergences:
                outcome = result.get("divergences", {}).get(divergence) or {"error": result.get("error", "no result")}
                results["rows"].append(_row(impl, divergence, n, v, outcome, copy_gbs, args.dtype))
            finish_step()
        if index == 0:
            for family in (f for f in args.families if f != "kd"):
                try:  # a family's failure costs its rows only
                    _run_family(args, family, n, v, copy_gbs, request, timed, results, finish_step)
                except Exception as exc:
                    harness.progress(f"  {family}: n/a ({type(exc).__name__}: {exc})")
                    results["family_rows"].append({"family": family, "case": "", "impl": "",
                                                   "error": f"{type(exc).__name__}: {exc}"[:300]})
    if args.sweep:
        n, v = args.shapes[0]
        shape = f"{n}x{v}"
        result = timed(request("triton-sweep", n, v), f"{shape} Triton launch shapes")
        results["sweep"] = result.get("sweep") or [{"error": result.get("error")}]
        for entry in results["sweep"]:
            if "median_ms" in entry:
                entry.update(harness.bandwidth(_bytes_per_step(n, v, args.dtype), entry["median_ms"],
                                               results["copies"][shape]["copy_gbs"]))
    finish_step()
    return results


def _run_family(args: argparse.Namespace, family: str, n: int, v: int, copy_gbs: Optional[float], request,
                timed, results: Dict[str, Any], finish_step) -> None:
    """The rows of one loss family at N x V (fused_linear: hidden size args.hidden, after one bf16
    matmul of the same sizes for the throughput it is related to)."""
    h = args.hidden
    shape = f"{n}x{v}" + (f" H={h}" if family == "fused_linear" else "")

    def family_request(impl: str, cases) -> Dict[str, Any]:
        return {**request(impl, n, v), "family": family, "cases": list(cases), "h": h}

    if family == "fused_linear":
        matmul = timed(family_request("matmul", ["matmul"]), f"{shape} bf16 matmul").get("cases", {}).get("matmul", {})
        if "median_ms" in matmul:
            results["matmul_tflops"] = 2.0 * n * h * v / (matmul["median_ms"] * 1e-3) / 1e12
    impls = [impl for impl in gpu_families.IMPLS[family] if impl in args.impls]
    pairs = gpu_families.rows_of(family, impls)
    for impl in dict.fromkeys(impl for _, impl in pairs):
        cases = [case for case, i in pairs if i == impl]
        result = timed(family_request(impl, cases), f"{shape} {family} {impl}")
        for case in cases:
            outcome = result.get("cases", {}).get(case) or {"error": result.get("error", "no result")}
            results["family_rows"].append(_family_row(family, case, impl, n, v, h, outcome, copy_gbs,
                                                      results["matmul_tflops"], args.dtype))
        finish_step()


def _family_row(family: str, case: str, impl: str, n: int, v: int, h: int, result: Dict[str, Any],
                copy_gbs: Optional[float], matmul_tflops: Optional[float], dtype: str) -> Dict[str, Any]:
    row = _measured({"family": family, "case": case, "impl": impl, "shape": f"{n}x{v}"}, result)
    if "error" in row:
        return row
    if family == "fused_linear":
        tflops = gpu_families.fused_linear_flops(n, h, v) / (result["median_ms"] * 1e-3) / 1e12
        row.update(tflops=tflops, pct_matmul=gpu_families.pct(tflops, matmul_tflops),
                   grad_error=result.get("grad_error"))
    else:
        row.update(harness.bandwidth(gpu_families.TENSOR_PASSES[family] * n * v * DTYPES[dtype][1],
                                     result["median_ms"], copy_gbs))
    return row


def _measured(row: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    """``row`` with the result's median and fastest step and extra peak memory, or with its error."""
    if "error" in result:
        return {**row, "error": result["error"]}
    return {**row, "median_ms": result["median_ms"], "min_ms": result["min_ms"],
            "extra_peak_mib": result["extra_peak_mib"]}


def _row(impl: str, divergence: str, n: int, v: int, result: Dict[str, Any], copy_gbs: Optional[float],
         dtype: str) -> Dict[str, Any]:
    row = _measured({"impl": impl, "divergence": divergence, "shape": f"{n}x{v}"}, result)
    if "error" not in row:
        row.update(harness.bandwidth(_bytes_per_step(n, v, dtype), row["median_ms"], copy_gbs))
    return row


def _add_peer_ratios(rows: List[Dict[str, Any]], case_key: str = "divergence") -> None:
    """x best peer: time over the fastest of eager / compile / liger at the same shape and case."""
    harness.add_ratios(rows, "vs_best_peer", baseline=lambda row: row["impl"] in PEERS,
                       group_by=("family", "shape", case_key))


COLUMNS = [harness.IMPL_COLUMN] + harness.measured_columns(
    harness.Column("GB/s", "gbs", ".0f"), harness.Column("% copy", "pct_copy", ".1f"),
    harness.Column("x best peer", "vs_best_peer", ".2f"), digits=3)
FAMILY_COLUMNS = [harness.Column("case", "case")] + COLUMNS
# the fused lm_head's time against the GEMMs' floor (TFLOP/s, % matmul) in place of bytes moved
FUSED_COLUMNS = COLUMNS[:2] + [harness.Column("TFLOP/s", "tflops", ".0f"),
                               harness.Column("% matmul", "pct_matmul", ".1f"), COLUMNS[5],
                               harness.Column("grad err", "grad_error", ".2e"), COLUMNS[6]]
SWEEP_COLUMNS = [harness.Column("BLOCK", "block"), harness.Column("warps", "num_warps"),
                 harness.Column("median ms", "median_ms", ".3f"), harness.Column("GB/s", "gbs", ".0f"),
                 harness.Column("% copy", "pct_copy", ".1f")]


def report(args: argparse.Namespace, results: Dict[str, Any]) -> str:
    """The tables as markdown (also printed)."""
    parts = [f"# kdkernels GPU benchmark ({args.device}, {args.dtype}, T={args.temperature}, fwd+bwd)", ""]
    for n, v in args.shapes:
        shape = f"{n}x{v}"
        copy_gbs = results["copies"][shape]["copy_gbs"]
        for divergence in args.divergences:
            rows = [r for r in results["rows"] if r["shape"] == shape and r["divergence"] == divergence]
            parts += [f"## {divergence}, N={n}, V={v}", "", harness.format_table(rows, COLUMNS, markdown=True), ""]
        copy_text = f"{copy_gbs:.0f} GB/s" if copy_gbs else "n/a"
        parts += [f"Device-to-device copy at N={n}, V={v}: {copy_text} (read + write).", ""]
    for family in (f for f in args.families if f != "kd"):
        rows = [r for r in results["family_rows"] if r["family"] == family]
        if not rows:
            continue
        n, v = args.shapes[0]
        if family == "fused_linear":
            tflops = results["matmul_tflops"]
            parts += [f"## fused_linear_kd_loss (forward KL), N={n}, H={args.hidden}, V={v}", "",
                      harness.format_table(rows, FUSED_COLUMNS, markdown=True), "",
                      f"TFLOP/s counts the 4 GEMMs (8 N H V flops); bf16 matmul [N, H] x [H, V] in the same run: "
                      + (f"{tflops:.0f} TFLOP/s." if tflops else "n/a."),
                      "grad err: max |dL/dh - float64| / max |float64| on the first "
                      f"{gpu_families.ERROR_ROWS} rows, after a least-squares scale fit.", ""]
        else:
            parts += [f"## {family} ({', '.join(gpu_families.CASES[family])}), N={n}, V={v}", "",
                      harness.format_table(rows, FAMILY_COLUMNS, markdown=True), "",
                      f"GB/s counts {gpu_families.TENSOR_PASSES[family]} passes over [N, V].", ""]
    if results["sweep"]:
        n, v = args.shapes[0]
        parts += [f"## Triton launch shapes, forward_kl kernel alone, N={n}, V={v}", "",
                  harness.format_table(results["sweep"], SWEEP_COLUMNS, markdown=True), ""]
    failures = [r for r in results["rows"] + results["family_rows"] if "error" in r]
    if failures:
        parts += ["Not measured:", ""] + [
            f"- {r.get('shape', '')} {r.get('family', 'kd')} {r.get('divergence', r.get('case'))} {r['impl']}: "
            f"{r['error'][:200]}" for r in failures] + [""]
    parts.append(f"GB/s counts {TENSOR_PASSES} passes over [N, V] in {args.dtype}; "
                 f"wall time {results['wall_s']:.0f} s.")
    return "\n".join(parts)


def write_outputs(args: argparse.Namespace, results: Dict[str, Any]) -> None:
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as handle:
        handle.write(report(args, results) + "\n")
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as handle:
        json.dump({"args": vars(args), **results}, handle, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args, on_progress=lambda partial: write_outputs(args, partial))
    print(report(args, results), flush=True)
    write_outputs(args, results)
    if args.out:
        harness.progress(f"wrote {args.out}/gpu_bench.md and gpu_bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
