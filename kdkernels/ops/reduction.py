"""Reductions of per-row (per-token) losses, the one definition every loss uses:

    mean:       sum over counted rows / number of counted rows (0 when none is counted)
    batchmean:  sum / size(0) of the batch dimensions (as F.kl_div)
    sum:        sum
    none:       the per-row losses, shaped like the batch dimensions; uncounted rows hold 0

A row is counted unless its label is ``ignore_index`` (logit losses) or its mask is False
(feature losses).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def reduction_scale(counted: Optional[torch.Tensor], reduction: str, n_rows: int,
                    batch_shape: Sequence[int], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The factor on sum(row_loss) that gives the reduced loss, as a 0-dim tensor on the rows'
    device (no host sync): 1 / counted rows (mean), 1 / size(0) (batchmean), 1.

    counted: bool [n_rows] (None: every row counts). dtype: float32 for the kernels (the backend
    contract), the loss dtype for the differentiable paths."""
    if reduction == "mean":
        if counted is None:
            return torch.tensor(1.0 / max(n_rows, 1), dtype=dtype, device=device)
        return counted.sum().clamp(min=1).to(dtype).reciprocal()
    if reduction == "batchmean":
        first = batch_shape[0] if len(batch_shape) else 1
        return torch.tensor(1.0 / max(first, 1), dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)


def reduce_rows(row_loss: torch.Tensor, scale: torch.Tensor, reduction: str,
                batch_shape: Sequence[int]) -> torch.Tensor:
    """row_loss [n_rows], already 0 on uncounted rows -> the reduced loss."""
    if reduction == "none":
        return row_loss.reshape(tuple(batch_shape))
    return row_loss.sum() * scale.to(row_loss.dtype)


def counted_rows(labels: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """bool [n_rows]: the rows whose label is not ignore_index (None without labels)."""
    return None if labels is None else labels != ignore_index


def reduce_masked(row_loss: torch.Tensor, counted: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Reduces a differentiable row_loss [*batch] whose uncounted rows (counted False) may hold
    anything, even inf / NaN: they are replaced by 0 (a select, so their gradient is 0 too)."""
    if counted is not None:
        row_loss = torch.where(counted, row_loss, torch.zeros((), dtype=row_loss.dtype, device=row_loss.device))
    batch_shape = tuple(row_loss.shape)
    flat = row_loss.reshape(-1)
    scale = reduction_scale(None if counted is None else counted.reshape(-1), reduction, flat.shape[0],
                            batch_shape, flat.device, flat.dtype)
    return reduce_rows(flat, scale, reduction, batch_shape)
