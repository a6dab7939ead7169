"""Host latency: batch 1, after warm-up, median / p90 over timed runs, measured in the same run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np


def all_threads() -> int:
    """CPU cores available to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def time_calls(run: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Milliseconds per call: median, p90, mean and min over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000.0)
    values = np.asarray(samples)
    return {
        "median_ms": round(float(np.median(values)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "min_ms": round(float(values.min()), 3),
        "runs": runs,
    }


def latency_rows(make_call: Callable[[int], Callable[[], object]], warmup: int,
                 runs: int) -> dict[str, dict[str, float]]:
    """`time_calls` at 1 thread and at all threads: `make_call(threads)` returns the call to time."""
    return {f"{threads}_thread" + ("s" if threads > 1 else ""): time_calls(make_call(threads), warmup, runs)
            for threads in sorted({1, all_threads()})}
