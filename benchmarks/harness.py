"""Shared benchmark harness: each configuration in its own process, timed and memory-measured.

API (everything a benchmark needs):

    measure(setup, kwargs=None, *, repeat=5, warmup=2, label="", threads=None, env=None,
            time_budget_s=None, time_limit_s=1800) -> dict
        Runs one configuration in a fresh Python subprocess. ``setup`` is an importable
        ``"package.module:function"`` string; the child calls ``function(**kwargs)`` (kwargs must
        be JSON-serialisable), which builds the inputs and returns a zero-argument ``step``
        callable doing one full iteration (e.g. forward + backward, see ``fwd_bwd_step``). The
        child then runs ``warmup`` untimed steps (torch.compile compiles in them, so compile time is
        never timed) and ``repeat`` timed steps with ``torch.set_num_threads(threads)`` (default:
        every CPU this process may use).
        Returns {"median_ms", "min_ms", "times_ms", "extra_peak_mib", "warmup_extra_peak_mib",
        "retained_mib", "rss_inputs_mib", "threads", "wall_s"}, or {"error": "reason"} when the
        setup or a step raised (the caller prints "n/a" with the reason).
        Memory, all from /proc/self/status:
          rss_inputs_mib        VmRSS once setup() returned (inputs exist, imports done);
          extra_peak_mib        peak RSS over the timed steps minus rss_inputs_mib; the
                                high-water mark (VmHWM) is reset after the warmup by writing "5"
                                to /proc/self/clear_refs, so neither the input build nor a
                                compilation counts;
          warmup_extra_peak_mib the same over the warmup steps (includes compilation);
          retained_mib          VmRSS before the timed steps minus rss_inputs_mib (memory the
                                warmup left behind: compiled code, caches), part of extra_peak.

    run_in_child(runner, request, *, env=None, time_limit_s=1800) -> dict
        The process plumbing under measure(), for benchmarks that measure differently (e.g. on a
        GPU): the child calls the "module:function" ``runner`` with the JSON ``request`` and
        sends back its dict; an exception, a crash or a timeout comes back as {"error": reason}.

    fwd_bwd_step(loss_fn, student, *others) -> step
        ``loss_fn(student, *others).backward()``, then drops ``student.grad`` so that no
        gradient survives between steps (each step allocates its own, as training would after
        ``zero_grad(set_to_none=True)``).

    copy_time_ms(nbytes, *, repeat=10, threads=None, label="") -> float
        Median time of ``dst.copy_(src)`` between preallocated tensors of ``nbytes`` each: the
        yardstick of a memory-bound step. copy_gbs(nbytes, copy_ms) turns it into read + write
        bytes per second, the yardstick for "% of copy".

    bandwidth(bytes_moved, median_ms, copy_gbs) -> {"gbs", "pct_copy"}
        GB/s of a step that moves bytes_moved, and its percentage of the measured copy.
    add_ratios(rows, key, *, baseline, group_by)
        row[key] = row median / the fastest median among the rows of its group that satisfy
        ``baseline(row)`` (e.g. "x compile", "x best peer").

    result_fields(result, scale=1.0) -> dict
        A table row's fields from a measure() result (median_ms, min_ms, extra_peak_mib,
        retained_mib, steps; times and memory multiplied by ``scale``), or {"error": reason}.
    measured_row(config, result, *, scale=1.0, grad_bytes=None) -> dict
        ``config`` plus result_fields(), and peak_per_grad (extra peak over the bytes of the
        student's gradient) when ``grad_bytes`` is given.
    print_failures(rows, *keys)
        An "n/a: <keys>: <reason>" line per row that has no measurement.

    Column(header, key, fmt="")
    IMPL_COLUMN, PEAK_PER_GRAD_COLUMN, measured_columns(*ratios, digits=1)
        The columns the benchmarks share: impl; median ms, min ms, [ratios], extra peak MiB.
    format_table(rows, columns, *, markdown=False) -> str / print_table(...)
        Aligned plain-text (or markdown) table of dict rows; a missing or None cell prints "n/a".

    setup_info() -> dict / describe_setup(info) -> str / announce_setup() -> (info, line)
        The hardware and software of the run (CPU model, CPUs used and present, torch, kdkernels
        and its CPU build, Python, OS): every benchmark prints it above its tables.
    start(parse_args, argv) -> (args, info, line)
        A benchmark's flags parsed, then announce_setup().
    add_png_arg(parser, name) / plot_bars(path, rows, *, group, title, setup, floor_key=None)
        ``--png PATH`` (default results/<name>.png) and the PNG it names: per configuration, a
        bar per implementation for the median time and one for the extra peak memory.

    benchmark_parser(name, doc, *, v=32000, v_help="vocabulary size", temperature=2.0)
        The parser of ``python -m benchmarks.<name>``, described by the first paragraph of ``doc``,
        with --v and --temperature (each left out when its default is None).
    comma_list(allowed)
        The argparse ``type`` of a flag that takes a comma-separated list of items of ``allowed``.
    add_list_arg(parser, flag, allowed, *, default=None, help)
        Such a flag, by default every item of ``allowed`` (or the items of ``default``).
    add_run_args(parser, *, repeat, time_budget_s, warmup=1, warmup_help=None, n=4096, quick_n=1024,
                 quick_repeat=3, png=None)
        The flags every benchmark shares: --n, --repeat, --warmup, --time-budget, --quick, --json,
        --markdown, and --png for one that draws a plot (add_png_arg(parser, png)); then ``args = parse_run_args(parser, argv)`` fills --n and --repeat from
        --quick when they were not given. ``warmup=None``: warmup_for(impl, args) is 2 steps
        for torch.compile (which compiles in them) and 1 for the rest, unless --warmup is given.
    add_output_args(parser)   adds ``--json PATH`` and ``--markdown`` (part of add_run_args)
    write_json(path, payload) writes the results (rows + run metadata) for --json

    progress(message)
        One line on stderr, flushed: the benchmarks print one per configuration.

The child process is ``python -m benchmarks.harness --child`` with {"runner", "request"} as JSON on
stdin; it prints its result as one JSON line after RESULT_MARKER.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARKER = "@@BENCH_RESULT "
MIB = 1024 * 1024


def available_cpus() -> int:
    return len(os.sched_getaffinity(0))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Parent side


def measure(setup: str, kwargs: Optional[Dict[str, Any]] = None, *, repeat: int = 5, warmup: int = 2,
            label: str = "", threads: Optional[int] = None, env: Optional[Dict[str, str]] = None,
            time_budget_s: Optional[float] = None, time_limit_s: float = 1800) -> Dict[str, Any]:
    """One configuration in a fresh subprocess; see the module docstring for the result keys.

    time_budget_s: stop the timed steps early once they have taken this long (at least 3 steps
    still run), so a slow peer does not dominate the run."""
    request = {"setup": setup, "kwargs": kwargs or {}, "repeat": int(repeat), "warmup": int(warmup),
               "threads": int(threads or available_cpus()), "time_budget_s": time_budget_s}
    if label:
        progress(f"  running {label} ...")
    result = run_in_child("benchmarks.harness:measure_steps", request, env=env, time_limit_s=time_limit_s)
    if label:
        progress(f"  {label}: {_summary(result)}")
    return result


def run_in_child(runner: str, request: Dict[str, Any], *, env: Optional[Dict[str, str]] = None,
                 time_limit_s: float = 1800) -> Dict[str, Any]:
    """``runner(request)`` in a fresh ``python -m benchmarks.harness --child``; returns its dict
    (JSON-serialisable) plus "wall_s", or {"error": reason, "wall_s"} when it raised, crashed or
    timed out. The child dies with this process."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, child_env.get("PYTHONPATH")) if p)
    child_env.update(env or {})
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", "--child"],
                              input=json.dumps({"runner": runner, "request": request}), capture_output=True,
                              text=True, cwd=REPO_ROOT, env=child_env, timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        result: Dict[str, Any] = {"error": f"timed out after {time_limit_s:.0f} s"}
    else:
        result = _parse_child_output(proc)
    result["wall_s"] = time.perf_counter() - started
    return result


