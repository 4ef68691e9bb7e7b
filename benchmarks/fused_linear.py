"""Benchmark of the fused lm_head + KD loss (forward KL), forward + backward, beside its peers.

    python -m benchmarks.fused_linear                 # N=4096, H=1024, V=32000 fp32, then the V table
    python -m benchmarks.fused_linear --quick         # N=1024, fewer steps
    python -m benchmarks.fused_linear --skip-vocab-table --impls kdkernels gemms

Table 1, peers at N x H x V (each configuration in its own process, benchmarks.harness):
  kdkernels  kdkernels.fused_linear_kd_loss (token chunks; compiled CPU row kernel)
  eager      full logits (student GEMM, teacher GEMM under no_grad) + the F.kl_div idiom
             (benchmarks.eager.forward_kl), autograd for the rest
  compile    torch.compile of that same eager function (compiled in the untimed warmup)
  liger      Liger-Kernel's chunked LigerFusedLinearJSDLoss with beta=0 (forward KL), no hard loss
  gemms      the floor: the four GEMMs alone (student and teacher logits, dL/dh = g W, dL/dW = g^T h)
             into preallocated outputs; bf16/fp16 on a CPU without 16-bit dot products: the
             widening GEMM (16-bit operands, float32 accumulation and output), which
             kdkernels takes there too (torch's 16-bit matmul there is ~100x slower)
Columns: median time and its ratio to the GEMM floor, the fastest step and its ratio to the
floor's fastest (the figure least disturbed by other load on a shared machine), extra peak RSS
(peak during the timed steps minus RSS once the inputs exist) in MiB and as a fraction of Liger's.
With --rounds R every configuration runs R times, interleaved, and keeps its best round.

Table 2, extra peak memory against the vocabulary (default V = 32000, 128000, 256000 at N=4096,
H=256): kdkernels stays bounded by its chunk budget plus the weight gradient, where one fp32
[N, V] logits tensor alone is N * V * 4 bytes (4 GiB at V=256000). Liger runs beside it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List

from benchmarks import harness

IMPLS = ("kdkernels", "eager", "compile", "liger", "gemms")
VOCAB_TABLE_IMPLS = ("kdkernels", "liger")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LOGIT_STD = 3.0  # spread of the random logits (LLM logits are of this order)


def _inputs(n: int, h: int, v: int, dtype):
    """Student hidden [N, H] and lm_head [V, H] requiring grad, teacher the same without grad;
    weights scaled so that the logits have std ~LOGIT_STD."""
    import torch

    scale = LOGIT_STD / h ** 0.5
    student_hidden = torch.randn(n, h).to(dtype).requires_grad_(True)
    student_weight = (torch.randn(v, h) * scale).to(dtype).requires_grad_(True)
    teacher_hidden = torch.randn(n, h).to(dtype)
    teacher_weight = (torch.randn(v, h) * scale).to(dtype)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def _loss_fn(impl: str, temperature: float, chunk_size) -> Callable[..., Any]:
    import torch

    if impl == "kdkernels":
        import kdkernels

        def fused(student_hidden, student_weight, teacher_hidden, teacher_weight):
            return kdkernels.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                  temperature=temperature, chunk_size=chunk_size,
                                                  reduction="batchmean", backend="cpu")
        return fused
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta=0: Liger's JSD is KL(teacher || student), i.e. forward KL; no hard (CE) loss
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                      temperature=temperature)

        def liger(student_hidden, student_weight, teacher_hidden, teacher_weight):
            labels = torch.zeros(student_hidden.shape[0], dtype=torch.long)
            return jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
        return liger

    from benchmarks.eager import lm_head_forward_kl

    def eager(*lm_heads):
        return lm_head_forward_kl(*lm_heads, temperature)

    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


def _gemms_step(student_hidden, student_weight, teacher_hidden, teacher_weight) -> Callable[[], None]:
    """The four GEMMs of one fused-linear step, into outputs allocated (and touched) in this setup.
    A 16-bit lm_head on a CPU without 16-bit dot products takes the widening GEMM, as the fused
    step does there (kdkernels::addmm_widening_: 16-bit operands, float32 outputs)."""
    import torch
    from kdkernels.ops.fused_linear import widened_matmul

    n, v, h = student_hidden.shape[0], student_weight.shape[0], student_hidden.shape[1]
    dtype = student_hidden.dtype
    student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    if widened_matmul(student_hidden, student_weight):
        out_dtype = torch.float32

        def mm(a, b, out):
            torch.ops.kdkernels.addmm_widening_(out, a, b, 0.0, 1.0)
    else:
        out_dtype, mm = dtype, torch.mm
    student_logits, teacher_logits = torch.zeros(n, v, dtype=out_dtype), torch.zeros(n, v, dtype=out_dtype)
    grad_logits = torch.randn(n, v).to(dtype) * 1e-4
    grad_hidden, grad_weight = torch.zeros(n, h, dtype=out_dtype), torch.zeros(v, h, dtype=out_dtype)

    def step() -> None:
        mm(student_hidden, student_weight.t(), out=student_logits)
        mm(teacher_hidden, teacher_weight.t(), out=teacher_logits)
        mm(grad_logits, student_weight, out=grad_hidden)
        mm(grad_logits.t(), student_hidden, out=grad_weight)

    step.tensors = (student_logits, teacher_logits, grad_logits, grad_hidden, grad_weight)
    return step


def setup(impl: str, n: int, h: int, v: int, dtype: str, temperature: float, chunk_size=None) -> Callable[[], None]:
    """Child-process setup for harness.measure: inputs and one forward + backward step."""
    import torch

    inputs = _inputs(n, h, v, getattr(torch, DTYPES[dtype]))
    if impl == "gemms":
        return _gemms_step(*inputs)
    loss_fn = _loss_fn(impl, temperature, chunk_size)
    student_hidden, student_weight = inputs[:2]

    def step() -> None:
        loss_fn(*inputs).backward()
        # no gradient survives between steps, as after zero_grad(set_to_none=True)
        student_hidden.grad = None
        student_weight.grad = None

    return step


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("fused_linear", __doc__, v_help="vocabulary of table 1")
    parser.add_argument("--h", type=int, default=1024, help="hidden size of table 1 (default 1024)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="kdkernels rows per chunk (default: from its memory budget)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        help="implementations of table 1 (default: all)")
    parser.add_argument("--vocab-table", nargs="+", type=int, default=[32000, 128000, 256000],
                        help="vocabularies of table 2 (default 32000 128000 256000)")
    parser.add_argument("--vocab-table-h", type=int, default=256, help="hidden size of table 2 (default 256)")
    parser.add_argument("--vocab-table-impls", nargs="+", choices=VOCAB_TABLE_IMPLS,
                        default=list(VOCAB_TABLE_IMPLS), help="implementations of table 2")
    parser.add_argument("--vocab-table-repeat", type=int, default=2, help="timed steps of table 2 (default 2)")
    parser.add_argument("--skip-vocab-table", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, interleaved, and keep each one's "
                             "fastest round (for a machine shared with other work; default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    harness.add_run_args(parser, repeat=5, time_budget_s=60.0, warmup=1,
                         warmup_help="untimed steps, compilation included (default 1)", png="fused_linear")
    return harness.parse_run_args(parser, argv)


def _measure(args: argparse.Namespace, impl: str, h: int, v: int, label: str, repeat: int) -> Dict[str, Any]:
    result = harness.measure(
        "benchmarks.fused_linear:setup",
        {"impl": impl, "n": args.n, "h": h, "v": v, "dtype": args.dtype, "temperature": args.temperature,
         "chunk_size": args.chunk_size},
        repeat=repeat, warmup=args.warmup, time_budget_s=args.time_budget, threads=args.threads, label=label)
    return {"impl": impl, "n": args.n, "h": h, "v": v, "dtype": args.dtype, **harness.result_fields(result)}


def _best_of_rounds(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from the same configuration measured in several rounds: the smallest median time
    (the round least disturbed by other load on the machine), the fastest step of all rounds and
    the largest extra peak."""
    measured = [row for row in rounds if "error" not in row]
    if not measured:
        return rounds[-1]
    best = dict(min(measured, key=lambda row: row["median_ms"]))
    best["min_ms"] = min(row["min_ms"] for row in measured)
    best["extra_peak_mib"] = max(row["extra_peak_mib"] for row in measured)
    best["rounds"] = len(measured)
    return best


