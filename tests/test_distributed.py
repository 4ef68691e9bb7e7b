"""Vocab-parallel KD losses (kdkernels.distributed) on gloo process groups of 2 and 3 CPU processes.

Each test spawns one process group and runs a batch of checks in it (spawning costs seconds per
group); every rank builds the same full tensors from fixed seeds and keeps its shard, so the
single-process losses on the full tensors are the expected values. A group that does not finish
within GROUP_TIMEOUT_S is killed and the test fails: a hang is a failure, never a stuck CI job.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels
from kdkernels import distributed as kdd

from conftest import DIVERGENCE_NAMES, assert_within_eager_error, make_labels, make_pair

GROUP_TIMEOUT_S = 300
# gloo's own timeout: a collective that a rank never joins fails there instead of waiting forever
# (generous: a loaded CI machine can delay one rank by tens of seconds)
COLLECTIVE_TIMEOUT_S = 120
FP32_RTOL = 1e-5


# --- process groups -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        worker(rank, world)
        # every rank done before any tears gloo down: a rank that exits while another still
        # talks to it can abort the other ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(world: int, worker) -> None:
    """Runs worker(rank, world) on `world` gloo processes; re-raises a rank's failure; kills the
    group and fails when it runs past GROUP_TIMEOUT_S."""
    context = mp.start_processes(_entry, args=(world, _free_port(), worker), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process group did not finish within {GROUP_TIMEOUT_S} s (a hang)")


def shard_bounds(split, rank):
    start = sum(split[:rank])
    return start, start + split[rank]


# --- collectives, counted ------------------------------------------------------------------------

class CollectiveLog:
    """Wraps the torch.distributed calls the losses use and records (phase, name, elements, dtype)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single", "reduce")

    def __init__(self):
        self.records = []
        self.phase = "forward"
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                moved = max((t.numel() for t in tensors), default=0)
                dtype = tensors[0].dtype if tensors else None
                self.records.append((self.phase, _name, moved, dtype))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def data(self, phase):
        """Collectives that carry data (the metadata all-gather is int64)."""
        return [r for r in self.records if r[0] == phase and r[3] != torch.int64]


# --- the logits loss against single-process kd_loss ---------------------------------------------

N_ROWS, VOCAB = 7, 13
IGNORED = [2, 5]


def _inputs(dtype=torch.float32, shape=(N_ROWS, VOCAB)):
    """Full student/teacher logits with masked entries (-inf on both sides: one whole first-shard
    row included) and labels with ignored rows, the same on every rank."""
    student, teacher = make_pair(shape, dtype, seed=3)
    flat_s, flat_t = student.view(-1, VOCAB), teacher.view(-1, VOCAB)
    for row, col in ((0, 0), (0, 1), (1, 7), (3, 12), (4, 4), (6, 9)):
        flat_s[row, col] = flat_t[row, col] = -math.inf
    flat_s[3, :4] = flat_t[3, :4] = -math.inf  # the first 4 columns (rank 0's shard) of row 3
    labels = make_labels(shape[:-1], VOCAB, seed=3)
    flat_labels = labels.view(-1)
    flat_labels[IGNORED] = -100
    for row in range(flat_labels.numel()):  # labels never on a masked entry (the CE would be infinite)
        while flat_labels[row] != -100 and torch.isinf(flat_s[row, flat_labels[row]]):
            flat_labels[row] = (flat_labels[row] + 1) % VOCAB
    return student, teacher, labels


CASES = (
    [dict(divergence=d, temperature=2.0, ce_weight=0.5, kd_weight=0.7) for d in DIVERGENCE_NAMES]
    + [dict(divergence=d, beta=0.2) for d in ("jsd", "skew_kl", "skew_reverse_kl")]
    + [dict(divergence="jsd", beta=1.0), dict(divergence="skew_kl", beta=1.0),
       dict(divergence="skew_reverse_kl", beta=1.0), dict(divergence="skew_kl", beta=0.0)]
    + [dict(divergence="reverse_kl", reduction=r, ce_weight=0.3) for r in ("mean", "batchmean", "sum", "none")]
    + [dict(divergence="tvd", temperature=3.0, scale_by_t2=False, reduction="sum"),
       dict(divergence="forward_kl", ce_weight=1.0, temperature=1.0)]
)


