"""``python -m kdkernels.train --study [quick]``: the distillation study, one fixed protocol.

It answers three questions with several seeds and paired intervals:

1. temperature × capacity: KD at every T of the grid for every student size, against the CE
   baseline of that size;
2. KD weight λ at the best T, and output-only KD against KD + feature alignment (MSE and cosine
   through a learned projection);
3. the KD methods (forward KL, reverse KL, JSD, skew KL, TVD, DKD, CAKD with top-k and mass
   groups, and sparse top-k KD from a teacher cache when this kdkernels has it) side by side.

The protocol (:class:`Protocol`) fixes everything but the loss: one teacher (trained once with
``teacher_seed`` and cached like the trainer's), the same AdamW schedule, batch size and steps for
every student, and per seed ``s`` the same student initialisation (``torch.manual_seed(s)``) and
the same batches (drawn with seed ``s + 1``) for every run of that seed. Runs with the same seed
differ only in their loss, so gains are paired by seed.

Each run is cached in ``<out>/runs/<hash>.json``, the hash taken over everything that determines
its numbers (student, loss, seed, schedule, teacher, corpus, evaluation windows): a killed study
continues where it stopped, and an unchanged study reruns nothing. Runs execute in ``jobs``
processes, one torch thread each; a run's numbers do not depend on the process it ran in.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import kdkernels
from kdkernels.train import data, experiments, loop, models

# Bump when a change to the trainer alters what a cached run would compute.
STUDY_FORMAT = 1


@dataclass(frozen=True)
class Method:
    """One distillation method of question 3: its LossSpec fields besides T and λ."""

    key: str
    label: str
    loss: Tuple[Tuple[str, object], ...]  # LossSpec field overrides, as pairs (hashable)
    sparse_k: Optional[int] = None  # distil from the teacher's top-k log-probs in a teacher cache


METHODS: Tuple[Method, ...] = (
    Method("forward_kl", "Hinton KD (forward KL)", (("divergence", "forward_kl"),)),
    Method("reverse_kl", "reverse KL", (("divergence", "reverse_kl"),)),
    Method("jsd", "JSD (β=0.5)", (("divergence", "jsd"), ("beta", 0.5))),
    Method("skew_kl", "skew KL (β=0.1)", (("divergence", "skew_kl"), ("beta", 0.1))),
    Method("tvd", "TVD", (("divergence", "tvd"),)),
    Method("dkd", "DKD (α=1, β=8)", (("kind", "dkd"), ("dkd_alpha", 1.0), ("dkd_beta", 8.0))),
    Method("cakd_topk", "CAKD, teacher top-8 group", (("kind", "cakd"), ("cakd_groups", "teacher_topk"),
                                                      ("cakd_k", 8))),
    Method("cakd_mass", "CAKD, teacher 90%-mass group", (("kind", "cakd"), ("cakd_groups", "teacher_mass"),
                                                         ("cakd_mass", 0.9))),
)
SPARSE_METHOD = Method("sparse_topk", "sparse top-8 KD (teacher cache)", (("divergence", "forward_kl"),), sparse_k=8)


def sparse_available() -> bool:
    """Whether this kdkernels has the sparse-teacher loss and the trainer's teacher-cache runs."""
    if not hasattr(kdkernels, "fused_linear_sparse_kd_loss"):
        return False
    try:
        from kdkernels.train import sparse_runs  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Protocol:
    """Everything a study fixes. Students are listed from smallest to largest."""

    name: str
    teacher: models.TransformerConfig
    teacher_optim: loop.OptimSettings
    students: Tuple[models.TransformerConfig, ...]
    main_student: int  # index in `students` of the student the λ, feature and method questions use
    optim: loop.OptimSettings  # every student run's schedule
    seeds: Tuple[int, ...]
    temperatures: Tuple[float, ...]
    eval_windows: int  # validation windows of `context` tokens scored at each evaluation
    # the questions every protocol asks alike unless it says otherwise
    kd_weights: Tuple[float, ...] = (0.1, 0.5, 0.9)  # question 2's λ values, at the best T
    kd_weight: float = 0.5  # λ of the T grid, the feature and the method runs
    features: Tuple[str, ...] = ("mse", "cosine")  # feature-alignment kinds compared with output-only KD
    feature_weight: float = 1.0
    # Method keys; "sparse_topk" runs only where sparse_available()
    methods: Tuple[str, ...] = tuple(m.key for m in METHODS) + (SPARSE_METHOD.key,)
    max_bytes: Optional[int] = None  # keep only the start of the corpus
    teacher_seed: int = 0

    @property
    def context(self) -> int:
        return self.teacher.context

    def check(self) -> None:
        if len({cfg.context for cfg in self.students + (self.teacher,)}) != 1:
            raise ValueError("the teacher and every student must share one context length")
        if not 0 <= self.main_student < len(self.students):
            raise ValueError(f"main_student must index students, got {self.main_student}")
        if self.kd_weight not in self.kd_weights:
            raise ValueError("kd_weights must include kd_weight (the λ of the other questions)")
        known = {m.key for m in METHODS + (SPARSE_METHOD,)}
        if "forward_kl" not in self.methods or not set(self.methods) <= known:
            raise ValueError(f"methods must include forward_kl and be among {sorted(known)}")
        if not self.seeds or not self.temperatures:
            raise ValueError("a study needs at least one seed and one temperature")


