"""Timing and peak-memory helpers for the benchmarks (never imported by the package).

* GPU: CUDA events around each call, ``torch.cuda.max_memory_allocated`` for the peak.
* CPU: ``time.perf_counter`` around each call; the peak comes from one call run under
  ``torch.profiler`` with ``profile_memory=True`` (the running sum of the allocator's
  alloc/free events, so it counts tensors only, not the Python process).

Every case is warmed up, then the cases of a group are timed **round-robin** (case A, case B, A, B,
...) so that a slow patch of the machine hits every case alike; ratios use medians of the same run.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(cases: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Warm every case up, then time them interleaved; returns seconds per call, per case."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            out[name].append(time_once(fn, device))
    return out


@contextlib.contextmanager
def _quiet_fd2() -> contextlib.AbstractContextManager[None]:
    """Silence the profiler's C++ start/stop lines on stderr (fd 2)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra tensor memory (MiB) allocated during one call of ``fn``."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), contextlib.redirect_stdout(io.StringIO()):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return peak / 2**20


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({torch.get_num_threads()} threads)"