def _single_process(student, teacher, labels, case, grad_weights):
    student = student.detach().clone().requires_grad_(True)
    loss = kdkernels.kd_loss(student, teacher, labels, **case)
    (loss * grad_weights).sum().backward()
    return loss.detach(), student.grad


def _vocab_parallel(student_shard, teacher_shard, labels, case, grad_weights, **kw):
    student_shard = student_shard.detach().clone().requires_grad_(True)
    loss = kdd.vocab_parallel_kd_loss(student_shard, teacher_shard, labels, **case, **kw)
    (loss * grad_weights).sum().backward()
    return loss.detach(), student_shard.grad


def _assert_close(actual, expected, what, rtol=FP32_RTOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol} x {scale:.3e}"


def _grad_weights(case, batch_shape):
    if case.get("reduction") == "none":
        return torch.linspace(0.5, 1.5, math.prod(batch_shape)).reshape(batch_shape)
    return torch.tensor(0.7)  # an incoming gradient that is not 1


def _check_logits_cases(rank, split, cases=CASES, shape=(N_ROWS, VOCAB)):
    student, teacher, labels = _inputs(shape=shape)
    lo, hi = shard_bounds(split, rank)
    for case in cases:
        weights = _grad_weights(case, shape[:-1])
        expected_loss, expected_grad = _single_process(student, teacher, labels, case, weights)
        loss, grad = _vocab_parallel(student[..., lo:hi], teacher[..., lo:hi], labels, case, weights)
        _assert_close(loss, expected_loss, f"loss {case}")
        _assert_close(grad, expected_grad[..., lo:hi], f"gradient {case}")


def _check_bf16(rank, split):
    """bf16 shards: error against the float64 oracle within 2x eager PyTorch's at bf16."""
    student, teacher, labels = _inputs(torch.bfloat16)
    lo, hi = shard_bounds(split, rank)
    for divergence in DIVERGENCE_NAMES:
        case = dict(divergence=divergence, temperature=2.0, ce_weight=0.5, beta=0.3)
        weights = torch.tensor(1.0)
        loss, grad = _vocab_parallel(student[:, lo:hi], teacher[:, lo:hi], labels, case, weights)
        eager = _single_process(student, teacher, labels, dict(case, backend="reference"), weights)
        oracle = _single_process(student.double(), teacher.double(), labels, dict(case, backend="reference"),
                                 weights.double())
        assert grad.dtype == torch.bfloat16
        assert_within_eager_error(loss, eager[0], oracle[0], what=f"bf16 loss {divergence}",
                                  floor_dtype=torch.float32)
        assert_within_eager_error(grad, eager[1][:, lo:hi], oracle[1][:, lo:hi], what=f"bf16 gradient {divergence}")


def _check_collective_counts(rank, split):
    """<= 2 data collectives per forward, each of O(N) elements; none in backward."""
    student, teacher, labels = _inputs()
    lo, hi = shard_bounds(split, rank)
    world = len(split)
    for divergence in DIVERGENCE_NAMES:
        for ce_weight, temperature in ((0.0, 1.0), (0.5, 2.0)):
            shard = student[:, lo:hi].clone().requires_grad_(True)
            with CollectiveLog() as log:
                loss = kdd.vocab_parallel_kd_loss(shard, teacher[:, lo:hi], labels, divergence=divergence,
                                                  ce_weight=ce_weight, temperature=temperature)
                log.phase = "backward"
                (loss * 0.5).backward()
            forward = log.data("forward")
            assert len(forward) <= 2, f"{divergence}: {len(forward)} data collectives in forward: {forward}"
            # O(N): at most 4 values per row and rank (3 statistics + the shard width / 4 partials)
            assert all(moved <= 4 * N_ROWS * world + world for _, _, moved, _ in forward), forward
            assert log.data("backward") == [] and [r for r in log.records if r[0] == "backward"] == []
            metadata = [r for r in log.records if r[3] == torch.int64]
            assert len(metadata) == 1 and metadata[0][2] <= 16 * world, metadata
    with CollectiveLog() as log:  # the metadata check off: the two data collectives only
        kdd.vocab_parallel_kd_loss(student[:, lo:hi], teacher[:, lo:hi], labels, divergence="jsd",
                                   check_consistency=False)
    assert len(log.records) == 2, log.records