def _protocol(name: str, context: int, teacher: Tuple[int, int], students: Sequence[Tuple[int, int]],
              **settings) -> Protocol:
    """A protocol whose teacher and students, each given as (layers, width), share one context."""
    return Protocol(name=name, teacher=models.transformer_shape(*teacher, context=context),
                    students=tuple(models.transformer_shape(*shape, context=context) for shape in students),
                    **settings)


PROTOCOLS: Dict[str, Protocol] = {
    # About 25 minutes with --jobs 2 on two idle cores, under 40 on busy ones (README: how it was sized).
    # A 4x192 teacher, so that the three students span 5% to 25% of its parameters.
    "full": _protocol(
        "full", context=64, teacher=(4, 192), students=((1, 64), (2, 96), (2, 128)), main_student=2,
        teacher_optim=loop.OptimSettings(steps=800, batch_size=32, lr=2e-3, eval_every=200),
        optim=loop.OptimSettings(steps=200, batch_size=32, lr=3e-3, eval_every=20),
        seeds=(0, 1, 2), temperatures=(1.0, 2.0, 4.0, 8.0, 16.0), eval_windows=128,
    ),
    # About 3 minutes with --jobs 2 on two cores: smaller models on the first 200 KB of the corpus,
    # two seeds, three temperatures; every table and figure of the full study.
    "quick": _protocol(
        "quick", context=32, teacher=(3, 128), students=((1, 32), (1, 64), (2, 64)), main_student=2,
        teacher_optim=loop.OptimSettings(steps=300, batch_size=32, lr=3e-3, eval_every=100),
        optim=loop.OptimSettings(steps=200, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=25),
        seeds=(0, 1), temperatures=(1.0, 4.0, 16.0), eval_windows=64, max_bytes=200_000,
    ),
}


# --- runs and their cache ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RunKey:
    """One training run: the unit of caching. Questions that need the same run share it."""

    student: models.TransformerConfig
    loss: loop.LossSpec
    seed: int
    sparse_k: Optional[int] = None


def kd_spec(protocol: Protocol, temperature: float, kd_weight: Optional[float] = None,
            method: Method = METHODS[0], feature_align: str = "off") -> loop.LossSpec:
    """The canonical LossSpec of a distillation run: only the fields the run varies leave their
    defaults, so two questions asking for the same run get equal specs (and one cached run)."""
    fields = dict(method.loss, temperature=float(temperature),
                  kd_weight=float(protocol.kd_weight if kd_weight is None else kd_weight))
    if feature_align != "off":
        fields.update(feature_align=feature_align, feature_weight=protocol.feature_weight)
    return loop.LossSpec(**fields)


