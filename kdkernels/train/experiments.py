"""From options to results: the presets, the teacher (trained once, cached), the list of runs,
and running them one after another on the same data order and the same student initialisation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import kdkernels
from kdkernels.train import data, loop, models, parallel
from kdkernels.train.memory import PeakMemory

# Bump when a change to the model or the teacher's training makes cached teachers stale.
TEACHER_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Preset:
    """Model shapes and schedules of one trainer configuration."""

    teacher: models.TransformerConfig
    teacher_optim: loop.OptimSettings
    student: models.TransformerConfig
    student_optim: loop.OptimSettings
    eval_windows: int  # validation windows of `context` tokens scored at each evaluation
    max_bytes: Optional[int] = None  # keep only the start of the corpus
    temperature: float = 1.0
    kd_weight: float = 0.5
    # torch threads unless --threads says. One: these models' matrices are too small for a second
    # thread to pay for its synchronisation, which also waits on whatever else the machine runs
    # (two threads measured several times slower than one on a busy machine).
    threads: Optional[int] = 1


PRESETS: Dict[str, Preset] = {
    # Sized for a short first run on one thread: the teacher's steps (trained once, then read from
    # the cache) cost about 1.6x the two student runs together. Distillation lowers the student's
    # validation loss by ~0.13 nats/byte against the same student trained on hard labels alone
    # (seed 0), the teacher being ~0.29 nats/byte better than that baseline.
    "default": Preset(
        teacher=models.transformer_shape(4, 128, context=64),
        teacher_optim=loop.OptimSettings(steps=500, batch_size=32, lr=2e-3, eval_every=250),
        student=models.transformer_shape(2, 96, context=64),
        student_optim=loop.OptimSettings(steps=300, batch_size=32, lr=3e-3, eval_every=25),
        eval_windows=128,
    ),
    # Small enough for tests and CI: well under two minutes on two cores, teacher included.
    "quick": Preset(
        teacher=models.transformer_shape(2, 64, context=32),
        teacher_optim=loop.OptimSettings(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=50),
        student=models.transformer_shape(1, 32, context=32),
        student_optim=loop.OptimSettings(steps=60, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=20),
        eval_windows=32,
        max_bytes=120_000,
    ),
}


StudentSource = Union[models.TransformerConfig, str]  # a built-in shape, or a local HF checkpoint path


@dataclass(frozen=True)
class RunPlan:
    name: str
    student: StudentSource
    loss: loop.LossSpec
    also: Tuple[str, ...] = ()  # names of requested runs that are this same run (e.g. a sweep's kd-T1)


def describe_student(student: StudentSource) -> str:
    return student.describe() if isinstance(student, models.TransformerConfig) else os.path.basename(
        os.path.normpath(student))


def describe_loss(spec: loop.LossSpec) -> str:
    if spec.kind == "ce":
        return "CE"
    text = {"kd": f"KD {spec.divergence}", "dkd": f"DKD a={spec.dkd_alpha:g} b={spec.dkd_beta:g}",
            "cakd": f"CAKD {spec.cakd_groups}"}[spec.kind]
    text += f" T={spec.temperature:g} λ={spec.kd_weight:g}"
    if spec.feature_align != "off":
        text += f" +{spec.feature_align}"
    return text


def parse_size(text: str, base: models.TransformerConfig) -> models.TransformerConfig:
    """``"LxD"`` (layers x width), e.g. ``2x128``, otherwise shaped like ``base``."""
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a student size is LAYERSxWIDTH, e.g. 2x128; got {text!r}") from None
    if layers < 1 or width < 1:
        raise ValueError(f"a student size needs layers and width >= 1, got {text!r}")
    shape = models.transformer_shape(layers, width, base.context)
    return dataclasses.replace(base, layers=layers, d_model=width, heads=shape.heads)


def plan_runs(*, student: StudentSource, base_loss: loop.LossSpec, loss_kinds: Sequence[str],
              divergences: Sequence[str], temperatures: Sequence[float], kd_weights: Sequence[float],
              feature_align: str, extra_students: Sequence[StudentSource] = ()) -> List[RunPlan]:
    """The runs of one invocation, in table order.

    ``baseline`` (CE only) and one run per distillation loss kind and divergence on the main student;
    ``kd-T<t>`` per swept temperature and ``kd-lambda<w>`` per swept KD weight; with feature
    alignment, ``kd+<kind>`` next to ``kd``; and ``baseline@<size>``/``kd@<size>`` per extra student.
    A requested run identical to an earlier one (same student, same loss: e.g. ``kd-T1`` when the
    preset's temperature is 1) is not planned again; its name is kept in the earlier plan's ``also``.
    """
    plans = [RunPlan("baseline", student, dataclasses.replace(base_loss, kind="ce", feature_align="off"))]
    plain_kd = dataclasses.replace(base_loss, kind="kd", feature_align="off")
    for kind in loss_kinds:
        if kind == "kd":
            for divergence in divergences:
                name = "kd" if len(divergences) == 1 else f"kd-{divergence}"
                plans.append(RunPlan(name, student, dataclasses.replace(plain_kd, divergence=divergence)))
        else:
            plans.append(RunPlan(kind, student, dataclasses.replace(plain_kd, kind=kind)))
    for temperature in temperatures:
        plans.append(RunPlan(f"kd-T{temperature:g}", student, dataclasses.replace(plain_kd, temperature=temperature)))
    for kd_weight in kd_weights:
        plans.append(RunPlan(f"kd-lambda{kd_weight:g}", student, dataclasses.replace(plain_kd, kd_weight=kd_weight)))
    if feature_align != "off":
        aligned = dataclasses.replace(plain_kd, feature_align=feature_align)
        plans.append(RunPlan(f"kd+{feature_align}", student, aligned))
    for other in extra_students:
        suffix = describe_student(other)
        plans.append(RunPlan(f"baseline@{suffix}", other, plans[0].loss))
        plans.append(RunPlan(f"kd@{suffix}", other, plain_kd))
    return _fold_identical(plans)


def _fold_identical(plans: Sequence[RunPlan]) -> List[RunPlan]:
    first: Dict[Tuple, int] = {}
    kept: List[RunPlan] = []
    for plan in plans:
        key = (plan.student, plan.loss)
        if key in first:
            earlier = kept[first[key]]
            kept[first[key]] = dataclasses.replace(earlier, also=earlier.also + (plan.name,))
        else:
            first[key] = len(kept)
            kept.append(plan)
    return kept


# --- the teacher -----------------------------------------------------------------------------------

def teacher_cache_path(cache_dir: str, cfg: models.TransformerConfig, optim: loop.OptimSettings,
                       corpus: data.Corpus, seed: int) -> str:
    key = json.dumps({"format": TEACHER_CACHE_FORMAT, "model": cfg.to_dict(), "optim": dataclasses.asdict(optim),
                      "corpus": corpus.digest, "seed": seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"teacher-{cfg.describe()}-{digest}.pt")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@dataclass
class TeacherInfo:
    description: str
    parameters: int
    val_loss: float
    source: str  # "trained", "cache" or "checkpoint"
    path: Optional[str] = None
    train_seconds: float = 0.0


def built_in_teacher(cfg: models.TransformerConfig, optim: loop.OptimSettings, corpus: data.Corpus,
                     eval_windows: torch.Tensor, *, seed: int, cache_dir: Optional[str], progress: bool,
                     log=print) -> Tuple[nn.Module, TeacherInfo]:
    """The teacher from the cache, or trained now (CE on the corpus) and then written to the cache."""
    path = teacher_cache_path(cache_dir, cfg, optim, corpus, seed) if cache_dir else None
    teacher = models.TinyTransformer(cfg)
    if path and os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(saved["state_dict"])
        info = TeacherInfo(cfg.describe(), models.count_parameters(teacher), float(saved["val_loss"]), "cache", path,
                           float(saved["train_seconds"]))
        return freeze(teacher), info

    log(f"training the teacher {cfg.describe()} ({models.count_parameters(teacher) / 1e6:.2f}M parameters, "
        f"{optim.steps} steps); it is cached for later runs")
    torch.manual_seed(seed)
    teacher = models.TinyTransformer(cfg)
    ce = loop.LossSpec(kind="ce")
    fitted = loop.fit(teacher, [], lambda inputs, targets: loop.student_objective(ce, teacher, None, inputs, targets),
                      data.train_batches(corpus.train, batch_size=optim.batch_size, context=cfg.context,
                                         steps=optim.steps, seed=seed),
                      optim, lambda: loop.evaluate(teacher, eval_windows), desc="teacher", progress=progress)
    info = TeacherInfo(cfg.describe(), models.count_parameters(teacher), fitted.final.val_loss, "trained", path,
                       fitted.seconds)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        torch.save({"state_dict": teacher.state_dict(), "val_loss": info.val_loss, "train_seconds": fitted.seconds,
                    "config": cfg.to_dict()}, partial)
        os.replace(partial, path)  # atomic: a concurrent reader sees the whole file or none
    return freeze(teacher), info


# --- the runs --------------------------------------------------------------------------------------

@dataclass
class RunSetup:
    """What every student run of one invocation shares: corpus, evaluation windows, the frozen
    teacher and its predictions, the schedule and the seed."""

    corpus: data.Corpus
    context: int
    eval_windows: torch.Tensor  # [N, context + 1]
    teacher: Optional[nn.Module]
    teacher_top1: Optional[torch.Tensor]  # [N, context]
    optim: loop.OptimSettings
    seed: int
    progress: bool = True


def build_student(source: StudentSource, vocab: int) -> nn.Module:
    if isinstance(source, models.TransformerConfig):
        return models.TinyTransformer(dataclasses.replace(source, vocab_size=vocab))
    return models.load_hf_model(source)


def _train_student(plan: RunPlan, setup: RunSetup, vocab: int, optim: loop.OptimSettings,
                   progress: bool) -> Tuple[nn.Module, loop.FitResult]:
    spec = plan.loss
    if spec.uses_teacher and setup.teacher is None:
        raise ValueError(f"run {plan.name!r} needs a teacher")
    # The same seed before every student: all runs start from the same weights and see the
    # same batches, so they differ only in the loss.
    torch.manual_seed(setup.seed)
    student = build_student(plan.student, vocab)
    student = parallel.prepare_student(student)
    align = None
    if spec.feature_align != "off":
        align = kdkernels.nn.FeatureAlignmentLoss(student.hidden_size, setup.teacher.hidden_size,
                                                  kind=spec.feature_align)
    teacher = setup.teacher if spec.uses_teacher else None

    def batch_loss(inputs, targets):
        inputs, targets = parallel.local_rows(inputs), parallel.local_rows(targets)
        return loop.student_objective(spec, student, teacher, inputs, targets, align)

    batches = data.train_batches(setup.corpus.train, batch_size=optim.batch_size, context=setup.context,
                                 steps=optim.steps, seed=setup.seed + 1)
    fitted = loop.fit(student, align.parameters() if align is not None else [], batch_loss, batches, optim,
                      lambda: loop.evaluate(student, setup.eval_windows, setup.teacher_top1),
                      desc=plan.name, progress=progress)
    return student, fitted


def warm_up(plans: Sequence[RunPlan], setup: RunSetup, vocab: int) -> None:
    """One unmeasured step per kind of run, so that one-time costs (code paths run for the first
    time, thread pools, allocator growth) land in no run's time or memory."""
    one_step = dataclasses.replace(setup.optim, steps=1, warmup_steps=1, eval_every=1)
    seen = set()
    for plan in plans:
        kind = (plan.student, plan.loss.kind, plan.loss.feature_align)
        if kind not in seen:
            seen.add(kind)
            _train_student(plan, dataclasses.replace(setup, eval_windows=setup.eval_windows[:1],
                                                     teacher_top1=None), vocab, one_step, progress=False)


def run_one(plan: RunPlan, setup: RunSetup, vocab: int, log=print) -> dict:
    """Trains one student per ``plan`` and returns its results record."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        student, fitted = _train_student(plan, setup, vocab, setup.optim, setup.progress)
        wall = time.perf_counter() - start
    spec = plan.loss
    record = {
        "name": plan.name,
        "also": list(plan.also),
        "objective": describe_loss(spec),
        "kind": spec.kind,
        "divergence": spec.divergence if spec.uses_teacher else None,
        "temperature": spec.temperature if spec.uses_teacher else None,
        "kd_weight": spec.kd_weight if spec.uses_teacher else 0.0,
        "feature_align": spec.feature_align,
        "fused_linear": spec.kind == "kd" and loop.fused_linear_available(),
        "student": describe_student(plan.student),
    }
    return measured_record(record, student, setup.optim.steps, fitted, wall, memory.peak_mib, log)


def measured_record(record: dict, student: nn.Module, steps: int, fitted: loop.FitResult, wall_s: float,
                    peak_mib: float, log=print) -> dict:
    """`record` (what a run trained: its name, objective, student) completed with what every run
    measures, and logged in one line."""
    record.update({
        "student_parameters": models.count_parameters(student),
        "steps": steps,
        "val_loss": fitted.final.val_loss,
        "perplexity": math.exp(fitted.final.val_loss),
        "top1_agreement": fitted.final.top1_agreement,
        "wall_time_s": wall_s,
        "peak_rss_mib": peak_mib,
        "curve": fitted.curve,
    })
    log(f"  {record['name']:<16} val loss {record['val_loss']:.4f}  ({wall_s:.1f} s)")
    return record