def _check_no_grad_and_inputs(rank, split):
    """no_grad pays no gradient; [B, S, V] input; equal loss on every rank; the gradient buffer
    handed out is never written by a second backward."""
    student, teacher, labels = _inputs()
    lo, hi = shard_bounds(split, rank)
    with torch.no_grad():
        loss = kdd.vocab_parallel_kd_loss(student[:, lo:hi], teacher[:, lo:hi], labels, divergence="tvd")
    expected = kdkernels.kd_loss(student, teacher, labels, divergence="tvd")
    _assert_close(loss, expected, "no_grad loss")
    losses = [torch.zeros(()) for _ in split]
    dist.all_gather(losses, loss)
    assert all(bool(l == losses[0]) for l in losses), losses
    shard = student[:, lo:hi].clone().requires_grad_(True)
    loss = kdd.vocab_parallel_kd_loss(shard, teacher[:, lo:hi], labels, divergence="reverse_kl")
    loss.backward(retain_graph=True)
    first = shard.grad.clone()
    shard.grad = None
    (loss * 3.0).backward()
    _assert_close(shard.grad, 3.0 * first, "a second backward with grad_output 3")
    shard.grad = None
    loss = kdd.vocab_parallel_kd_loss(shard, teacher[:, lo:hi], labels, divergence="tvd")
    (grad,) = torch.autograd.grad(loss, shard, create_graph=True)
    with pytest.raises(RuntimeError):  # first-order, like the fused kernels: no silent wrong second derivative
        grad.sum().backward()
    for reduction in ("mean", "batchmean", "sum", "none"):  # no rows: loss 0 (empty), no gradient
        empty = torch.zeros(0, hi - lo, requires_grad=True)
        loss = kdd.vocab_parallel_kd_loss(empty, torch.zeros(0, hi - lo), torch.zeros(0, dtype=torch.long),
                                          ce_weight=0.5, divergence="jsd", reduction=reduction)
        loss.sum().backward()
        assert loss.shape == ((0,) if reduction == "none" else ()) and float(loss.sum()) == 0.0
        assert empty.grad.shape == (0, hi - lo)
    shape = (1, N_ROWS, VOCAB)
    _check_logits_cases(rank, split, cases=[dict(divergence="skew_kl", beta=0.1, ce_weight=0.2)], shape=shape)


def _check_mismatches(rank, world, split):
    """Ranks that disagree raise on every rank (the group stays usable afterwards)."""
    student, teacher, labels = _inputs()
    lo, hi = shard_bounds(split, rank)
    s, t = student[:, lo:hi], teacher[:, lo:hi]
    last = world - 1

    def expect(match, **overrides):
        kwargs = dict(student_logits=s, teacher_logits=t, labels=labels, divergence="jsd")
        if rank == last:
            kwargs.update(overrides)
        started = time.monotonic()
        with pytest.raises((ValueError, TypeError), match=match):
            kdd.vocab_parallel_kd_loss(**kwargs)
        assert time.monotonic() - started < COLLECTIVE_TIMEOUT_S / 2

    expect("number of rows", student_logits=s[:-1], teacher_logits=t[:-1], labels=labels[:-1])
    expect("loss options", temperature=2.0)
    expect("loss options", divergence="tvd")
    expect("dtypes", student_logits=s.double(), teacher_logits=t.double())
    expect("labels", labels=labels.flip(0))
    own = "temperature" if rank == last else r"rank\(s\) \[%d\]" % last
    expect(own, temperature=-1.0)
    # a rank whose teacher shard is not as wide as its student shard (the vocabulary split)
    own = "teacher_logits shape" if rank == last else "rejected"
    expect(own, teacher_logits=t[:, :-1])
    # bad values seen on one rank's shard only raise on every rank
    bad = t.clone()
    if rank == 0:
        bad[1, 0] = math.nan
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        kdd.vocab_parallel_kd_loss(s, bad, labels)
    wrong = labels.clone()
    wrong[0] = VOCAB
    with pytest.raises(ValueError, match=f"labels must lie in \\[0, {VOCAB}\\)"):
        kdd.vocab_parallel_kd_loss(s, t, wrong, ce_weight=0.5)
    hole = s.clone()
    hole[0, :] = -math.inf  # the student row -inf where the teacher has mass (forward KL infinite)
    if rank == last:
        with pytest.raises(ValueError, match="student_logits"):
            kdd.vocab_parallel_kd_loss(hole, t, labels)
    else:
        with pytest.raises(ValueError, match="student_logits"):
            kdd.vocab_parallel_kd_loss(s, t, labels)
    # and the group still works
    kdd.vocab_parallel_kd_loss(s, t, labels)