CE_SPEC = loop.LossSpec(kind="ce")


def method_by_key(key: str) -> Method:
    return next(m for m in METHODS + (SPARSE_METHOD,) if m.key == key)


def active_methods(protocol: Protocol) -> Tuple[Method, ...]:
    """The protocol's methods this kdkernels can run (sparse top-k KD needs the sparse loss)."""
    return tuple(method_by_key(key) for key in protocol.methods
                 if key != SPARSE_METHOD.key or sparse_available())


def phase_one(protocol: Protocol) -> List[RunKey]:
    """The CE baselines and the T grid, every student, every seed."""
    keys = []
    for seed in protocol.seeds:
        for student in protocol.students:
            keys.append(RunKey(student, CE_SPEC, seed))
            keys += [RunKey(student, kd_spec(protocol, t), seed) for t in protocol.temperatures]
    return keys


def phase_two(protocol: Protocol, best_temperature: float) -> List[RunKey]:
    """λ, feature alignment and the methods on the main student at the best T (the forward-KL,
    λ = kd_weight run among them is the T grid's, already done)."""
    student = protocol.students[protocol.main_student]
    keys = []
    for seed in protocol.seeds:
        keys += [RunKey(student, kd_spec(protocol, best_temperature, w), seed) for w in protocol.kd_weights]
        keys += [RunKey(student, kd_spec(protocol, best_temperature, feature_align=f), seed)
                 for f in protocol.features]
        keys += [RunKey(student, kd_spec(protocol, best_temperature, method=m), seed, m.sparse_k)
                 for m in active_methods(protocol)]
    return list(dict.fromkeys(keys))


@dataclass
class StudyContext:
    """What every run of a study shares; built once per process (the main one and each worker)."""

    protocol: Protocol
    corpus: data.Corpus
    eval_windows: torch.Tensor  # [N, context + 1]
    teacher: torch.nn.Module
    teacher_info: experiments.TeacherInfo
    teacher_top1: torch.Tensor  # [N, context]
    out_dir: str

    @property
    def vocab(self) -> int:
        return self.corpus.vocab_size

    def run_config(self, key: RunKey) -> dict:
        """Everything that determines a run's numbers (and nothing else: not the jobs, not the time)."""
        protocol = self.protocol
        return {
            "format": STUDY_FORMAT,
            "seed": key.seed,
            "student": dataclasses.replace(key.student, vocab_size=self.vocab).to_dict(),
            "loss": dataclasses.asdict(key.loss),
            "sparse_k": key.sparse_k,
            "optim": dataclasses.asdict(protocol.optim),
            "teacher": {"model": dataclasses.replace(protocol.teacher, vocab_size=self.vocab).to_dict(),
                        "optim": dataclasses.asdict(protocol.teacher_optim), "seed": protocol.teacher_seed},
            "corpus": self.corpus.digest,
            "eval_windows": int(self.eval_windows.shape[0]),
            "fused_linear": loop.fused_linear_available(),
        }

    def run_path(self, key: RunKey) -> str:
        text = json.dumps(self.run_config(key), sort_keys=True)
        return os.path.join(self.out_dir, "runs", hashlib.sha256(text.encode()).hexdigest()[:16] + ".json")

    def cached(self, key: RunKey) -> Optional[dict]:
        """The run's stored record, or None if it has not finished (or its file is not this run's)."""
        try:
            with open(self.run_path(key)) as handle:
                stored = json.load(handle)
        except (OSError, ValueError):
            return None
        return stored if stored.get("config") == self.run_config(key) else None


