"""Two builds of kdkernels side by side: the kd_loss and fused lm_head rows of
``benchmarks.kd_loss`` and ``benchmarks.fused_linear`` (forward + backward, CPU), timed for each
build in turn, one process per measurement, alternating which build goes first each round.

    python -m benchmarks.compare_builds --before ../kdkernels-v1 --after .

Each path is a checkout with its extension built in place (``python setup.py build_ext
--inplace``); the rows call only the public API, so any two versions that share it compare. The
table gives each build's median over the rounds and the ratio after / before: a change is real
when it exceeds the spread the rounds show between themselves.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
LOGIT_STD = 3.0


def _rows(args) -> List[Dict[str, Any]]:
    rows = [{"loss": "kd_loss", "divergence": "forward_kl", "dtype": "bfloat16"}]
    rows += [{"loss": "kd_loss", "divergence": d, "dtype": "float32"} for d in DIVERGENCES]
    rows += [{"loss": "fused_linear", "divergence": "forward_kl", "dtype": dt} for dt in ("float32", "bfloat16")]
    for row in rows:
        row.update(n=args.n, v=args.v, h=args.h, temperature=args.temperature, repeat=args.repeat)
    return rows


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in the measuring process: builds the inputs, one untimed step, then the timed ones."""
    import torch

    import kdkernels

    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    n, v, h, temperature = spec["n"], spec["v"], spec["h"], spec["temperature"]
    if spec["loss"] == "kd_loss":
        student = (torch.randn(n, v) * LOGIT_STD).to(dtype).requires_grad_(True)
        teacher = (torch.randn(n, v) * LOGIT_STD).to(dtype)
        leaves = [student]

        def step():
            kdkernels.kd_loss(student, teacher, temperature=temperature, divergence=spec["divergence"]).backward()
    else:
        scale = LOGIT_STD / h ** 0.5
        hidden = torch.randn(n, h).to(dtype).requires_grad_(True)
        weight = (torch.randn(v, h) * scale).to(dtype).requires_grad_(True)
        teacher_hidden = torch.randn(n, h).to(dtype)
        teacher_weight = (torch.randn(v, h) * scale).to(dtype)
        leaves = [hidden, weight]

        def step():
            kdkernels.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, temperature=temperature,
                                           reduction="batchmean").backward()
    times = []
    for i in range(spec["repeat"] + 1):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        if i:  # the first step is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "kdkernels": kdkernels.__file__}


def _measure(path: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # run as a script from the checkout: `python -m` would put this checkout first on sys.path
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         env=env, cwd=os.path.abspath(path), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {spec} with {path} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = os.path.join(os.path.abspath(path), "kdkernels")
    if not os.path.abspath(result["kdkernels"]).startswith(expected):
        raise RuntimeError(f"{path}: the child imported kdkernels from {result['kdkernels']}, not from {expected}")
    return result


def run(args) -> List[Dict[str, Any]]:
    from benchmarks import harness

    rows = _rows(args)
    samples = {(i, side): [] for i in range(len(rows)) for side in ("before", "after")}
    total = len(rows) * 2 * args.rounds
    done = 0
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for i, spec in enumerate(rows):
            for side in order:
                done += 1
                label = f"{spec['loss']} {spec['divergence']} {spec['dtype']}"
                harness.progress(f"  [{done}/{total}] round {r + 1} {label} {side} ...")
                samples[(i, side)].append(_measure(getattr(args, side), spec)["median_ms"])
    results = []
    for i, spec in enumerate(rows):
        before, after = statistics.median(samples[(i, "before")]), statistics.median(samples[(i, "after")])
        results.append({**spec, "before_ms": before, "after_ms": after, "ratio": after / before,
                        "before_rounds": samples[(i, "before")], "after_rounds": samples[(i, "after")]})
    return results


def _columns():
    from benchmarks import harness

    return [harness.Column("loss", "loss"), harness.Column("divergence", "divergence"), harness.Column("dtype", "dtype"),
                   harness.Column("before ms", "before_ms", ".1f"), harness.Column("after ms", "after_ms", ".1f"),
                   harness.Column("after / before", "ratio", ".2f"), harness.Column("rounds before", "rounds_before"),
                   harness.Column("rounds after", "rounds_after")]


def _with_round_text(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{**r, "rounds_before": " ".join(f"{t:.0f}" for t in r["before_rounds"]),
             "rounds_after": " ".join(f"{t:.0f}" for t in r["after_rounds"])} for r in results]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:  # a measuring process: it imports nothing of benchmarks
        print(json.dumps(_child(json.loads(argv[1]))))
        return
    from benchmarks import harness

    parser = harness.benchmark_parser("compare_builds", __doc__, v_help="vocabulary")
    parser.add_argument("--before", required=True, help="checkout of the first build (extension built in place)")
    parser.add_argument("--after", default=".", help="checkout of the second build (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per build and row (default 3)")
    parser.add_argument("--n", type=int, default=4096, help="rows (tokens), default 4096")
    parser.add_argument("--h", type=int, default=1024, help="hidden size of the fused lm_head rows, default 1024")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per measurement (default 5)")
    harness.add_output_args(parser)
    args = parser.parse_args(argv)
    _, setup = harness.announce_setup()
    results = run(args)
    print(f"\nSetup: {setup}\nBefore: {os.path.abspath(args.before)}\nAfter:  {os.path.abspath(args.after)}\n"
          f"fwd+bwd, N={args.n}, V={args.v}, H={args.h} (fused lm_head rows), T={args.temperature}; "
          f"each figure the median of {args.repeat} steps in one process, then over {args.rounds} rounds")
    print(harness.format_table(_with_round_text(results), _columns(), markdown=args.markdown))
    if args.json:
        harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
