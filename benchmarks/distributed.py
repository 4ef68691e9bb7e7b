"""Vocab-parallel KD loss benchmark: fwd+bwd of forward KL over a vocabulary split on 2 CPU ranks.

    python -m benchmarks.distributed                 # N=4096, V=64000 (32000 per rank), T=2, fp32
    python -m benchmarks.distributed --n 64 --v 1000 --repeat 2 --warmup 1   # a smoke run

Each implementation runs in its own group of fresh rank processes (gloo, one thread per rank):
  kdkernels    kdkernels.distributed.vocab_parallel_kd_loss (2 collectives of O(N) per step)
  all-gather   all-gather both logits over the vocabulary, kd_loss on the full [N, V] on every
               rank, the local slice of its gradient back
  eager TP     a Megatron / ModelOpt-style eager loss: a MAX all-reduce and an autograd SUM
               all-reduce of the exponentials per distribution, an autograd all-reduce of the
               per-row KL; autograd runs the collectives' backward
Per implementation: the median step time (rank 0), the largest per-rank extra peak RSS (peak
during the timed steps minus the RSS once the shards exist, as benchmarks.harness measures it),
and the collectives and MiB each rank sends per step (counted by wrapping torch.distributed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, List

from benchmarks import harness

IMPLS = ("kdkernels", "all-gather", "eager TP")
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor")


# --- inside a rank -------------------------------------------------------------------------------

def _shards(n: int, v: int, rank: int, world: int):
    """This rank's [n, v / world] shards of the student (requires grad) and teacher logits."""
    import torch

    width = v // world
    gen = torch.Generator().manual_seed(1000 + rank)
    student = (torch.randn(n, width, generator=gen) * 3).requires_grad_(True)
    teacher = torch.randn(n, width, generator=gen) * 3
    return student, teacher


def _loss_kdkernels(temperature: float) -> Callable:
    from kdkernels.distributed import vocab_parallel_kd_loss

    return lambda student, teacher: vocab_parallel_kd_loss(student, teacher, temperature=temperature,
                                                           check_consistency=False)


def _loss_all_gather(temperature: float) -> Callable:
    import torch
    import torch.distributed as dist

    import kdkernels

    class GatherVocab(torch.autograd.Function):
        """[N, V_r] shards -> [N, V] on every rank; backward keeps this rank's columns (every rank
        computes the same full gradient, so no collective is needed there)."""

        @staticmethod
        def forward(ctx, shard):
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, shard.contiguous())
            ctx.columns = (dist.get_rank() * shard.shape[1], shard.shape[1])
            return torch.cat(parts, dim=1)

        @staticmethod
        def backward(ctx, grad):
            start, width = ctx.columns
            return grad[:, start:start + width]

    def loss(student, teacher):
        with torch.no_grad():
            full_teacher = GatherVocab.apply(teacher)
        return kdkernels.kd_loss(GatherVocab.apply(student), full_teacher, temperature=temperature)

    return loss


def _loss_eager_tp(temperature: float) -> Callable:
    import torch
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce as autograd_all_reduce

    # the autograd collectives an eager TP loss of this style uses; their deprecation is not news here
    warnings.filterwarnings("ignore", message=".*nn.functional.all_reduce is deprecated")

    def log_softmax(logits, differentiable: bool):
        shifted = logits / temperature
        row_max = shifted.detach().amax(dim=-1, keepdim=True)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = shifted - row_max
        sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
        sum_exp = autograd_all_reduce(sum_exp) if differentiable else _reduced(sum_exp)
        return shifted - sum_exp.log()

    def _reduced(tensor):
        dist.all_reduce(tensor)
        return tensor

    def loss(student, teacher):
        with torch.no_grad():
            log_p = log_softmax(teacher, differentiable=False)
        log_q = log_softmax(student, differentiable=True)
        per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        per_row = autograd_all_reduce(per_row)
        return per_row.mean() * temperature * temperature

    return loss


LOSSES = {"kdkernels": _loss_kdkernels, "all-gather": _loss_all_gather, "eager TP": _loss_eager_tp}


def setup(impl: str, n: int, v: int, temperature: float) -> Callable[[], None]:
    """The benchmarks.harness setup of one rank: its shards and a fwd+bwd step."""
    import torch.distributed as dist

    student, teacher = _shards(n, v, dist.get_rank(), dist.get_world_size())
    return harness.fwd_bwd_step(LOSSES[impl](temperature), student, teacher)


