"""Per-phase wall time and peak resident memory, for the RL iteration's metrics and benchmarks.

Peak RSS per phase uses Linux's resettable high-water mark: writing "5" to /proc/self/clear_refs
resets VmHWM to the current RSS, so VmHWM read at the end of a phase is that phase's peak (not the
process's lifetime peak, which `getrusage` reports). Elsewhere the lifetime peak is reported.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from contextlib import contextmanager


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; False where the OS cannot (then peaks are lifetime peaks)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def release_memory() -> bool:
    """Collect Python garbage and hand the C heap's free pages back to the OS (glibc
    `malloc_trim`). Freed tensors below glibc's mmap threshold stay in the heap, fragmented, so
    without this RSS after a long update stays at its high-water mark into the next phases and
    their peaks read the previous phase's. Returns False where there is no malloc_trim."""
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def peak_rss_gib() -> float:
    """Peak resident set size since the last `reset_peak_rss` (or process start), GiB."""
    kib = _vm_hwm_kib()
    if kib is None:  # macOS reports bytes, Linux KiB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = rss // 1024 if sys.platform == "darwin" else rss
    return kib / 2**20


@contextmanager
def phase(name: str, metrics: dict):
    """Record `{name}_time` (wall seconds), `{name}_cpu_time` (this process's CPU seconds, all
    threads: on a shared machine it tracks the work done where wall time tracks the neighbours)
    and `{name}_peak_rss_gib` of the enclosed block into metrics."""
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        metrics[f"{name}_time"] = time.perf_counter() - t0
        metrics[f"{name}_cpu_time"] = time.process_time() - c0
        metrics[f"{name}_peak_rss_gib"] = peak_rss_gib()
