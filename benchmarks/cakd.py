"""Benchmark of the decomposed-KL losses (CAKD, DKD), forward + backward, beside the fused forward KL.

    python -m benchmarks.cakd                    # N=4096, V=32000, T=2, teacher top-5; a few minutes
    python -m benchmarks.cakd --quick            # N=1024, fewer repeats
    python -m benchmarks.cakd --peer-n 4096      # eager / torch.compile at full size too (~6 GB)

    python -m benchmarks.cakd --dtype bf16       # bf16 logits (the gradient comes back in bf16)

Rows, each configuration in its own process (benchmarks.harness), fp32 logits unless --dtype:
  kdkernels forward KL   kdkernels.kd_loss, the fused forward KL: the yardstick ("x fused KL")
  kdkernels CAKD         kdkernels.cakd_loss(groups="teacher_topk", k), and the teacher_mass rule
  kdkernels DKD          kdkernels.dkd_loss (S = the label; alpha=1, beta=8)
  eager / compile        the masked-softmax formulation users write (below), eagerly and under
                         torch.compile (compilation in the untimed warmup)
The eager and compiled peers allocate a dozen [N, V] temporaries: by default they run at
--peer-n rows (512) and their time and memory are scaled to N linearly (the rows say so).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List

from benchmarks import harness

LOGIT_STD = 3.0
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}
MASK_OFFSET = 1000.0  # logits - MASK_OFFSET * mask: the usual way to renormalise over a subset


def eager_group_kl(student_logits, teacher_logits, in_group, temperature):
    """KL(p̂ || q̂) per row over the classes in `in_group`, by masked softmaxes."""
    import torch.nn.functional as F

    out = (~in_group) * MASK_OFFSET
    log_p = F.log_softmax(teacher_logits / temperature - out, dim=-1)
    log_q = F.log_softmax(student_logits / temperature - out, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def eager_decomposed_kl(student_logits, teacher_logits, in_s, temperature, weights):
    """T^2 (w_b BCD + w_s SCD + w_w WCD) averaged over rows, written as users do: softmaxes,
    masked sums and log of probabilities."""
    import torch

    T = temperature
    p = torch.softmax(teacher_logits / T, dim=-1)
    q = torch.softmax(student_logits / T, dim=-1)
    p_s, q_s = (p * in_s).sum(-1), (q * in_s).sum(-1)
    b_p = torch.stack([p_s, 1 - p_s], -1)
    b_q = torch.stack([q_s, 1 - q_s], -1)
    bcd = (b_p * (b_p.log() - b_q.log())).sum(-1)
    scd = eager_group_kl(student_logits, teacher_logits, in_s, T)
    wcd = eager_group_kl(student_logits, teacher_logits, ~in_s, T)
    w_b, w_s, w_w = weights
    return (T * T * (w_b * bcd + w_s * scd + w_w * wcd)).mean()


def eager_cakd_topk(student_logits, teacher_logits, k, temperature):
    import torch

    top = teacher_logits.topk(k, dim=-1).indices
    in_s = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter(-1, top, True)
    return eager_decomposed_kl(student_logits, teacher_logits, in_s, temperature, (1.0, 1.0, 1.0))


def eager_dkd(student_logits, teacher_logits, labels, temperature, alpha=1.0, beta=8.0):
    import torch.nn.functional as F

    in_s = F.one_hot(labels, student_logits.shape[-1]).bool()
    return eager_decomposed_kl(student_logits, teacher_logits, in_s, temperature, (alpha, 0.0, beta))


def loss_function(impl: str, loss: str, k: int, mass: float, temperature: float) -> Callable[..., Any]:
    """loss_fn(student, teacher, labels) of one row of the table."""
    if impl == "kdkernels":
        import kdkernels

        if loss == "forward_kl":
            return lambda s, t, y: kdkernels.kd_loss(s, t, temperature=temperature, backend="cpu")
        if loss == "cakd_topk":
            return lambda s, t, y: kdkernels.cakd_loss(s, t, groups="teacher_topk", k=k,
                                                       temperature=temperature, backend="cpu")
        if loss == "cakd_mass":
            return lambda s, t, y: kdkernels.cakd_loss(s, t, groups="teacher_mass", mass=mass,
                                                       temperature=temperature, backend="cpu")
        return lambda s, t, y: kdkernels.dkd_loss(s, t, y, temperature=temperature, backend="cpu")
    import torch

    if loss == "cakd_topk":
        def eager(s, t, y):
            return eager_cakd_topk(s, t, k, temperature)
    else:
        def eager(s, t, y):
            return eager_dkd(s, t, y, temperature)
    return torch.compile(eager, dynamic=False) if impl == "compile" else eager


def setup(impl: str, loss: str, n: int, v: int, k: int, mass: float, temperature: float,
          dtype: str = "fp32") -> Callable[[], None]:
    """Child-process setup for harness.measure: inputs and one forward + backward step."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype][0])
    student = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype).requires_grad_(True)
    teacher = (torch.randn(n, v) * LOGIT_STD).to(torch_dtype)
    labels = torch.randint(0, v, (n,))
    return harness.fwd_bwd_step(loss_function(impl, loss, k, mass, temperature), student, teacher, labels)


