"""torch.autocast for the public losses: the casts a linear layer followed by a loss would get.

Under autocast a matmul runs in the autocast dtype (its floating inputs other than float64 are
cast to it) and a loss runs in float32. kdkernels' losses on logits already compute in float32
whatever the input dtype and return the gradient in each input's dtype, which is what autocast's
float32 cast of a loss input gives; they need nothing here. A loss that contains the lm_head
matmul (fused_linear_kd_loss) casts the lm_head inputs as autocast casts a matmul's, then runs
with autocast off, so that its own GEMMs keep the dtypes it chose (the float32 accumulation of
the weight gradient stays float32). The casts are ordinary differentiable ``Tensor.to`` calls:
the gradients reach the caller's tensors in their own dtypes, as through autocast's casts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch


def _castable(value) -> bool:
    # autocast casts floating tensors except float64
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def autocast_as_matmul_inputs(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: under ``torch.autocast`` on the device of the function's first argument, the
    arguments ``names`` (floating tensors, not float64) are cast to the autocast dtype and the
    function runs with autocast disabled; without autocast it runs as it is."""

    def decorate(loss_fn: Callable) -> Callable:
        parameters = inspect.signature(loss_fn).parameters
        unknown = set(names) - set(parameters)
        if unknown:
            raise TypeError(f"{loss_fn.__name__} has no parameters {sorted(unknown)}")
        positional = [name for name, p in parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        cast_positions = frozenset(i for i, name in enumerate(positional) if name in names)
        cast_names = frozenset(names)

        @functools.wraps(loss_fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get(positional[0])
            device_type = first.device.type if isinstance(first, torch.Tensor) else None
            if device_type is None or not torch.is_autocast_enabled(device_type):
                return loss_fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)

            def cast(value):
                return value.to(dtype) if _castable(value) else value

            args = tuple(cast(a) if i in cast_positions else a for i, a in enumerate(args))
            kwargs = {k: cast(v) if k in cast_names else v for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return loss_fn(*args, **kwargs)

        return wrapper

    return decorate