def _run_table(args: argparse.Namespace, configs: List[Dict[str, Any]], repeat: int) -> List[Dict[str, Any]]:
    """Every configuration (impl, h, v) once per round, rounds interleaved, so that a burst of
    load from other processes does not hit one implementation's every measurement."""
    measured: List[List[Dict[str, Any]]] = [[] for _ in configs]
    total = len(configs) * args.rounds
    for round_index in range(args.rounds):
        for index, config in enumerate(configs):
            step = round_index * len(configs) + index + 1
            label = f"[{step}/{total}] V={config['v']} H={config['h']} {config['impl']}"
            measured[index].append(_measure(args, config["impl"], config["h"], config["v"], label, repeat))
    return [_best_of_rounds(rounds) for rounds in measured]


def _ratios(rows: List[Dict[str, Any]]) -> None:
    by_impl = {row["impl"]: row for row in rows}
    floor_ms = by_impl.get("gemms", {}).get("median_ms")
    liger_mib = by_impl.get("liger", {}).get("extra_peak_mib")
    floor_min_ms = by_impl.get("gemms", {}).get("min_ms")
    for row in rows:
        if row.get("median_ms") is not None and floor_ms:
            row["vs_gemms"] = row["median_ms"] / floor_ms
            row["min_vs_gemms"] = row["min_ms"] / floor_min_ms
        if row.get("extra_peak_mib") is not None and liger_mib:
            row["peak_vs_liger"] = row["extra_peak_mib"] / liger_mib


