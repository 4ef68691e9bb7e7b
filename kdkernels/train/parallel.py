"""``--parallel tp|fsdp``: the reference trainer on several processes, launched with ``torchrun``
(gloo on CPU), e.g. ``torchrun --nproc-per-node 2 -m kdkernels.train --quick --parallel tp``.

``tp``   Every rank holds the whole student and teacher and sees the same batches; the lm_head
         GEMMs and the KD loss are split along the vocabulary
         (:func:`kdkernels.distributed.vocab_parallel_fused_linear_kd_loss`): rank r computes only
         the logits of its rows of both lm_heads, and no rank ever holds a whole row of logits.
         The parameters stay replicated, so the student lm_head's gradient rows reach every
         replica through one all-reduce in backward (a model that keeps only its shard needs none).
``fsdp`` The student is wrapped in ``fully_shard`` (its lm_head on its own, so the fused loss
         receives the weight as a ``Shard(0)`` DTensor and gathers it once per step); each rank
         trains on its share of every batch's sequences, and FSDP averages the gradients.

Both train the same student as one process does, up to float rounding. Rank 0 prints and writes
the results; the other ranks stay silent.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import kdkernels
from kdkernels.distributed import vocab_parallel_fused_linear_kd_loss

MODES = ("none", "tp", "fsdp")
_mode = "none"
_owns_group = False  # init() created the process group (finish() destroys it)


def add_argument(group) -> None:
    group.add_argument("--parallel", choices=MODES, default="none",
                       help="under torchrun: split the lm_heads and the KD loss along the vocabulary (tp), "
                            "or shard the student with FSDP2 (fsdp) (%(default)s)")


def check(parser, args, kinds) -> None:
    """What --parallel supports: the fused lm_head KD loss and the CE baseline."""
    if args.parallel == "none":
        return
    if kinds != ["kd"] or args.feature_align != "off":
        parser.error("--parallel runs the kd loss (and the CE baseline) only: no --loss cakd/dkd, --cakd, "
                     "--dkd or --feature-align")
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        parser.error("--parallel needs several processes: launch with torchrun --nproc-per-node N -m kdkernels.train")


def init(mode: str) -> bool:
    """Joins the process group torchrun describes (gloo) for `mode`; returns whether this process
    is the one that reports (rank 0, or the only one). Other ranks' stdout goes to /dev/null."""
    global _mode, _owns_group
    _mode = mode
    if mode == "none":
        return True
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        _owns_group = True
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        return False
    return True


def finish() -> None:
    """Leaves the process group init() joined, every rank together, after a run that succeeded: a
    gloo group still alive at interpreter exit can abort a rank while its threads shut down. A
    group the caller made is left to the caller."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _owns_group = False


def mode() -> str:
    return _mode


def is_main() -> bool:
    return _mode == "none" or dist.get_rank() == 0


# --- fsdp -----------------------------------------------------------------------------------------

class _HiddenStates(nn.Module):
    """The student's ``hidden_states`` as a module forward, so that FSDP's hooks run around it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return type(self.model).hidden_states(self.model, input_ids)


def prepare_student(student: nn.Module) -> nn.Module:
    """fsdp: ``fully_shard`` on the lm_head alone (never called by the fused loss, so its weight
    stays a Shard(0) DTensor) and on everything else behind ``hidden_states``."""
    if _mode != "fsdp":
        return student
    from torch.distributed.fsdp import fully_shard

    fully_shard(student.lm_head)
    body = _HiddenStates(student)
    fully_shard(body)
    # an instance attribute, not a submodule: student.hidden_states(...) and student(...) now run
    # through FSDP's root hooks
    object.__setattr__(student, "hidden_states", body)
    return student


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """fsdp: this rank's contiguous share of a batch's sequences [B, ...]; otherwise the batch."""
    if _mode != "fsdp":
        return batch
    rank, world = dist.get_rank(), dist.get_world_size()
    if batch.shape[0] % world:
        raise ValueError(f"--parallel fsdp needs a batch size divisible by the {world} ranks, got {batch.shape[0]}")
    share = batch.shape[0] // world
    return batch[rank * share:(rank + 1) * share]


# --- tp -------------------------------------------------------------------------------------------

def _vocab_bounds(vocab: int) -> Tuple[int, int]:
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank * vocab // world, (rank + 1) * vocab // world


class _ReplicatedRows(torch.autograd.Function):
    """weight[start:end] of a replicated parameter; backward places the rows' gradient in a full
    zero gradient and sums it over the ranks, which own disjoint rows."""

    @staticmethod
    def forward(ctx, weight, start, end):
        ctx.shape, ctx.rows = weight.shape, (start, end)
        return weight[start:end].clone()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[ctx.rows[0]:ctx.rows[1]] = grad
        dist.all_reduce(full)
        return full, None, None


def _rows(tensor: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    return _ReplicatedRows.apply(tensor, start, end) if tensor.requires_grad else tensor[start:end]


def fused_linear_kd_loss(student: nn.Module, teacher: nn.Module, hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                         labels: torch.Tensor, **options) -> torch.Tensor:
    """The fused lm_head KD loss of the trainer's kd runs, split as ``mode()`` says; hidden states
    ``[N, D_s]`` / ``[N, D_t]``, labels ``[N]``."""
    vocab = min(student.vocab_size, teacher.vocab_size)
    weight, bias = student.lm_head.weight, student.lm_head.bias
    teacher_weight, teacher_bias = teacher.lm_head.weight, teacher.lm_head.bias
    if _mode == "tp":
        start, end = _vocab_bounds(vocab)
        return vocab_parallel_fused_linear_kd_loss(
            hidden, _rows(weight, start, end), teacher_hidden, teacher_weight[start:end], labels,
            student_bias=_rows(bias, start, end),
            teacher_bias=None if teacher_bias is None else teacher_bias[start:end], **options)
    if student.vocab_size != vocab:  # a sharded weight is sliced only when it must be
        weight, bias = weight[:vocab], (None if bias is None else bias[:vocab])
    return kdkernels.fused_linear_kd_loss(
        hidden, weight, teacher_hidden, teacher_weight[:vocab], labels, student_bias=bias,
        teacher_bias=None if teacher_bias is None else teacher_bias[:vocab], **options)