def _configurations(args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = [("kdkernels", "forward_kl"), ("kdkernels", "cakd_topk"), ("kdkernels", "cakd_mass"),
            ("kdkernels", "dkd")]
    if not args.no_peers:
        rows += [("eager", "cakd_topk"), ("compile", "cakd_topk"), ("eager", "dkd"), ("compile", "dkd")]
    return [{"impl": impl, "loss": loss, "rows_run": args.n if impl == "kdkernels" else min(args.peer_n, args.n)}
            for impl, loss in rows]


def _label(config: Dict[str, Any], args: argparse.Namespace) -> str:
    return {"forward_kl": "forward KL", "cakd_topk": f"CAKD top-{args.k}", "cakd_mass": f"CAKD mass {args.mass}",
            "dkd": "DKD"}[config["loss"]]


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.benchmark_parser("cakd", __doc__)
    parser.add_argument("--k", type=int, default=5, help="teacher top-k of the CAKD rows (default 5)")
    parser.add_argument("--mass", type=float, default=0.5, help="teacher mass of the teacher_mass row (default 0.5)")
    parser.add_argument("--peer-n", type=int, default=512,
                        help="rows the eager / torch.compile peers run at, scaled to --n (default 512)")
    parser.add_argument("--no-peers", action="store_true", help="kdkernels rows only")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the logits (default fp32)")
    harness.add_run_args(parser, repeat=7, time_budget_s=20.0, warmup=None, png="cakd")
    return harness.parse_run_args(parser, argv)


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    configs = _configurations(args)
    harness.progress(f"cakd benchmark: {args.dtype}, N={args.n} V={args.v} T={args.temperature} k={args.k}, "
                     f"{len(configs)} configurations, {harness.available_cpus()} threads")
    rows = []
    for index, config in enumerate(configs, 1):
        impl, n_run = config["impl"], config["rows_run"]
        result = harness.measure(
            "benchmarks.cakd:setup",
            {"impl": impl, "loss": config["loss"], "n": n_run, "v": args.v, "k": args.k, "mass": args.mass,
             "temperature": args.temperature, "dtype": args.dtype},
            repeat=args.repeat if impl == "kdkernels" else min(args.repeat, 3),
            warmup=harness.warmup_for(impl, args), time_budget_s=args.time_budget,
            label=f"[{index}/{len(configs)}] {impl} {_label(config, args)} N={n_run}")
        scale = args.n / n_run  # linear in rows: the peers run at --peer-n
        row = harness.measured_row({"impl": impl, "loss": _label(config, args), "n_run": n_run}, result,
                                   scale=scale, grad_bytes=args.n * args.v * DTYPES[args.dtype][1])
        if "error" not in row:
            row["scaled"] = "" if scale == 1 else f"x{scale:g}"
        rows.append(row)
    harness.add_ratios(rows, "vs_fkl", baseline=lambda row: row["loss"] == "forward KL", group_by=())
    return rows


COLUMNS = [harness.IMPL_COLUMN, harness.Column("loss", "loss"), harness.Column("rows run", "n_run"),
           harness.Column("scaled", "scaled")] + harness.measured_columns(
               harness.Column("x fused KL", "vs_fkl", ".2f")) + [harness.PEAK_PER_GRAD_COLUMN]


def main(argv=None) -> int:
    args, setup_info, setup_line = harness.start(parse_args, argv)
    rows = run(args)
    shape = f"{args.dtype}, N={args.n}, V={args.v}, T={args.temperature}, fwd+bwd, {harness.available_cpus()} threads"
    print(f"\nSetup: {setup_line}")
    harness.print_table(rows, COLUMNS, markdown=args.markdown, title=f"CAKD / DKD, {shape}")
    print("\n'scaled': the row ran at 'rows run' rows; its time and memory are multiplied to N. "
          "'x fused KL': median over kdkernels.kd_loss (forward KL) in this run.")
    harness.print_failures(rows, "impl", "loss")
    harness.plot_bars(args.png, rows, group=lambda row: row["loss"],
                      title=f"CAKD / DKD beside the fused forward KL ({shape}; 'scaled' rows from --peer-n rows)",
                      setup=setup_line)
    if args.json:
        meta = {"dtype": args.dtype, "n": args.n, "v": args.v, "temperature": args.temperature, "k": args.k,
                "mass": args.mass,
                "peer_n": args.peer_n, "repeat": args.repeat, "threads": harness.available_cpus(),
                "setup": setup_info}
        harness.write_json(args.json, {"title": "cakd", "meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