def describe_run(key: RunKey) -> str:
    loss = experiments.describe_loss(key.loss)
    if key.sparse_k is not None:
        loss = loss.replace("KD", f"sparse top-{key.sparse_k} KD", 1)
    return f"seed {key.seed} {key.student.describe()} {loss}"


def load_context(protocol: Protocol, out_dir: str, teacher_dir: str, data_path: Optional[str] = None,
                 progress: bool = False, log=print) -> StudyContext:
    corpus = data.load_corpus(data_path, max_bytes=protocol.max_bytes, min_tokens=2 * protocol.context + 2)
    eval_windows = data.validation_windows(corpus.validation, context=protocol.context,
                                           max_windows=protocol.eval_windows)
    teacher_cfg = dataclasses.replace(protocol.teacher, vocab_size=corpus.vocab_size)
    teacher, info = experiments.built_in_teacher(teacher_cfg, protocol.teacher_optim, corpus, eval_windows,
                                                 seed=protocol.teacher_seed, cache_dir=teacher_dir,
                                                 progress=progress, log=log)
    top1 = loop.top1_predictions(teacher, eval_windows, corpus.vocab_size)
    return StudyContext(protocol, corpus, eval_windows, teacher, info, top1, out_dir)


def _sparse_record(key: RunKey, context: StudyContext, setup: experiments.RunSetup) -> dict:
    """A sparse top-k KD run: the teacher's top-k log-probs on this seed's training windows are
    cached first (in <out>/teacher-cache/<the run's hash>), then the student distils from them alone."""
    from kdkernels.train import sparse_runs

    path = os.path.join(context.out_dir, "teacher-cache", os.path.basename(context.run_path(key))[:-len(".json")])
    cache = sparse_runs.ensure_cache(path, setup, setup.optim, key.sparse_k, progress=False)
    return sparse_runs.run_sparse(cache, setup, context.vocab, key.loss, key.student, log=lambda *_: None)


def execute(key: RunKey, context: StudyContext) -> dict:
    """Trains the run, stores ``{"config", "result"}`` atomically in its file and returns it."""
    setup = experiments.RunSetup(corpus=context.corpus, context=context.protocol.context,
                                 eval_windows=context.eval_windows, teacher=context.teacher,
                                 teacher_top1=context.teacher_top1, optim=context.protocol.optim, seed=key.seed,
                                 progress=False)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    if key.sparse_k is not None:
        record = _sparse_record(key, context, setup)
        result = {name: record[name] for name in ("val_loss", "top1_agreement", "student_parameters", "curve")}
    else:
        # experiments.run_one's training without its peak-memory probe (a full gc.collect per run,
        # which costs more than a miniature run itself).
        plan = experiments.RunPlan(describe_run(key), key.student, key.loss)
        student, fitted = experiments._train_student(plan, setup, context.vocab, setup.optim, progress=False)
        result = {"val_loss": fitted.final.val_loss, "top1_agreement": fitted.final.top1_agreement,
                  "student_parameters": models.count_parameters(student), "curve": fitted.curve}
    result["wall_time_s"] = time.perf_counter() - wall_start
    result["cpu_time_s"] = time.process_time() - cpu_start  # one thread: the run's cost on an idle core
    # Through JSON once, so a fresh run and a cached one are the same Python values.
    stored = json.loads(json.dumps({"config": context.run_config(key), "result": result}))
    path = context.run_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as handle:
        json.dump(stored, handle, indent=1, sort_keys=True)
    os.replace(partial, path)  # a killed run leaves no file, so it reruns
    return stored


# --- processes -----------------------------------------------------------------------------------------

_WORKER_CONTEXT: Optional[StudyContext] = None


def _init_worker(protocol: Protocol, out_dir: str, teacher_dir: str, data_path: Optional[str]) -> None:
    global _WORKER_CONTEXT
    torch.set_num_threads(1)
    _WORKER_CONTEXT = load_context(protocol, out_dir, teacher_dir, data_path, log=lambda *_: None)