# --- DTensor --------------------------------------------------------------------------------------

def _check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    student, teacher, labels = _inputs()
    for placement in (Shard(1), Shard(-1), Replicate()):
        case = dict(divergence="skew_reverse_kl", beta=0.3, temperature=2.0, ce_weight=0.4)
        expected_loss, expected_grad = _single_process(student, teacher, labels, case, torch.tensor(1.0))
        student_d = distribute_tensor(student, mesh, [placement]).requires_grad_(True)
        teacher_d = distribute_tensor(teacher, mesh, [placement])
        loss = kdkernels.kd_loss(student_d, teacher_d, labels, **case)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        loss.backward()
        _assert_close(loss.to_local().detach(), expected_loss, f"DTensor {placement} loss")
        assert isinstance(student_d.grad, DTensor) and student_d.grad.placements == student_d.placements
        _assert_close(student_d.grad.full_tensor(), expected_grad, f"DTensor {placement} gradient")
    # the README's recipe: ColwiseParallel lm_heads whose outputs stay DTensors placed Shard(-1)
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(3)
    head, teacher_head = torch.nn.Linear(HIDDEN, VOCAB), torch.nn.Linear(HIDDEN, VOCAB)
    hidden, head_labels = _linear_inputs()[0], _linear_inputs()[-1]
    case = dict(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)
    expected = kdkernels.kd_loss(head(hidden), teacher_head(hidden).detach(), head_labels, **case)
    expected.backward()
    expected_grad = head.weight.grad.clone()
    head.weight.grad = None
    for module in (head, teacher_head):
        parallelize_module(module, mesh, ColwiseParallel(use_local_output=False))
    loss = kdkernels.kd_loss(head(hidden), teacher_head(hidden).detach(), head_labels, **case)
    loss.backward()
    _assert_close(loss.to_local().detach(), expected.detach(), "ColwiseParallel lm_head loss")
    _assert_close(head.weight.grad.full_tensor(), expected_grad, "ColwiseParallel lm_head weight gradient")
    with pytest.raises(TypeError, match="teacher_logits must be one too"):
        kdkernels.kd_loss(distribute_tensor(student, mesh, [Shard(1)]), teacher, labels)
    with pytest.raises(ValueError, match="Shard\\(-1\\) .* or Replicate"):
        kdkernels.kd_loss(distribute_tensor(student, mesh, [Shard(0)]),
                          distribute_tensor(teacher, mesh, [Shard(0)]), labels)


# --- tensor-parallel fused lm_head ----------------------------------------------------------------

HIDDEN = 5