def _parse_child_output(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"child exited with {proc.returncode}: " + " | ".join(tail)}


def _summary(result: Dict[str, Any]) -> str:
    if "error" in result:
        return f"n/a ({result['error']})"
    return (f"{result['median_ms']:.1f} ms median, extra peak {result['extra_peak_mib']:.0f} MiB "
            f"({result['wall_s']:.0f} s)")


def copy_time_ms(nbytes: int, *, repeat: int = 10, threads: Optional[int] = None, label: str = "") -> float:
    """Median time of ``dst.copy_(src)`` between preallocated tensors of ``nbytes`` each."""
    result = measure("benchmarks.harness:copy_setup", {"nbytes": int(nbytes)}, repeat=repeat, warmup=2,
                     threads=threads, label=label or f"memory copy of {nbytes / MIB:.0f} MiB")
    if "error" in result:
        raise RuntimeError(f"copy time measurement failed: {result['error']}")
    return result["median_ms"]


def copy_gbs(nbytes: int, copy_ms: float) -> float:
    """Read + write bytes per second of a copy of ``nbytes`` that took ``copy_ms``."""
    return 2 * nbytes / (copy_ms * 1e-3) / 1e9


def copy_setup(nbytes: int) -> Callable[[], None]:
    import torch

    source = torch.ones(nbytes // 4, dtype=torch.float32)
    destination = torch.zeros_like(source)  # zeros_like writes every page: no first-touch faults later
    return lambda: destination.copy_(source)


def bandwidth(bytes_moved: float, median_ms: float, copy_gbs: Optional[float]) -> Dict[str, Optional[float]]:
    gbs = bytes_moved / (median_ms * 1e-3) / 1e9
    return {"gbs": gbs, "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None}


def add_ratios(rows: Sequence[Dict[str, Any]], key: str, *, baseline: Callable[[Dict[str, Any]], bool],
               group_by: Sequence[str]) -> None:
    def group(row: Dict[str, Any]) -> tuple:
        return tuple(row.get(name) for name in group_by)

    fastest: Dict[tuple, float] = {}
    for row in rows:
        if baseline(row) and row.get("median_ms") is not None:
            fastest[group(row)] = min(fastest.get(group(row), float("inf")), row["median_ms"])
    for row in rows:
        reference_ms = fastest.get(group(row))
        if row.get("median_ms") is not None and reference_ms:
            row[key] = row["median_ms"] / reference_ms


def fwd_bwd_step(loss_fn: Callable[..., Any], student: Any, *others: Any) -> Callable[[], None]:
    def step() -> None:
        loss_fn(student, *others).backward()
        student.grad = None

    return step


# ----------------------------------------------------------------------------------------------
# Tables and output


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    fmt: str = ""  # format spec for numbers, e.g. ".1f"


IMPL_COLUMN = Column("impl", "impl")
PEAK_PER_GRAD_COLUMN = Column("peak / grad", "peak_per_grad", ".2f")


def measured_columns(*ratios: Column, digits: int = 1) -> List[Column]:
    """The columns of result_fields() that every benchmark table shows: median and fastest step
    in ms (``digits`` decimals), the ratio columns (e.g. "x compile"), extra peak MiB."""
    columns = [Column("median ms", "median_ms", f".{digits}f"), Column("min ms", "min_ms", f".{digits}f")]
    return columns + list(ratios) + [Column("extra peak MiB", "extra_peak_mib", ".0f")]


def result_fields(result: Dict[str, Any], scale: float = 1.0) -> Dict[str, Any]:
    """A row's fields from a measure() result: times and extra peak memory (multiplied by
    ``scale`` when the configuration ran at a fraction of the size it stands for), the memory
    the warmup left behind and the timed steps; or {"error": reason}."""
    if "error" in result:
        return {"error": result["error"]}
    return {"median_ms": result["median_ms"] * scale, "min_ms": result["min_ms"] * scale,
            "extra_peak_mib": result["extra_peak_mib"] * scale, "retained_mib": result["retained_mib"],
            "steps": len(result["times_ms"])}


def measured_row(config: Dict[str, Any], result: Dict[str, Any], *, scale: float = 1.0,
                 grad_bytes: Optional[int] = None) -> Dict[str, Any]:
    """A table row: ``config`` plus result_fields(result, scale), and for a measured row with
    ``grad_bytes`` the extra peak memory per byte of the student's gradient (peak_per_grad)."""
    row = dict(config, **result_fields(result, scale))
    if grad_bytes and "error" not in row:
        row["peak_per_grad"] = row["extra_peak_mib"] * MIB / grad_bytes
    return row


def print_failures(rows: Sequence[Dict[str, Any]], *keys: str) -> None:
    """An "n/a" line per row without a measurement: the row's ``keys`` and the reason."""
    for row in rows:
        if "error" in row:
            print(f"n/a: {' '.join(str(row[key]) for key in keys)}: {row['error']}")


def _cell(row: Dict[str, Any], column: Column) -> str:
    value = row.get(column.key)
    if value is None:
        return "n/a"
    if isinstance(value, float) and column.fmt:
        return format(value, column.fmt)
    return str(value)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column], *, markdown: bool = False) -> str:
    cells = [[_cell(row, column) for column in columns] for row in rows]
    headers = [column.header for column in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number_text(r[i]) for r in cells) and bool(cells) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                              for w, num in zip(widths, numeric)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _is_number_text(text: str) -> bool:
    if text == "n/a":
        return True
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return False
    return True