def _execute_in_worker(key: RunKey) -> dict:
    return execute(key, _WORKER_CONTEXT)


def run_keys(keys: Sequence[RunKey], context: StudyContext, *, jobs: int, teacher_dir: str,
             data_path: Optional[str], stop_after: Optional[int],
             log=print) -> Tuple[Dict[RunKey, dict], int, bool]:
    """Every key's record: cached ones read, the others trained (``jobs`` processes; in this
    process when jobs is 1). ``stop_after`` trains at most that many, standing in for a killed
    study. Returns the records, how many runs were trained now, and whether every key has a record."""
    runs_dir = os.path.join(context.out_dir, "runs")
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else ():
        if name.endswith(".tmp"):  # a killed process's unfinished write
            os.remove(os.path.join(runs_dir, name))
    records: Dict[RunKey, dict] = {}
    missing = []
    for key in keys:
        stored = context.cached(key)
        if stored is None:
            missing.append(key)
        else:
            records[key] = stored
    if stop_after is not None:
        missing = missing[:stop_after]
    if not missing:
        return records, 0, len(records) == len(keys)
    log(f"{len(missing)} run{'s' if len(missing) != 1 else ''} to train ({len(records)} cached), "
        f"{jobs} process{'es' if jobs != 1 else ''}")
    done = 0

    def finished(key: RunKey, stored: dict) -> None:
        nonlocal done
        done += 1
        records[key] = stored
        result = stored["result"]
        log(f"  [{done}/{len(missing)}] {describe_run(key)}: val loss {result['val_loss']:.4f} "
            f"({result['wall_time_s']:.0f} s)")

    if jobs == 1:
        for key in missing:
            finished(key, execute(key, context))
    else:
        # spawn, not fork: a forked child would inherit the parent's OpenMP state.
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(jobs, len(missing)), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(context.protocol, context.out_dir, teacher_dir,
                                                    data_path)) as pool:
            futures = {pool.submit(_execute_in_worker, key): key for key in missing}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    return records, len(missing), len(records) == len(keys)


# --- the study -----------------------------------------------------------------------------------------

def seed_gains(records: Dict[RunKey, dict], protocol: Protocol, student: models.TransformerConfig,
               loss: loop.LossSpec, sparse_k: Optional[int] = None) -> List[float]:
    """Per seed, the CE baseline's final validation loss minus the run's (positive: KD helped),
    in seed order: the runs of one seed share initialisation and batches, so the gain is paired."""
    return [records[RunKey(student, CE_SPEC, seed)]["result"]["val_loss"]
            - records[RunKey(student, loss, seed, sparse_k)]["result"]["val_loss"] for seed in protocol.seeds]


def best_temperature(records: Dict[RunKey, dict], protocol: Protocol) -> float:
    """The T of the grid with the largest mean gain on the main student (the smaller T on a tie)."""
    student = protocol.students[protocol.main_student]

    def mean_gain(temperature: float) -> float:
        gains = seed_gains(records, protocol, student, kd_spec(protocol, temperature))
        return sum(gains) / len(gains)

    return max(protocol.temperatures, key=lambda t: (mean_gain(t), -t))


@dataclass
class StudyResults:
    """A finished study: its protocol, teacher, the best T it found and every run's record."""

    protocol: Protocol
    context: StudyContext
    best_temperature: float
    methods: Tuple[Method, ...]
    records: Dict[RunKey, dict]

    def runs(self, student: models.TransformerConfig, loss: loop.LossSpec,
             sparse_k: Optional[int] = None) -> List[dict]:
        """The run's stored results, one per seed, in seed order."""
        return [self.records[RunKey(student, loss, seed, sparse_k)]["result"] for seed in self.protocol.seeds]

    def gains(self, student: models.TransformerConfig, loss: loop.LossSpec,
              sparse_k: Optional[int] = None) -> List[float]:
        return seed_gains(self.records, self.protocol, student, loss, sparse_k)