def _linear_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=gen).to(dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(dtype)
    bias = torch.randn(VOCAB, generator=gen).to(dtype)
    teacher_hidden = torch.randn(N_ROWS, HIDDEN + 1, generator=gen).to(dtype)
    teacher_weight = torch.randn(VOCAB, HIDDEN + 1, generator=gen).to(dtype)
    labels = make_labels((N_ROWS,), VOCAB, seed=5)
    labels[IGNORED] = -100
    return hidden, weight, bias, teacher_hidden, teacher_weight, labels


def _check_fused_linear(rank, split):
    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _linear_inputs()
    lo, hi = shard_bounds(split, rank)
    world = len(split)
    cases = [dict(divergence="forward_kl", ce_weight=0.5, temperature=2.0, chunk_size=3),
             dict(divergence="jsd", beta=0.3, softcap=4.0, logit_scale=0.8),
             dict(divergence="tvd", reduction="none", chunk_size=4),
             dict(divergence="skew_kl", beta=0.2, reduction="sum", teacher_logits=True)]
    for case in cases:
        case = dict(case)
        given_logits = case.pop("teacher_logits", False)
        teacher = (dict(teacher_logits=teacher_hidden @ teacher_weight.t()) if given_logits
                   else dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight))
        weights = _grad_weights(case, (N_ROWS,))
        params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = kdkernels.fused_linear_kd_loss(params[0], params[1], labels=labels, student_bias=params[2],
                                              **teacher, **case)
        (loss * weights).sum().backward()
        expected = [loss.detach()] + [p.grad for p in params]

        shard_teacher = ({"teacher_logits": teacher["teacher_logits"][:, lo:hi]} if given_logits
                         else dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight[lo:hi]))
        params = [hidden.clone().requires_grad_(True), weight[lo:hi].clone().requires_grad_(True),
                  bias[lo:hi].clone().requires_grad_(True)]
        with CollectiveLog() as log:
            loss = kdd.vocab_parallel_fused_linear_kd_loss(params[0], params[1], labels=labels,
                                                           student_bias=params[2], **shard_teacher, **case)
            log.phase = "backward"
            (loss * weights).sum().backward()
        _assert_close(loss.detach(), expected[0], f"fused-linear loss {case}")
        _assert_close(params[0].grad, expected[1], f"fused-linear hidden gradient {case}")
        _assert_close(params[1].grad, expected[2][lo:hi], f"fused-linear weight gradient {case}")
        _assert_close(params[2].grad, expected[3][lo:hi], f"fused-linear bias gradient {case}")
        chunk = case.get("chunk_size", N_ROWS)
        n_chunks = -(-N_ROWS // chunk)
        assert len(log.data("forward")) <= 2 * n_chunks, log.records
        assert all(moved <= 4 * chunk * world + world for _, _, moved, _ in log.data("forward"))
        backward = log.data("backward")
        # one all-reduce of dL/dhidden [N, H] (+ the recomputed chunks' collectives for "none")
        sums = [r for r in backward if r[2] == N_ROWS * HIDDEN]
        assert len(sums) == 1, backward
        assert len(backward) == 1 + (2 * n_chunks if case.get("reduction") == "none" else 0), backward


def _check_fused_linear_bf16(rank, split):
    """bf16 lm_heads: loss and gradients against the float64 oracle within 2x eager PyTorch's error
    at bf16 (the reference backend on the same bf16 tensors)."""
    lo, hi = shard_bounds(split, rank)
    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _linear_inputs(torch.bfloat16)
    case = dict(divergence="reverse_kl", ce_weight=0.5, temperature=2.0, chunk_size=4)

    def single(dtype, backend):
        params = [t.detach().to(dtype).requires_grad_(True) for t in (hidden, weight)]
        loss = kdkernels.fused_linear_kd_loss(params[0], params[1], teacher_hidden.to(dtype),
                                              teacher_weight.to(dtype), labels, backend=backend, **case)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    eager, oracle = single(torch.bfloat16, "reference"), single(torch.float64, "reference")
    params = [hidden.clone().requires_grad_(True), weight[lo:hi].clone().requires_grad_(True)]
    loss = kdd.vocab_parallel_fused_linear_kd_loss(params[0], params[1], teacher_hidden, teacher_weight[lo:hi],
                                                   labels, **case)
    loss.backward()
    assert params[0].grad.dtype == params[1].grad.dtype == torch.bfloat16
    assert_within_eager_error(loss.detach(), eager[0], oracle[0], what="bf16 fused-linear loss",
                              floor_dtype=torch.float32)
    assert_within_eager_error(params[0].grad, eager[1], oracle[1], what="bf16 fused-linear hidden gradient")
    assert_within_eager_error(params[1].grad, eager[2][lo:hi], oracle[2][lo:hi],
                              what="bf16 fused-linear weight gradient")


# --- FSDP2: a fully_shard student whose lm_head weight reaches the loss as a sharded DTensor -----

def _fsdp_student(vocab, hidden, features):
    torch.manual_seed(21)
    body = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh())
    model = torch.nn.Module()
    model.body, model.lm_head = body, torch.nn.Linear(hidden, vocab, bias=False)
    return model