def print_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column], *, markdown: bool = False,
                title: str = "") -> None:
    if title:
        print(f"\n{title}" if not markdown else f"\n### {title}\n")
    print(format_table(rows, columns, markdown=markdown), flush=True)


def benchmark_parser(name: str, doc: str, *, v: Optional[int] = 32000, v_help: str = "vocabulary size",
                     temperature: Optional[float] = 2.0) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>``, described by the first paragraph of ``doc``,
    with the flags of the logits most benchmarks share: --v (the vocabulary) and --temperature,
    each left out when its default is None."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    if v is not None:
        parser.add_argument("--v", type=int, default=v, help=f"{v_help} (default {v})")
    if temperature is not None:
        parser.add_argument("--temperature", type=float, default=temperature)
    return parser


def comma_list(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse ``type``: a comma-separated list of items of ``allowed``, in the order given
    ("none" for none)."""
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip() not in ("", "none")]
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return items

    return parse


def add_list_arg(parser: argparse.ArgumentParser, flag: str, allowed: Sequence[str], *,
                 default: Optional[Sequence[str]] = None, help: str) -> None:
    """``flag``: a comma-separated list of items of ``allowed`` (comma_list), by default all of them
    or the items of ``default``, in that order."""
    parser.add_argument(flag, type=comma_list(allowed), default=list(allowed if default is None else default),
                        help=help)


COMPILE_WARMUP_HELP = "untimed steps (default: 2 for torch.compile, which compiles in them, 1 otherwise)"


def warmup_for(impl: str, args: argparse.Namespace) -> int:
    """The untimed steps of ``impl``: --warmup when given, else 2 for torch.compile (which compiles
    in them) and 1 for the rest (see add_run_args' ``warmup=None``)."""
    if args.warmup is not None:
        return args.warmup
    return 2 if impl == "compile" else 1


def add_run_args(parser: argparse.ArgumentParser, *, repeat: int, time_budget_s: float,
                 warmup: Optional[int] = 1, warmup_help: Optional[str] = None, n: int = 4096,
                 quick_n: int = 1024, quick_repeat: int = 3, png: Optional[str] = None) -> None:
    parser.add_argument("--n", type=int, default=None, help=f"rows (tokens); default {n}, {quick_n} with --quick")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed steps (default {repeat}, {quick_repeat} with --quick)")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=warmup_help or (COMPILE_WARMUP_HELP if warmup is None else
                                             f"untimed steps before the timed ones (default {warmup})"))
    parser.add_argument("--time-budget", type=float, default=time_budget_s,
                        help=f"stop a configuration's timed steps after this many seconds, at least 3 "
                             f"steps still run (default {time_budget_s:g})")
    parser.add_argument("--quick", action="store_true",
                        help=f"N={quick_n} and {quick_repeat} timed steps, for a fast look")
    add_output_args(parser)
    if png is not None:
        add_png_arg(parser, png)
    parser.set_defaults(**{_RUN_DEFAULTS: (n, quick_n, repeat, quick_repeat)})


