"""Latency as device labs report it, from the official runners' own output.

`benchmark_model` (LiteRT) logs a stats line for the warm-up runs and one for the timed runs, in
`tensorflow::Stat`'s format: `count=N first= curr= min= max= avg= std=`, shortened to `count=N curr=X`
when every run took the same time and to `count=0` when there were none (`--warmup_runs=0`). Current
builds append the percentiles `p5= median= p95=` (`StatWithPercentiles`), so a .tflite row takes its
median and p95 from benchmark_model itself; for a build without them the per-run distribution comes
from the project's `tflite_embed` runner timing each run with the same threads and delegate, when the
kit has it. Load time and first inference come from `Inference timings in us: Init: ..., First
inference: ...`. Whether a delegate was really used comes from its `Explicitly applied <NAME>
delegate` line: when a delegate cannot be created benchmark_model warns, runs on the CPU and exits 0
(unless `--require_full_delegation=true`, which current builds turn into an error).

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
# A number as C++ streams print it, NaN included (the average of no runs, in some builds).
_NUMBER = r"(-?(?:[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|nan|inf))"
_BENCH_TIMINGS = re.compile(rf"Inference timings in us: Init: {_NUMBER}, First inference: {_NUMBER}, "
                            rf"Warmup \(avg\): {_NUMBER}, Inference \(avg\): {_NUMBER}")
# A stats line: `count=N ...` after the log level and an optional label, e.g. `INFO: count=50 first=... p95=...`,
# `Timings (microseconds): count=50 ...` or `INFO: count=0`.
_BENCH_STAT = re.compile(r"^(?:[A-Z]+: )?(?:[A-Za-z ]+\([a-z]+\): )?(count=\d+\b.*)$", re.M)
_STAT_FIELD = re.compile(rf"(\w+)={_NUMBER}")
_APPLIED = re.compile(r"Explicitly applied (\w+) delegate, and the model graph will be (completely|partially) "
                      r"executed by the delegate(?: w/ (\d+) delegate kernels)?")
# Builds from before the delegate providers log only this, once the delegate is in the graph.
_APPLIED_OLD = re.compile(r"\bApplied (\w+) delegate\.")
# What benchmark_model logs when a delegate it was asked for is not (or not wholly) used.
_NOT_APPLIED = re.compile(r"^.*(?:acceleration is unsupported on this platform|Failed to apply \w+ delegate|"
                          r"Disallowed CPU fallback detected|delegate is explicitly applied, the model graph will "
                          r"not be executed).*$", re.M)
_ET_LOADED = re.compile(rf"Model loaded in {_FLOAT} ms")
_ET_ITERATION = re.compile(rf"Iteration (\d+) of (\d+): {_FLOAT} ms")
_ET_TOTAL = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_FLOAT} ms")
_EMBED_INIT = re.compile(rf"^Init: {_FLOAT} ms", re.M)
_EMBED_FIRST = re.compile(rf"^First inference: {_FLOAT} ms", re.M)
_EMBED_RUN = re.compile(rf"^Run (\d+) of (\d+): {_FLOAT} ms", re.M)


# benchmark_model's delegate providers by the harness's delegate names (`DelegateProvider::GetName`).
DELEGATE_PROVIDERS = {"xnnpack": "XNNPACK", "gpu": "GPU", "nnapi": "NNAPI"}
# Delegates off the CPU: a row for one is only measured when benchmark_model really ran the model on it.
OFF_CPU_DELEGATES = ("gpu", "nnapi")


class RunnerOutputError(Exception):
    """A runner's output lacks the lines the harness reads (wrong binary, or it stopped early)."""


class DelegateNotApplied(Exception):
    """benchmark_model did not run the model on the delegate it was asked for (the phone lacks it)."""