def run_study(protocol: Protocol, out_dir: str, *, teacher_dir: str, jobs: int = 1, data_path: Optional[str] = None,
              progress: bool = True, stop_after: Optional[int] = None, figures: bool = True,
              log: Callable[..., None] = print) -> Optional[StudyResults]:
    """Runs (or resumes) the study and writes report.md, results.json and the figures to ``out_dir``.

    Args:
        protocol: what to run (``PROTOCOLS["full"]``, ``PROTOCOLS["quick"]`` or a custom one).
        out_dir: where the run files, the report and the figures go; a rerun reuses its run files.
        teacher_dir: the teacher cache folder (the teacher is trained there once).
        jobs: worker processes for the runs, one torch thread each (1: this process).
        data_path: a UTF-8 text file instead of the built-in corpus.
        progress: a progress bar while the teacher trains.
        stop_after: train at most this many runs, then return None without a report (what a
            killed study leaves behind; tests use it).
        figures: write the four PNGs (needs matplotlib).
        log: where progress lines go.

    Returns:
        The :class:`StudyResults`, or None when ``stop_after`` stopped it early.
    """
    from kdkernels.train import study_report

    protocol.check()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so that jobs=1 computes what jobs=N does
    try:
        context = load_context(protocol, out_dir, teacher_dir, data_path, progress=progress, log=log)
        info = context.teacher_info
        log(f"study {protocol.name}: teacher {info.description} ({info.parameters:,} parameters, {info.source}), "
            f"validation loss {info.val_loss:.4f}; students "
            f"{', '.join(cfg.describe() for cfg in protocol.students)}; seeds {list(protocol.seeds)}")
        records, trained, complete = run_keys(phase_one(protocol), context, jobs=jobs, teacher_dir=teacher_dir,
                                              data_path=data_path, stop_after=stop_after, log=log)
        if not complete:
            return None
        best = best_temperature(records, protocol)
        remaining = None if stop_after is None else stop_after - trained
        more, _, complete = run_keys(phase_two(protocol, best), context, jobs=jobs, teacher_dir=teacher_dir,
                                     data_path=data_path, stop_after=remaining, log=log)
        if not complete:
            return None
        records.update(more)
        results = StudyResults(protocol, context, best, active_methods(protocol), records)
        written = study_report.write_all(results, out_dir, figures=figures)
        log(f"wrote {', '.join(os.path.relpath(path, out_dir) for path in written)} to {out_dir}")
        return results
    finally:
        torch.set_num_threads(threads_before)


# --- command line ----------------------------------------------------------------------------------------

# The trainer's options that apply to a study; every other one must keep its default.
STUDY_OPTIONS = ("study", "jobs", "out", "data", "cache_dir", "no_cache", "no_progress")


def main(parser, args) -> int:
    """``python -m kdkernels.train --study [quick] [--jobs N] [--out DIR]``: runs (or resumes) the study."""
    if not args.study:
        parser.error("--jobs applies to --study")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    fixed = [name for name, value in vars(args).items()
             if name not in STUDY_OPTIONS and value != parser.get_default(name)]
    if fixed:
        parser.error(f"--study runs a fixed protocol; {', '.join('--' + n.replace('_', '-') for n in fixed)} "
                     "does not apply to it")
    if args.data and not os.path.exists(args.data):
        parser.error(f"{args.data}: no such file or directory")
    protocol = PROTOCOLS[args.study]
    out = args.out
    if out == parser.get_default("out"):
        out = os.path.join("runs", "study" if args.study == "full" else f"study-{args.study}")
    teacher_dir = os.path.join(out, "teacher") if args.no_cache else args.cache_dir
    run_study(protocol, out, teacher_dir=teacher_dir, jobs=args.jobs, data_path=args.data,
              progress=not args.no_progress)
    return 0
