"""Peak resident memory of a stretch of work in this process (also the benchmarks' reader).

tracemalloc does not see torch's allocations, so this reads the kernel's counters: VmHWM (peak
RSS) from /proc/self/status, reset at the start of each run by writing 5 to
/proc/self/clear_refs (Linux >= 4.0). Where that reset is not possible, the process-wide
``ru_maxrss`` is used instead, and a run's figure is then only the growth of the process peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from typing import Optional


def status_kib(field: str) -> Optional[int]:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB, from
    /proc/self/status; None where the file or the field does not exist."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current ``VmRSS`` (Linux: writing 5 to /proc/self/clear_refs);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _release_free_memory() -> None:
    """Returns freed heap memory to the OS (glibc's malloc_trim), so that memory a previous run
    freed but the allocator kept does not hide this run's own allocations."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.peak_mib``: the peak RSS during the block
    minus the RSS at its start (what the block itself added), in MiB."""

    def __enter__(self) -> "PeakMemory":
        _release_free_memory()
        self._resettable = reset_peak_rss()
        current = status_kib("VmRSS") if self._resettable else None
        self._start_kib = current if current is not None else _max_rss_kib()
        self.peak_mib = 0.0
        return self

    def __exit__(self, *exc) -> None:
        peak = status_kib("VmHWM") if self._resettable else None
        peak = peak if peak is not None else _max_rss_kib()
        self.peak_mib = max(peak - self._start_kib, 0) / 1024.0
