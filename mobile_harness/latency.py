"""Latency as device labs report it, from the official runners' own output.

`benchmark_model` (LiteRT) prints aggregates only (`count= first= curr= min= max= avg= std=` and
`Inference timings in us: Init: ..., First inference: ...`), so the per-run distribution of a
.tflite row comes from the project's `tflite_embed` runner timing each run with the same threads
and delegate. `executor_runner` (ExecuTorch) logs `Model loaded in X ms.` and one
`Iteration i of N: X ms` line per execution, so .pte rows come from it alone.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_FLOAT = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"
_BENCH_TIMINGS = re.compile(rf"Inference timings in us: Init: {_FLOAT}, First inference: {_FLOAT}, "
                            rf"Warmup \(avg\): {_FLOAT}, Inference \(avg\): {_FLOAT}")
_BENCH_STAT = re.compile(r"count=(\d+)(?: first=(\d+))? curr=(\d+)(?: min=(\d+) max=(\d+) avg=" + _FLOAT +
                         r" std=(\d+))?")
_ET_LOADED = re.compile(rf"Model loaded in {_FLOAT} ms")
_ET_ITERATION = re.compile(rf"Iteration (\d+) of (\d+): {_FLOAT} ms")
_EMBED_INIT = re.compile(rf"^Init: {_FLOAT} ms", re.M)
_EMBED_FIRST = re.compile(rf"^First inference: {_FLOAT} ms", re.M)
_EMBED_RUN = re.compile(rf"^Run (\d+) of (\d+): {_FLOAT} ms", re.M)


class RunnerOutputError(Exception):
    """A runner's output lacks the lines the harness reads (wrong binary, or it stopped early)."""


def summarize(samples_ms: list[float]) -> dict[str, float | int]:
    """Median, p90, 10-90% trimmed mean, mean, min and max of per-run latencies, in ms."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    low, high = np.percentile(values, [10, 90])
    trimmed = values[(values >= low) & (values <= high)]
    return {"runs": len(values), "median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90)),
            "trimmed_mean_ms": float(trimmed.mean()), "mean_ms": float(values.mean()),
            "min_ms": float(values[0]), "max_ms": float(values[-1])}


def parse_benchmark_model(output: str) -> dict[str, Any]:
    """Load time, first inference and the aggregates of the timed runs from benchmark_model's log."""
    timings = _BENCH_TIMINGS.search(output)
    stats = _BENCH_STAT.findall(output)
    if timings is None or len(stats) < 2:
        raise RunnerOutputError("benchmark_model output has no 'Inference timings in us' line or no run "
                                f"statistics; last lines: {output.strip()[-400:]!r}")
    init_us, first_us, warmup_us, _ = (float(v) for v in timings.groups())
    count, _, curr, low, high, avg, std = stats[-1]
    regular = {"runs": int(count), "mean_ms": float(avg or curr) / 1e3, "std_ms": float(std or 0) / 1e3,
               "min_ms": float(low or curr) / 1e3, "max_ms": float(high or curr) / 1e3}
    return {"load_ms": init_us / 1e3, "first_inference_ms": first_us / 1e3, "warmup_mean_ms": warmup_us / 1e3,
            "benchmark_model": regular}


def parse_executor_runner(output: str, warmup: int) -> dict[str, Any]:
    """Load time, first inference and the distribution of the runs after `warmup` from executor_runner's log."""
    loaded = _ET_LOADED.search(output)
    iterations = [float(ms) for _, _, ms in _ET_ITERATION.findall(output)]
    if not iterations:
        raise RunnerOutputError(f"executor_runner printed no 'Iteration i of N' lines; last lines: "
                                f"{output.strip()[-400:]!r}")
    if len(iterations) <= warmup:
        raise RunnerOutputError(f"executor_runner ran {len(iterations)} iterations, not more than the {warmup} "
                                "warm-up runs")
    return {"load_ms": float(loaded.group(1)) if loaded else None, "first_inference_ms": iterations[0],
            **summarize(iterations[warmup:])}


def parse_tflite_embed(output: str) -> dict[str, Any]:
    """Load time, first inference and per-run distribution from the project's tflite_embed runner."""
    init, first = _EMBED_INIT.search(output), _EMBED_FIRST.search(output)
    runs = [float(ms) for _, _, ms in _EMBED_RUN.findall(output)]
    if init is None or first is None or not runs:
        raise RunnerOutputError(f"tflite_embed printed no Init / First inference / Run lines; last lines: "
                                f"{output.strip()[-400:]!r}")
    return {"load_ms": float(init.group(1)), "first_inference_ms": float(first.group(1)), **summarize(runs)}