def _check_fsdp_training(rank, world):
    """5 SGD steps of a 2-rank fully_shard student on its half of each batch end with the
    parameters of the single-process run on the whole batch; the lm_head is gathered once per
    step and the gathered weight is freed when the loss returns."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    vocab, hidden, features, rows, steps = VOCAB, 6, 4, 8, 5
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(rows, features, generator=gen), torch.randn(rows, hidden + 1, generator=gen),
                torch.randint(0, vocab, (rows,), generator=gen)) for _ in range(steps)]
    teacher_weight = torch.randn(vocab, hidden + 1, generator=gen)
    options = dict(divergence="jsd", beta=0.4, temperature=2.0, ce_weight=0.5, chunk_size=3)

    def step(model, optimizer, inputs, teacher_hidden, labels):
        loss = kdkernels.fused_linear_kd_loss(model.body(inputs), model.lm_head.weight, teacher_hidden,
                                              teacher_weight, labels, **options)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    single = _fsdp_student(vocab, hidden, features)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.5)
    for inputs, teacher_hidden, labels in batches:
        step(single, optimizer, inputs, teacher_hidden, labels)

    sharded = _fsdp_student(vocab, hidden, features)
    fully_shard(sharded.body)
    fully_shard(sharded.lm_head)  # never called: its weight stays a Shard(0) DTensor
    fully_shard(sharded)
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.5)
    gathered = []
    original = DTensor.full_tensor

    def counting_full_tensor(self, **kwargs):
        result = original(self, **kwargs)
        gathered.append(weakref.ref(result))
        return result

    DTensor.full_tensor = counting_full_tensor
    try:
        half = slice(rank * rows // world, (rank + 1) * rows // world)
        for number, (inputs, teacher_hidden, labels) in enumerate(batches, start=1):
            assert isinstance(sharded.lm_head.weight, DTensor)
            loss = kdkernels.fused_linear_kd_loss(sharded.body(inputs[half]), sharded.lm_head.weight,
                                                  teacher_hidden[half], teacher_weight, labels[half], **options)
            assert len(gathered) == number, f"step {number}: lm_head gathered {len(gathered)} times"
            assert gathered[-1]() is None, "the gathered lm_head weight outlived the loss call"
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        DTensor.full_tensor = original
    for (name, expected), actual in zip(single.named_parameters(), sharded.parameters()):
        _assert_close(actual.full_tensor().detach(), expected.detach(), f"FSDP2 parameter {name} after {steps} steps")


# --- the groups ------------------------------------------------------------------------------------

def _two_rank_worker(rank, world):
    split = [5, 8]  # uneven
    _check_logits_cases(rank, split)
    _check_bf16(rank, split)
    _check_collective_counts(rank, split)
    _check_fused_linear(rank, split)
    _check_fused_linear_bf16(rank, split)
    _check_dtensor(rank, world)
    _check_fsdp_training(rank, world)


def _three_rank_worker(rank, world):
    split = [4, 6, 3]
    _check_logits_cases(rank, split)
    _check_no_grad_and_inputs(rank, split)
    _check_fused_linear(rank, split)
    _check_dtensor(rank, world)  # V=13 over 3 ranks: torch's split 5, 5, 3
    _check_mismatches(rank, world, split)


def test_two_ranks_match_single_process():
    run_group(2, _two_rank_worker)


def test_three_ranks_match_single_process_and_mismatches_raise():
    run_group(3, _three_rank_worker)