def summarize(samples_ms: list[float]) -> dict[str, float | int]:
    """Median, p90, p95, 10-90% trimmed mean, mean, min and max of per-run latencies, in ms."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    low, high = np.percentile(values, [10, 90])
    trimmed = values[(values >= low) & (values <= high)]
    return {"runs": len(values), "median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90)),
            "p95_ms": float(np.percentile(values, 95)), "trimmed_mean_ms": float(trimmed.mean()),
            "mean_ms": float(values.mean()), "min_ms": float(values[0]), "max_ms": float(values[-1])}


def _stat_ms(line: str) -> dict[str, Any]:
    """One benchmark_model stats line in ms. `count=N curr=X` (every run the same) stands for first, min, max
    and mean; percentiles are None when the build prints none, everything but `runs` when there were no runs."""
    fields = {key: float(value) for key, value in _STAT_FIELD.findall(line)}
    runs = int(fields["count"])
    if runs == 0:
        return {"runs": 0, "first_ms": None, "mean_ms": None, "std_ms": None, "min_ms": None, "max_ms": None,
                "p5_ms": None, "median_ms": None, "p95_ms": None}
    curr = fields["curr"]

    def ms(key: str, default: float | None = None) -> float | None:
        value = fields.get(key, default)
        return None if value is None else value / 1e3

    return {"runs": runs, "first_ms": ms("first", curr), "mean_ms": ms("avg", curr), "std_ms": ms("std", 0.0),
            "min_ms": ms("min", curr), "max_ms": ms("max", curr), "p5_ms": ms("p5"), "median_ms": ms("median"),
            "p95_ms": ms("p95")}


def parse_benchmark_model(output: str) -> dict[str, Any]:
    """Load time, first inference and the statistics of the timed runs from benchmark_model's log.

    The last two stats lines before `Inference timings in us` are the warm-up and the timed runs. With no
    warm-up (`count=0`) the first inference is the first timed run, and the warm-up mean is None.
    """
    timings = _BENCH_TIMINGS.search(output)
    stats = [_stat_ms(match.group(1)) for match in _BENCH_STAT.finditer(output[: timings.start()])] if timings else []
    if timings is None or len(stats) < 2:
        raise RunnerOutputError("benchmark_model output has no 'Inference timings in us' line or no run "
                                f"statistics; last lines: {output.strip()[-400:]!r}")
    warmup, regular = stats[-2:]
    if regular["runs"] == 0:
        raise RunnerOutputError(f"benchmark_model made no timed runs (count=0); last lines: {output.strip()[-400:]!r}")
    first_ms = float(timings.group(2)) / 1e3 if warmup["runs"] else regular["first_ms"]
    return {"load_ms": float(timings.group(1)) / 1e3, "first_inference_ms": first_ms,
            "warmup_runs": warmup["runs"], "warmup_mean_ms": warmup["mean_ms"],
            "benchmark_model": {key: value for key, value in regular.items() if key != "first_ms"}}


def not_applied_reason(output: str) -> str | None:
    """The lines in which benchmark_model says a delegate it was asked for is unsupported, failed or left the
    graph (partly) on the CPU, one after another; None when it says nothing of the kind."""
    lines = [match.group(0).strip() for match in _NOT_APPLIED.finditer(output)]
    return " ".join(lines) or None


def delegation(output: str, delegate: str) -> str | None:
    """How benchmark_model used `delegate` (a `DELEGATE_PROVIDERS` key): "full", "partial (N delegate kernels)",
    or "applied" from builds that log no more; None when its log says it applied no such delegate."""
    provider = DELEGATE_PROVIDERS[delegate]
    for match in _APPLIED.finditer(output):
        if match.group(1) == provider:
            return "full" if match.group(2) == "completely" else f"partial ({match.group(3)} delegate kernels)"
    if any(match.group(1) == provider for match in _APPLIED_OLD.finditer(output)):
        return "applied"
    return None


def require_delegation(output: str, delegate: str) -> str | None:
    """`delegation` of a benchmark_model run that exited 0; `DelegateNotApplied` when it was asked for a delegate
    off the CPU and did not apply it: benchmark_model then ran on the CPU, and those timings are not the
    delegate's."""
    used = delegation(output, delegate) if delegate in DELEGATE_PROVIDERS else None
    if used is None and delegate in OFF_CPU_DELEGATES:
        provider = DELEGATE_PROVIDERS[delegate]
        said = not_applied_reason(output)
        raise DelegateNotApplied(
            f"benchmark_model did not apply the {provider} delegate (no 'Explicitly applied {provider} delegate' "
            f"line{'; it logged ' + repr(said) if said else ''}) and ran on the CPU; its CPU timings are not "
            f"reported as {delegate}")
    return used


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
            "mean_ms": mean, "median_ms": None, "p90_ms": None, "p95_ms": None, "trimmed_mean_ms": None,
            "min_ms": None, "max_ms": None,
            "distribution": {"tool": None, "note": "this executor_runner build logs totals only; the mean is (total "
                             "of warm-up + runs - total of warm-up) / runs. Rebuild it from a source that logs "
                             "'Iteration i of N' for percentiles"}}


def parse_tflite_embed(output: str) -> dict[str, Any]:
    """Load time, first inference and per-run distribution from the project's tflite_embed runner."""
    init, first = _EMBED_INIT.search(output), _EMBED_FIRST.search(output)
    runs = [float(ms) for _, _, ms in _EMBED_RUN.findall(output)]
    if init is None or first is None or not runs:
        raise RunnerOutputError(f"tflite_embed printed no Init / First inference / Run lines; last lines: "
                                f"{output.strip()[-400:]!r}")
    return {"load_ms": float(init.group(1)), "first_inference_ms": float(first.group(1)), **summarize(runs)}
