"""Distillation from a teacher cache (kdkernels.teacher_cache): the trainer's sparse-teacher runs.

The cache holds the teacher's top-k log-probabilities for exactly the windows the students train
on (the same seed gives the same batches), so a sparse run differs from the dense ``kd`` run only
in the teacher it sees: ``(1 − λ)·CE + λ·T²·D`` with
``kdkernels.fused_linear_sparse_kd_loss(hidden, lm_head, ids, logprobs, missing_mass=...)``.
``--sparse-teacher K`` builds the cache first (or reuses one built for the same teacher and
windows); ``--teacher-cache DIR`` chooses where it lives, or names an existing one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import List, Optional

import torch

import kdkernels
from kdkernels import teacher_cache
from kdkernels.train import data, loop, models
from kdkernels.train.experiments import measured_record
from kdkernels.train.memory import PeakMemory


def training_windows(setup, optim: loop.OptimSettings) -> torch.Tensor:
    """Every student's training inputs, in order: [steps * batch, context]."""
    batches = data.train_batches(setup.corpus.train, batch_size=optim.batch_size, context=setup.context,
                                 steps=optim.steps, seed=setup.seed + 1)
    return torch.cat([batch[:, :-1] for batch in batches])


def ensure_cache(path: str, setup, optim: loop.OptimSettings, k: int, progress: bool) -> teacher_cache.TeacherCacheDataset:
    """The cache at `path` for this run's teacher and training windows, built (or finished) now
    if needed; the writer refuses a directory that holds another teacher's or other windows."""
    windows = training_windows(setup, optim)
    teacher_cache.build_teacher_cache(setup.teacher, windows, path, k=k, batch_size=64, sequences_per_shard=1024,
                                      progress=progress)
    return teacher_cache.TeacherCacheDataset(path, vocab_size=setup.teacher.vocab_size)


def default_cache_path(cache_dir: str, setup, k: int) -> str:
    return os.path.join(cache_dir, f"teacher-top{k}-seed{setup.seed}")


def run_sparse(cache: teacher_cache.TeacherCacheDataset, setup, vocab: int, base_loss: loop.LossSpec,
               student_source, missing_mass: str = "residual", log=print) -> dict:
    """Trains the student from `cache` like experiments.run_one trains the dense runs; returns its record."""
    optim = setup.optim
    spec = dataclasses.replace(base_loss, kind="kd", feature_align="off")
    name = f"kd-top{cache.k}"
    with PeakMemory() as memory:
        start = time.perf_counter()
        torch.manual_seed(setup.seed)  # the same initial student as every other run
        student = models.TinyTransformer(dataclasses.replace(student_source, vocab_size=vocab)) \
            if isinstance(student_source, models.TransformerConfig) else models.load_hf_model(student_source)
        step = [0]

        def batch_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            rows = range(step[0] * optim.batch_size, (step[0] + 1) * optim.batch_size)
            step[0] += 1
            items = [cache[i] for i in rows]
            cached_inputs = torch.stack([item["input_ids"] for item in items])
            if not torch.equal(cached_inputs, inputs):
                raise ValueError("the teacher cache does not hold this run's training windows (another seed, "
                                 "corpus or batch size): rebuild it")
            ids = torch.stack([item["teacher_ids"] for item in items]).flatten(0, 1)  # [B*S, k]
            logprobs = torch.stack([item["teacher_logprobs"] for item in items]).flatten(0, 1)
            hidden = student.hidden_states(inputs).flatten(0, 1)  # [B*S, D]
            weight, bias = student.lm_head.weight[:vocab], student.lm_head.bias
            return kdkernels.fused_linear_sparse_kd_loss(
                hidden, weight, ids, logprobs, targets.reshape(-1), student_bias=None if bias is None else bias[:vocab],
                missing_mass=missing_mass, teacher_temperature=cache.generation_temperature,
                divergence=spec.divergence if missing_mass != "renormalize" else "forward_kl",
                temperature=spec.temperature, beta=spec.beta, kd_weight=spec.kd_weight, ce_weight=1.0 - spec.kd_weight)

        batches = data.train_batches(setup.corpus.train, batch_size=optim.batch_size, context=setup.context,
                                     steps=optim.steps, seed=setup.seed + 1)
        fitted = loop.fit(student, [], batch_loss, batches, optim,
                          lambda: loop.evaluate(student, setup.eval_windows, setup.teacher_top1),
                          desc=name, progress=setup.progress)
        wall = time.perf_counter() - start
    record = {
        "name": name,
        "objective": f"KD top-{cache.k} {missing_mass} {spec.divergence} T={spec.temperature:g} λ={spec.kd_weight:g}",
        "kind": "sparse-kd",
        "divergence": spec.divergence,
        "temperature": spec.temperature,
        "kd_weight": spec.kd_weight,
        "feature_align": "off",
        "fused_linear": True,
        "teacher_cache": cache.path,
        "student": student_source.describe() if isinstance(student_source, models.TransformerConfig)
        else os.path.basename(os.path.normpath(student_source)),
    }
    return measured_record(record, student, optim.steps, fitted, wall, memory.peak_mib, log)


def sparse_runs(args, setup, vocab: int, base_loss: loop.LossSpec, student_source) -> List[dict]:
    """The runs --sparse-teacher K / --teacher-cache DIR ask for (none without them)."""
    k: Optional[int] = args.sparse_teacher
    if k is None and args.teacher_cache is None:
        return []
    path = args.teacher_cache or default_cache_path(args.cache_dir, setup, k)
    if k is None:  # an existing cache: its own k
        cache = teacher_cache.TeacherCacheDataset(path, vocab_size=setup.teacher.vocab_size)
    else:
        print(f"teacher cache {path}: top-{k} log-probs of the teacher on the training windows")
        cache = ensure_cache(path, setup, setup.optim, k, progress=setup.progress)
    return [run_sparse(cache, setup, vocab, base_loss, student_source, args.sparse_missing_mass)]
