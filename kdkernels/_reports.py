"""Where a GPU kernel's report of bad input becomes an error.

The GPU kernels (``BAD_INPUT_AS_NAN`` in kdkernels.backends) do not stop on bad input: a row whose
logits hold NaN / +inf, whose label lies outside [0, V), or whose loss the student's -inf entries
make infinite gets a NaN row loss. One check per call turns that into an error, in one of two modes:

``"device"`` (the default)
    On GPU tensors, ``torch._assert_async`` on a device flag (any row loss NaN): the check is
    queued on the stream like a kernel, with no device-to-host read, so a training step keeps
    running ahead of the host, fits in a CUDA graph and compiles whole. A failed check surfaces at
    the next synchronising CUDA call as a device-side assertion, which leaves the CUDA context
    unusable (the process has to restart); its message is in the log. Use ``"strict"`` to find
    out which argument was bad.
``"strict"``
    One host read of the flag per call (a device-to-host synchronisation), then the ValueError
    naming the argument, as on CPU.

On CPU tensors (the Triton interpreter) the read costs no synchronisation: always strict. Under
torch.compile nothing is checked here: the NaN stays in the loss (and trips AMP's inf/NaN check).
Choose the mode with :func:`kdkernels.set_value_checks` or, before import, the environment variable
``KDKERNELS_VALUE_CHECKS=strict``.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

MODES = ("device", "strict")

DEVICE_CHECK_MESSAGE = (
    "kdkernels: a row loss is NaN: bad input (NaN or +inf logits, labels outside [0, V), or student_logits "
    "-inf where the loss needs a finite value); kdkernels.set_value_checks('strict') raises a ValueError "
    "naming the argument instead")

_mode = os.environ.get("KDKERNELS_VALUE_CHECKS", "device")
if _mode not in MODES:
    raise ValueError(f"KDKERNELS_VALUE_CHECKS must be one of {MODES}, got {_mode!r}")


def set_value_checks(mode: str) -> str:
    """Sets how GPU kernels' reports of bad input become errors (module docstring): ``"device"``
    (asynchronous, no host synchronisation) or ``"strict"`` (immediate ValueError naming the
    argument, one synchronisation per call). Returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def value_checks() -> str:
    """The current mode of :func:`set_value_checks`."""
    return _mode


def raise_reported(row_loss: torch.Tensor, raise_error: Callable[[], None]) -> None:
    """Checks the row losses [N] of a kernel that reports bad rows as NaN: raise_error() (which
    raises the ValueError naming the argument) after a host read on CPU tensors or in strict mode;
    otherwise an asynchronous device assertion. Nothing under torch.compile."""
    if torch.compiler.is_compiling():
        return
    if row_loss.device.type == "cpu" or _mode == "strict":
        if bool(torch.isnan(row_loss).any()):  # one host read of [N] flags
            raise_error()
        return
    torch._assert_async(torch.isnan(row_loss).any().logical_not(), DEVICE_CHECK_MESSAGE)