def run(args: argparse.Namespace) -> Dict[str, Any]:
    harness.progress(f"fused_linear benchmark: {args.dtype}, N={args.n} H={args.h} V={args.v} "
                     f"T={args.temperature}, {args.threads or harness.available_cpus()} threads")
    peers = _run_table(args, [{"impl": impl, "h": args.h, "v": args.v} for impl in args.impls], args.repeat)
    _ratios(peers)
    vocab_rows = []
    if not args.skip_vocab_table:
        configs = [{"impl": impl, "h": args.vocab_table_h, "v": v}
                   for v in args.vocab_table for impl in args.vocab_table_impls]
        vocab_rows = _run_table(args, configs, args.vocab_table_repeat)
        for row in vocab_rows:
            row["logits_mib"] = args.n * row["v"] * 4 / harness.MIB
    return {"peers": peers, "vocab": vocab_rows}


def _note_column(rows: List[Dict[str, Any]]) -> List[harness.Column]:
    """The error column, only when some configuration failed."""
    return [harness.Column("note", "error")] if any("error" in row for row in rows) else []


def report(results: Dict[str, Any], args: argparse.Namespace, setup_line: str) -> None:
    print(f"\nSetup: {setup_line}")
    peer_columns = [harness.IMPL_COLUMN] + harness.measured_columns(
        harness.Column("x gemms", "vs_gemms", ".3f"), digits=0) + [
        harness.Column("min x gemms", "min_vs_gemms", ".3f"),
        harness.Column("x liger peak", "peak_vs_liger", ".2f"), harness.Column("steps", "steps"),
        harness.Column("rounds", "rounds")]
    peer_columns += _note_column(results["peers"])
    harness.print_table(results["peers"], peer_columns, markdown=args.markdown, title=_peers_title(args))
    if results["vocab"]:
        vocab_columns = [
            harness.Column("V", "v"), harness.IMPL_COLUMN,
            harness.Column("one fp32 logits MiB", "logits_mib", ".0f"),
            harness.Column("extra peak MiB", "extra_peak_mib", ".0f"),
            harness.Column("median ms", "median_ms", ".0f")] + _note_column(results["vocab"])
        harness.print_table(results["vocab"], vocab_columns, markdown=args.markdown,
                            title=f"extra peak memory against V, {args.dtype}, N={args.n} H={args.vocab_table_h}")


def _peers_title(args: argparse.Namespace) -> str:
    return (f"fused lm_head + forward KL, fwd+bwd, {args.dtype}, N={args.n} H={args.h} V={args.v} "
            f"T={args.temperature}, {args.threads or harness.available_cpus()} threads")


def main(argv=None) -> int:
    args, setup_info, setup_line = harness.start(parse_args, argv)
    results = run(args)
    report(results, args, setup_line)
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "setup": setup_info, **results})
    harness.plot_bars(args.png, results["peers"] + results["vocab"],
                      group=lambda row: f"H={row['h']} V={row['v']}",
                      title=_peers_title(args) + (f"; then V at H={args.vocab_table_h}" if results["vocab"] else ""),
                      setup=setup_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