# the collectives whose second argument is what this rank sends (the first is the output)
_SENDS_SECOND = ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor")


class _CollectiveCounter:
    """Counts the torch.distributed calls of the steps and the bytes this rank sends with them."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.bytes = dist, 0, 0
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def _counted(self, name: str, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls += 1
            sent = args[1] if name in _SENDS_SECOND else args[0]
            self.bytes += sent.numel() * sent.element_size()
            return original(*args, **kwargs)

        return counted

    def __enter__(self):
        for name, original in self.saved.items():
            setattr(self.dist, name, self._counted(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(self.dist, name, original)


def _rank_main(rank: int, world: int, port: int, request: Dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    try:
        with _CollectiveCounter() as counter:
            result = harness.measure_steps(request)
        steps = request["warmup"] + len(result["times_ms"])
        result.update(collectives=counter.calls / steps, sent_mib=counter.bytes / steps / harness.MIB)
    except Exception as exc:  # reported in the table as n/a
        result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def run_impl(impl: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One implementation on `args.ranks` fresh rank processes; the row of the table."""
    import torch.multiprocessing as mp

    request = {"setup": "benchmarks.distributed:setup", "repeat": args.repeat, "warmup": args.warmup,
               "threads": args.threads, "time_budget_s": args.time_budget,
               "kwargs": {"impl": impl, "n": args.n, "v": args.v, "temperature": args.temperature}}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    harness.progress(f"  running {impl} on {args.ranks} ranks ...")
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_rank_main, args=(args.ranks, port, request, out_dir), nprocs=args.ranks,
                               start_method="spawn")
        except Exception as exc:  # a rank crashed (e.g. out of memory)
            return {"impl": impl, "error": " ".join(str(exc).split())[-200:]}
        ranks: List[Dict[str, Any]] = []
        for rank in range(args.ranks):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as handle:
                ranks.append(json.load(handle))
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"impl": impl, "error": errors[0]}
    row = {"impl": impl, "median_ms": ranks[0]["median_ms"],
           "extra_peak_mib": max(r["extra_peak_mib"] for r in ranks),
           "collectives": ranks[0]["collectives"], "sent_mib": ranks[0]["sent_mib"]}
    harness.progress(f"  {impl}: {row['median_ms']:.1f} ms median, extra peak {row['extra_peak_mib']:.0f} MiB, "
                     f"{row['collectives']:g} collectives")
    return row


def main(argv=None) -> None:
    parser = harness.benchmark_parser("distributed", __doc__, v=64000, v_help="the whole vocabulary")
    harness.add_run_args(parser, repeat=5, time_budget_s=120, warmup=1, n=4096, quick_n=1024)
    parser.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    harness.add_list_arg(parser, "--impls", IMPLS, help=f"comma-separated subset of {IMPLS}")
    args = harness.parse_run_args(parser, argv)
    if args.v % args.ranks:
        parser.error(f"--v ({args.v}) must be a multiple of --ranks ({args.ranks})")

    harness.progress(f"vocab-parallel forward KL, fwd+bwd, N={args.n}, V={args.v} over {args.ranks} ranks, "
                     f"T={args.temperature:g}, fp32")
    rows = [run_impl(impl, args) for impl in args.impls]
    baseline = next((r for r in rows if r["impl"] == "all-gather" and "error" not in r), None)
    for row in rows:
        if baseline is not None and "error" not in row:
            row["x_time"] = row["median_ms"] / baseline["median_ms"]
            row["x_memory"] = row["extra_peak_mib"] / max(baseline["extra_peak_mib"], 1e-9)
        if "error" in row:
            harness.progress(f"  {row['impl']}: n/a ({row['error']})")
    columns = [harness.IMPL_COLUMN, harness.Column("median ms", "median_ms", ".1f"),
               harness.Column("x all-gather time", "x_time", ".2f"),
               harness.Column("extra peak MiB / rank", "extra_peak_mib", ".0f"),
               harness.Column("x all-gather memory", "x_memory", ".2f"),
               harness.Column("collectives / step", "collectives", "g"),
               harness.Column("MiB sent / rank / step", "sent_mib", ".2f")]
    harness.print_table(rows, columns, markdown=args.markdown,
                        title=f"N={args.n}, V={args.v} ({args.v // args.ranks} per rank), fwd+bwd")
    if args.json:
        harness.write_json(args.json, {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main(sys.argv[1:])