_RUN_DEFAULTS = "_run_defaults"


def parse_run_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    n, quick_n, repeat, quick_repeat = vars(args).pop(_RUN_DEFAULTS)
    if args.n is None:
        args.n = quick_n if args.quick else n
    if args.repeat is None:
        args.repeat = quick_repeat if args.quick else repeat
    return args


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")


def write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    progress(f"wrote {path}")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_info() -> Dict[str, Any]:
    """The hardware and software a benchmark ran on, for its tables and its --json."""
    import torch

    import kdkernels

    info = kdkernels.backend_info()
    return {"cpu": cpu_model(), "cpus_used": available_cpus(), "cpus_total": os.cpu_count(),
            "torch": torch.__version__, "kdkernels": kdkernels.__version__, "cpu_build": info.get("cpu_build"),
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


def describe_setup(info: Dict[str, Any]) -> str:
    """One line: CPU model and cores, torch, kdkernels and its CPU build, Python, OS."""
    return (f"{info['cpu']}, {info['cpus_used']} of {info['cpus_total']} CPUs, torch {info['torch']}, "
            f"kdkernels {info['kdkernels']} ({info['cpu_build'] or 'no'} CPU build), Python {info['python']}, "
            f"{info['os']}")


def announce_setup() -> Tuple[Dict[str, Any], str]:
    """setup_info() and its describe_setup() line, which goes to stderr now (the tables print it
    again above themselves)."""
    info = setup_info()
    line = describe_setup(info)
    progress(line)
    return info, line


def start(parse_args: Callable[[Any], argparse.Namespace], argv) -> Tuple[argparse.Namespace, Dict[str, Any], str]:
    """A benchmark's first steps: its flags parsed, then announce_setup(): -> (args, setup info,
    setup line)."""
    args = parse_args(argv)
    return (args, *announce_setup())


def add_png_arg(parser: argparse.ArgumentParser, name: str) -> None:
    default = os.path.join("results", f"{name}.png")
    parser.add_argument("--png", default=default, metavar="PATH",
                        help=f"the plot of time and extra peak memory (default {default}; 'none' for no plot)")


def plot_bars(path: Optional[str], rows: Sequence[Dict[str, Any]], *, group: Callable[[Dict[str, Any]], str],
              title: str, setup: str, floor_key: Optional[str] = None,
              floor_label: str = "floor") -> Optional[str]:
    """Writes a PNG of two bar charts, one bar per implementation (``row["impl"]``) in each
    configuration (``group(row)``): the median time of a step in ms (log scale when the bars
    span more than 20x) and the extra peak memory in MiB. ``floor_key``: a per-configuration
    time drawn as a black tick over the time bars (e.g. the memory floor). Rows without a
    measurement are left out. Returns the path, or None when there is nothing to plot, no
    ``path``, or no matplotlib."""
    measured = [row for row in rows if row.get("median_ms") is not None]
    if not path or path == "none" or not measured:
        return None
    from kdkernels.train.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        progress("no plot: matplotlib is not installed")
        return None
    groups = list(dict.fromkeys(group(row) for row in measured))
    impls = list(dict.fromkeys(row["impl"] for row in measured))
    width = 0.8 / len(impls)
    figure_width = max(8.0, 1.0 + 1.2 * len(groups))
    figure, (time_axes, memory_axes) = plt.subplots(2, 1, figsize=(figure_width, 8.5), sharex=True)
    for index, impl in enumerate(impls):
        offset = (index - (len(impls) - 1) / 2) * width
        cells = [(groups.index(group(row)) + offset, row) for row in measured if row["impl"] == impl]
        positions = [x for x, _ in cells]
        for axes, key, fmt in ((time_axes, "median_ms", "{:.3g}"), (memory_axes, "extra_peak_mib", "{:.0f}")):
            values = [max(row.get(key) or 0.0, 0.0) for _, row in cells]
            bars = axes.bar(positions, values, width, label=impl)
            axes.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, rotation=90, padding=2)
    if floor_key:
        floors = {group(row): row[floor_key] for row in measured if row.get(floor_key)}
        for name, floor_ms in floors.items():
            x = groups.index(name)
            time_axes.hlines(floor_ms, x - 0.45, x + 0.45, colors="black", linewidth=2,
                             label=floor_label if name == next(iter(floors)) else None)
    times = [row["median_ms"] for row in measured if row["median_ms"] > 0]
    if times and max(times) / min(times) > 20:
        time_axes.set_yscale("log")
    time_axes.margins(y=0.25)
    memory_axes.margins(y=0.25)
    time_axes.set_ylabel("median time per step (ms)")
    memory_axes.set_ylabel("extra peak memory (MiB)")
    time_axes.set_title("time, forward + backward (lower is better)", fontsize=10)
    memory_axes.set_title("extra peak memory over the inputs (lower is better)", fontsize=10)
    memory_axes.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    time_axes.legend(fontsize=8, ncols=min(len(impls) + 1, 5))
    for axes in (time_axes, memory_axes):
        axes.grid(axis="y", alpha=0.3)
    wrap = int(figure_width * 11)  # characters per line at this font size
    figure.suptitle("\n".join(textwrap.wrap(title, wrap) + textwrap.wrap(setup, wrap)), fontsize=9)
    progress(f"wrote {save_figure(figure, path, dpi=110)}")
    return path


