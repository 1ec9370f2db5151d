"""Timing shared by the benchmarks: CUDA events on a GPU (after a synchronize), the host clock on the CPU;
warm-up runs first; the median of the timed runs."""
from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, device: str, repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
