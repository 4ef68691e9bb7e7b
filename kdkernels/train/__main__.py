"""``python -m kdkernels.train`` / ``kdkernels-train``: distil a teacher into a student and compare
with the same student trained on hard labels alone.

With no flags it trains (or loads from the cache) a small byte-level transformer teacher on
CPython's help texts, then trains a smaller student twice from the same initialisation and data
order: ``baseline`` (cross-entropy only) and ``kd`` (``(1 - λ) CE + λ T^2 KL`` through kdkernels).
Flags add runs: sweeps, divergences, DKD/CAKD, feature alignment, other student sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch

import kdkernels
from kdkernels.train import data, experiments, loop, models, parallel, report, sparse_runs, study

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_OUT = os.path.join("runs", "train")
SMOKE_TEST_NOTE = ("--quick: a smoke test of the pipeline (tiny models, few steps). Its numbers say nothing "
                   "about distillation; run without --quick for a comparison.")


def _float_list(text: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("KDKERNELS_CACHE", os.path.join(root, "kdkernels"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdkernels-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("what and where")
    where.add_argument("--quick", action="store_true",
                       help="smoke test: tiny models and few steps, for tests and CI; its numbers mean nothing")
    where.add_argument("--out", default=DEFAULT_OUT,
                       help="folder for results.json and curves.png (%(default)s)")
    where.add_argument("--study", nargs="?", const="full", choices=tuple(study.PROTOCOLS), metavar="quick",
                       help="run the distillation study instead (a fixed protocol over several seeds: T x capacity, "
                            "λ, feature alignment, methods): report.md, results.json and figures in --out; "
                            "`--study quick` is a smaller version")
    where.add_argument("--jobs", type=int, default=1,
                       help="--study: train runs in this many processes, one thread each (%(default)s)")
    where.add_argument("--data", metavar="FILE", help="a UTF-8 text file instead of CPython's help texts")
    where.add_argument("--cache-dir", default=default_cache_dir(),
                       help="where trained teachers are kept (%(default)s; env KDKERNELS_CACHE)")
    where.add_argument("--no-cache", action="store_true", help="train the teacher even if it is cached, keep nothing")
    where.add_argument("--teacher", metavar="PATH", help="local Hugging Face causal-LM checkpoint as the teacher")
    where.add_argument("--student", metavar="PATH", help="local Hugging Face causal-LM checkpoint as the student")
    parallel.add_argument(where)
    where.add_argument("--teacher-cache", metavar="DIR", help="add a run distilled from this teacher cache (built "
                       "there first with --sparse-teacher; see kdkernels.teacher_cache)")
    where.add_argument("--student-sizes", type=_name_list, default=[], metavar="LxD,...",
                       help="more built-in student sizes, e.g. 1x32,2x128: a baseline and a KD run each")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, help="student steps (preset: 300; --quick: 60)")
    training.add_argument("--teacher-steps", type=int, help="teacher steps (preset: 500; --quick: 150)")
    training.add_argument("--batch-size", type=int, help="sequences per step")
    training.add_argument("--lr", type=float, help="student peak learning rate")
    training.add_argument("--seed", type=int, default=0, help="same seed, same numbers (%(default)s)")
    training.add_argument("--threads", type=int, help="torch threads (default 1: the models are small)")
    training.add_argument("--no-progress", action="store_true", help="no progress bars")

    loss = parser.add_argument_group(
        "distillation loss",
        "KD runs minimise (1 - λ)·CE + λ·T²·D(p_T || q_T), i.e. kd_loss(ce_weight=1-λ, kd_weight=λ).")
    loss.add_argument("--temperature", "-T", type=float, help="T (preset: 1)")
    loss.add_argument("--kd-weight", type=float, help="λ in [0, 1] (preset: 0.5)")
    loss.add_argument("--divergence", type=_name_list, default=["forward_kl"],
                      help="forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd; a comma list "
                           "gives one KD run each (%(default)s)")
    loss.add_argument("--sparse-teacher", type=int, metavar="K", help="add a run distilled from the teacher's "
                      "top-K log-probs, cached first (kdkernels.fused_linear_sparse_kd_loss)")
    loss.add_argument("--sparse-missing-mass", choices=("renormalize", "residual", "support"), default="residual",
                      help="the sparse run's treatment of the teacher mass outside its top K (%(default)s)")
    loss.add_argument("--beta", type=float, default=0.5, help="jsd mixing / skew weight (%(default)s)")
    loss.add_argument("--loss", type=_name_list, default=["kd"],
                      help="distillation losses to run, comma list of kd, cakd, dkd (%(default)s)")
    loss.add_argument("--cakd", action="store_true", help="add a CAKD run (kdkernels.cakd_loss)")
    loss.add_argument("--dkd", action="store_true", help="add a DKD run (kdkernels.dkd_loss)")
    loss.add_argument("--dkd-alpha", type=float, default=1.0, help="DKD target-class weight (%(default)s)")
    loss.add_argument("--dkd-beta", type=float, default=8.0, help="DKD non-target weight (%(default)s)")
    loss.add_argument("--cakd-groups", default="teacher_topk", help="CAKD rule for the strong set (%(default)s)")
    loss.add_argument("--cakd-k", type=int, default=8, help="CAKD top-k size (%(default)s)")
    loss.add_argument("--cakd-mass", type=float, default=0.9,
                      help="CAKD teacher mass of the strong set with --cakd-groups teacher_mass (%(default)s)")
    loss.add_argument("--feature-align", choices=("off", "mse", "cosine"), default="off",
                      help="add a KD run with a hint loss on the final hidden states (%(default)s)")
    loss.add_argument("--feature-weight", type=float, default=1.0, help="weight of the hint loss (%(default)s)")

    sweeps = parser.add_argument_group("sweeps (one KD run per value)")
    sweeps.add_argument("--sweep-temperature", type=_float_list, default=[], metavar="T,...", help="e.g. 1,2,5,10")
    sweeps.add_argument("--sweep-kd-weight", type=_float_list, default=[], metavar="λ,...", help="e.g. 0.1,0.5,0.9")
    return parser


def _check_loss(parser: argparse.ArgumentParser, flag: str, **spec) -> None:
    try:  # the loss itself validates its options
        loop.check_loss_spec(loop.LossSpec(**spec))
    except (ValueError, TypeError) as exc:
        parser.error(f"{flag}: {exc}")


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[str]:
    """Argument errors before any work; returns the distillation loss kinds to run."""
    kinds = list(dict.fromkeys(args.loss + (["cakd"] if args.cakd else []) + (["dkd"] if args.dkd else [])))
    for kind in kinds:
        if kind not in ("kd", "cakd", "dkd"):
            parser.error(f"--loss: {kind!r} is not one of kd, cakd, dkd")
        if kind != "kd" and not hasattr(kdkernels, f"{kind}_loss"):
            parser.error(f"--loss {kind}: this kdkernels has no {kind}_loss")
    for name in ("steps", "teacher_steps", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    weights = ([args.kd_weight] if args.kd_weight is not None else []) + args.sweep_kd_weight
    if any(not 0.0 <= w <= 1.0 for w in weights):
        parser.error("--kd-weight / --sweep-kd-weight values must lie in [0, 1]")
    temperatures = ([args.temperature] if args.temperature is not None else []) + args.sweep_temperature
    if any(t <= 0 for t in temperatures):
        parser.error("--temperature / --sweep-temperature values must be > 0")
    for divergence in args.divergence:
        _check_loss(parser, f"--divergence {divergence}", kind="kd", divergence=divergence, beta=args.beta)
    for kind in kinds:
        _check_loss(parser, f"--loss {kind}", kind=kind, dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta,
                    cakd_groups=args.cakd_groups, cakd_k=args.cakd_k, cakd_mass=args.cakd_mass)
    if args.student and args.student_sizes:
        parser.error("--student-sizes applies to the built-in student, not to --student PATH")
    for path in (args.teacher, args.student, args.data):
        if path and not os.path.exists(path):
            parser.error(f"{path}: no such file or directory")
    return kinds


def _tokenizer_for(paths: Sequence[Optional[str]]):
    """The tokenizer saved with a checkpoint (teacher first), or None for byte tokens."""
    for path in paths:
        if path and any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def _preset_with_flags(args: argparse.Namespace) -> experiments.Preset:
    preset = experiments.PRESETS["quick" if args.quick else "default"]
    student_optim = preset.student_optim
    if args.steps is not None:
        student_optim = student_optim.with_steps(args.steps)
    if args.batch_size is not None:
        student_optim = dataclasses.replace(student_optim, batch_size=args.batch_size)
    if args.lr is not None:
        student_optim = dataclasses.replace(student_optim, lr=args.lr)
    teacher_optim = preset.teacher_optim
    if args.teacher_steps is not None:
        teacher_optim = teacher_optim.with_steps(args.teacher_steps)
    return dataclasses.replace(
        preset, student_optim=student_optim, teacher_optim=teacher_optim,
        temperature=preset.temperature if args.temperature is None else args.temperature,
        kd_weight=preset.kd_weight if args.kd_weight is None else args.kd_weight)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.study or args.jobs != 1:
        return study.main(parser, args)
    kinds = _check_options(parser, args)
    parallel.check(parser, args, kinds)
    args.no_progress |= not parallel.init(args.parallel)
    preset = _preset_with_flags(args)
    threads_before = torch.get_num_threads()
    if args.threads or preset.threads:
        torch.set_num_threads(args.threads or preset.threads)
    try:
        code = _run(parser, args, kinds, preset)
        parallel.finish()
        return code
    finally:  # main() may be called inside a larger program (tests): leave its setting as it was
        torch.set_num_threads(threads_before)


def _teacher(args: argparse.Namespace, preset: experiments.Preset, hf_teacher, corpus: data.Corpus,
             eval_windows: torch.Tensor, vocab: int, context: int):
    """The checkpoint given with --teacher, or the built-in teacher (cached, or trained now)."""
    if hf_teacher is not None:
        teacher = experiments.freeze(hf_teacher)
        val_loss = loop.evaluate(teacher, eval_windows).val_loss
        name = os.path.basename(os.path.normpath(args.teacher))
        return teacher, experiments.TeacherInfo(name, models.count_parameters(teacher), val_loss, "checkpoint",
                                                args.teacher)
    teacher_cfg = dataclasses.replace(preset.teacher, vocab_size=vocab, context=context)
    return experiments.built_in_teacher(teacher_cfg, preset.teacher_optim, corpus, eval_windows, seed=args.seed,
                                        cache_dir=None if args.no_cache else args.cache_dir,
                                        progress=not args.no_progress)


def _write_outputs(args: argparse.Namespace, runs: List[dict], info: experiments.TeacherInfo,
                   corpus: data.Corpus, context: int, started: float) -> None:
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    report.write_json(results_path, runs, teacher=dataclasses.asdict(info), corpus=corpus.name, context=context,
                      seed=args.seed, smoke_test=args.quick, options=vars(args))
    smoke = "smoke test (--quick), " if args.quick else ""
    plot_path = report.plot_curves(os.path.join(args.out, "curves.png"), runs, info.val_loss,
                                   title=f"Validation loss, {smoke}{corpus.name} (teacher {info.description})")
    print()
    print(report.format_table(runs, title=f"{smoke.capitalize()}teacher {info.description}: validation loss "
                                          f"{info.val_loss:.4f}"))
    print()
    print(report.verdict(runs))
    if args.quick:
        print(SMOKE_TEST_NOTE)
    print(f"wrote {results_path}" + (f" and {plot_path}" if plot_path else " (no plot: matplotlib is missing)")
          + f"; total {time.perf_counter() - started:.0f} s")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, kinds: List[str],
         preset: experiments.Preset) -> int:
    try:
        extra_sizes = [experiments.parse_size(size, preset.student) for size in args.student_sizes]
    except ValueError as exc:
        parser.error(f"--student-sizes: {exc}")
    started = time.perf_counter()

    tokenizer = _tokenizer_for([args.teacher, args.student])
    hf_teacher = models.load_hf_model(args.teacher) if args.teacher else None
    probe_student = models.load_hf_model(args.student) if args.student else None
    context = min(m.context for m in (preset.student, preset.teacher, hf_teacher, probe_student) if m is not None)
    corpus = data.load_corpus(args.data, max_bytes=preset.max_bytes, tokenizer=tokenizer, min_tokens=2 * context + 2)
    # Both models must cover the token ids; the built-in ones take the checkpoint's vocabulary.
    vocab = hf_teacher.vocab_size if hf_teacher is not None else corpus.vocab_size
    for label, model in (("--teacher", hf_teacher), ("--student", probe_student)):
        if model is not None and model.vocab_size < corpus.vocab_size:
            parser.error(f"{label}: the model's vocabulary ({model.vocab_size}) is smaller than the "
                         f"corpus tokens ({corpus.vocab_size}{' bytes' if tokenizer is None else ''})")
    del probe_student
    eval_windows = data.validation_windows(corpus.validation, context=context, max_windows=preset.eval_windows)
    fused = "yes" if loop.fused_linear_available() else "no (kd_loss on logits)"
    if args.quick:
        print(SMOKE_TEST_NOTE)
    print(f"kdkernels {kdkernels.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.machine()} | fused linear KD: {fused}")
    print(f"corpus {corpus.name}: {len(corpus.train):,} train / {len(corpus.validation):,} validation tokens, "
          f"vocabulary {corpus.vocab_size}, context {context}")

    teacher, info = _teacher(args, preset, hf_teacher, corpus, eval_windows, vocab, context)
    print(f"teacher {info.description} ({info.parameters / 1e6:.2f}M parameters, {info.source}"
          f"{f': {info.path}' if info.source == 'cache' else ''}): validation loss {info.val_loss:.4f}")

    student: experiments.StudentSource = args.student or dataclasses.replace(preset.student, context=context)
    extra = [dataclasses.replace(cfg, context=context) for cfg in extra_sizes]
    extra = [cfg for cfg in extra if cfg != student]
    base_loss = loop.LossSpec(kind="kd", temperature=preset.temperature, kd_weight=preset.kd_weight, beta=args.beta,
                              feature_weight=args.feature_weight, dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta,
                              cakd_groups=args.cakd_groups, cakd_k=args.cakd_k, cakd_mass=args.cakd_mass)
    plans = experiments.plan_runs(student=student, base_loss=base_loss, loss_kinds=kinds,
                                  divergences=args.divergence, temperatures=args.sweep_temperature,
                                  kd_weights=args.sweep_kd_weight, feature_align=args.feature_align,
                                  extra_students=extra)
    setup = experiments.RunSetup(corpus=corpus, context=context, eval_windows=eval_windows, teacher=teacher,
                                 teacher_top1=loop.top1_predictions(teacher, eval_windows, vocab),
                                 optim=preset.student_optim, seed=args.seed, progress=not args.no_progress)
    print(f"{len(plans)} student run{'s' if len(plans) != 1 else ''} of {preset.student_optim.steps} steps, "
          f"batch {preset.student_optim.batch_size}")
    for plan in plans:
        if plan.also:
            print(f"  {', '.join(plan.also)}: the same run as {plan.name} ({experiments.describe_loss(plan.loss)}), "
                  "run once")
    experiments.warm_up(plans, setup, vocab)
    runs = [experiments.run_one(plan, setup, vocab) for plan in plans]
    runs += sparse_runs.sparse_runs(args, setup, vocab, base_loss, student)

    if parallel.is_main():
        _write_outputs(args, runs, info, corpus, context, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