# ----------------------------------------------------------------------------------------------
# Child side


def _rss_kib(field: str) -> int:
    from kdkernels.train.memory import status_kib

    value = status_kib(field)
    if value is None:
        raise RuntimeError(f"{field} missing from /proc/self/status: peak memory needs Linux")
    return value


def _reset_peak_rss() -> None:
    from kdkernels.train.memory import reset_peak_rss

    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): peak memory needs Linux")


def _import(qualified_name: str) -> Any:
    """The object named by "package.module:attribute"."""
    import importlib

    module_name, attribute = qualified_name.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def measure_steps(request: Dict[str, Any]) -> Dict[str, Any]:
    """The child side of measure()."""
    import gc

    import torch

    torch.set_num_threads(request["threads"])
    torch.manual_seed(0)
    step = _import(request["setup"])(**request["kwargs"])
    gc.collect()
    rss_inputs = _rss_kib("VmRSS")

    _reset_peak_rss()
    for _ in range(request["warmup"]):
        step()
    gc.collect()
    warmup_peak = _rss_kib("VmHWM")
    rss_before_timed = _rss_kib("VmRSS")

    _reset_peak_rss()
    times_ms: List[float] = []
    budget = request.get("time_budget_s")
    for _ in range(request["repeat"]):
        start = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
        if budget is not None and len(times_ms) >= 3 and sum(times_ms) > budget * 1e3:
            break
    timed_peak = _rss_kib("VmHWM")
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "times_ms": times_ms,
        "extra_peak_mib": (timed_peak - rss_inputs) / 1024,
        "warmup_extra_peak_mib": (warmup_peak - rss_inputs) / 1024,
        "retained_mib": (rss_before_timed - rss_inputs) / 1024,
        "rss_inputs_mib": rss_inputs / 1024,
        "threads": torch.get_num_threads(),
    }


def _exit_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): a killed benchmark leaves no child running.
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def _child_main() -> None:
    _exit_with_parent()
    message = json.loads(sys.stdin.read())
    try:
        result = _import(message["runner"])(message["request"])
    except Exception as exc:  # reported to the parent, which prints "n/a" with the reason
        message = " ".join(str(exc).split())
        result = {"error": f"{type(exc).__name__}: {message[:300]}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child_main()
    else:
        sys.exit("benchmarks.harness is a library; run e.g. python -m benchmarks.kd_loss")
