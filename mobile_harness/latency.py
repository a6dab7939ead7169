"""Latency as device labs report it, from the official runners' own output.

`benchmark_model` (LiteRT) prints aggregates only (`count= first= curr= min= max= avg= std=` and
`Inference timings in us: Init: ..., First inference: ...`), so the per-run distribution of a
.tflite row comes from the project's `tflite_embed` runner timing each run with the same threads
and delegate, when the kit has it.

`executor_runner` (ExecuTorch's examples/portable/executor_runner) has printed two formats:
recent sources log `Model loaded in X ms.` and one `Iteration i of N: X ms` line per execution, so
.pte rows come from it alone; older ones log only `Model executed successfully N time(s) in X ms.`,
from which the harness takes the mean of the timed runs as the difference of two invocations
(warm-up only, and warm-up plus timed runs) and reports no percentiles rather than invented ones.
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
_ET_TOTAL = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_FLOAT} ms")
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


def executor_runner_total(output: str) -> tuple[int, float] | None:
    """(executions, total ms) from executor_runner's closing `Model executed successfully` line, if any."""
    match = _ET_TOTAL.search(output)
    return (int(match.group(1)), float(match.group(2))) if match else None


def has_iteration_lines(output: str) -> bool:
    """Whether this executor_runner build logs one `Iteration i of N` line per execution."""
    return _ET_ITERATION.search(output) is not None


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


def parse_executor_runner_totals(first: str, warmup: str, full: str, warmup_runs: int) -> dict[str, Any]:
    """Latency from an executor_runner that logs only totals: three invocations with 1, `warmup_runs`
    and `warmup_runs` + N executions give the first inference and the mean of the N timed runs."""
    totals = [executor_runner_total(output) for output in (first, warmup, full)]
    if any(total is None for total in totals):
        raise RunnerOutputError("executor_runner printed neither 'Iteration i of N' lines nor a 'Model executed "
                                f"successfully N time(s) in X ms' line; last lines: {full.strip()[-400:]!r}")
    (_, first_ms), (warm_n, warm_ms), (full_n, full_ms) = totals  # type: ignore[misc]
    if full_n <= warm_n or warm_n != warmup_runs:
        raise RunnerOutputError(f"executor_runner ran {warm_n} and {full_n} executions, expected {warmup_runs} "
                                "and more")
    runs = full_n - warm_n
    mean = (full_ms - warm_ms) / runs
    loaded = _ET_LOADED.search(full)
    return {"load_ms": float(loaded.group(1)) if loaded else None, "first_inference_ms": first_ms, "runs": runs,
            "mean_ms": mean, "median_ms": None, "p90_ms": None, "trimmed_mean_ms": None, "min_ms": None,
            "max_ms": None, "distribution": {"tool": None, "note": "this executor_runner build logs totals only; "
                                             "the mean is (total of warm-up + runs - total of warm-up) / runs. "
                                             "Rebuild it from a source that logs 'Iteration i of N' for percentiles"}}


def parse_tflite_embed(output: str) -> dict[str, Any]:
    """Load time, first inference and per-run distribution from the project's tflite_embed runner."""
    init, first = _EMBED_INIT.search(output), _EMBED_FIRST.search(output)
    runs = [float(ms) for _, _, ms in _EMBED_RUN.findall(output)]
    if init is None or first is None or not runs:
        raise RunnerOutputError(f"tflite_embed printed no Init / First inference / Run lines; last lines: "
                                f"{output.strip()[-400:]!r}")
    return {"load_ms": float(init.group(1)), "first_inference_ms": float(first.group(1)), **summarize(runs)}
