"""Merging every device's `result.json` into the build folder's device report.

Writes `BUILD/devices.md` (one section per device: status, phone, thermal state, parity and gates,
latency table) and `BUILD/devices/<serial>/latency.png` (median with p95 whiskers per row), and
merges a summary (one row per device, artifact and latency row, plus each device's plot) into the
build's `report.md` between two markers, replacing the previous summary. A rebuild rewrites
`report.md` without it, as its artifacts are new.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mobile_harness.lab import result_path

BEGIN = "<!-- mobile_harness: on-device results (begin) -->"
END = "<!-- mobile_harness: on-device results (end) -->"


def load_results(build_dir: Path) -> list[dict[str, Any]]:
    """Every device result under `BUILD/devices/`, sorted by serial."""
    results = [json.loads(path.read_text()) for path in sorted((build_dir / "devices").glob("*/result.json"))]
    return sorted(results, key=lambda r: r["serial"])


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _tail(row: dict[str, Any]) -> float | None:
    """p95, the percentile every runner with a distribution gives (benchmark_model prints no p90); p90 in results
    from before the lab recorded p95."""
    return row["p95_ms"] if row.get("p95_ms") is not None else row.get("p90_ms")


def plot_latency(result: dict[str, Any], path: Path) -> bool:
    """Median latency with p95 whiskers for every measured row; False when there is nothing to plot."""
    rows = [(f"{a['file']}\n{r['delegate']}, {r['threads']}t" + ("" if r.get("median_ms") is not None else " (mean)"),
             r["median_ms"] if r.get("median_ms") is not None else r["mean_ms"],
             _tail(r) if r.get("median_ms") is not None and _tail(r) is not None else r["mean_ms"])
            for a in result.get("artifacts", []) for r in a.get("latency", [])
            if r.get("status") == "ok" and (r.get("median_ms") is not None or r.get("mean_ms") is not None)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, medians, tails = zip(*rows, strict=True)
    figure, axes = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    positions = range(len(rows))
    axes.barh(positions, medians, color="#4c72b0")
    axes.errorbar(medians, positions, xerr=[[0] * len(rows), [t - m for t, m in zip(tails, medians, strict=True)]],
                  fmt="none", ecolor="black", capsize=3)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    device = result.get("device") or {}
    axes.set_xlabel("latency per face (ms): median, whisker to p95 (mean where the runner gives no percentiles)")
    axes.set_title(f"{result['serial']} {device.get('model', '')} ({device.get('soc', '')})", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return True


def _row_temperature(row: dict[str, Any]) -> str:
    """A latency row's CPU temperature at its start, and its cool-down wait: `41.2 (waited 12.5 s)`, flagged
    `STILL HOT` when it did not cool below the threshold in time."""
    cool = row.get("cool_down") or {}
    if cool.get("start_c") is None:
        return "–"
    text = f"{cool['start_c']:g}"
    if cool.get("threshold_c") is not None:
        hot = f", STILL HOT > {cool['threshold_c']:g}" if cool["cooled"] is False else ""
        text += f" (waited {cool['waited_s']:g} s{hot})"
    return text


def _device_section(result: dict[str, Any], plot: str | None) -> list[str]:
    device = result.get("device") or {}
    title = f"## {result['serial']}" + (f" — {device['model']} ({device.get('soc')})" if device.get("model") else "")
    lines = [title, ""]
    status = result["status"]
    lines.append(f"**Status: {status}, verdict: {result.get('verdict')}**"
                 + (f" — failed at {result.get('failed_stage')}: {result['reason']}" if status != "ok" else "")
                 + (f" — gates failed on the phone: {', '.join(result['gate_failures'])}"
                    if result.get("gate_failures") else ""))
    lines.append("")
    if result.get("execution") not in (None, "native"):
        lines += [f"Execution: {result['execution']}; no latency timed.", ""]
    if device:
        lines.append(f"ABI {device.get('abi')}, Android {device.get('android')} (SDK {device.get('sdk')}), "
                     f"{device.get('free_kb', 0) // 1024} MiB free. Run {result.get('started')} – "
                     f"{result.get('finished')}, `{result.get('command')}`.")
        lines.append("")
    thermal = result.get("thermal") or {}
    if thermal:
        lines += ["| moment | battery °C | thermal status | CPU governors |", "|---|---|---|---|"]
        for moment in ("before", "after"):
            state = thermal.get(moment)
            if state:
                extra = f" (cooled down {state['cool_down_s']} s)" if "cool_down_s" in state else ""
                governors = state.get("governors")
                shown = (", ".join(f"{cpus} {governor}" for cpus, governor in governors.items()) if governors
                         else f"cpu0 {state['cpu0_governor']}")
                lines.append(f"| {moment}{extra} | {state['battery_c']} | {state['thermal_status']} | {shown} |")
        lines.append("")
    cpu = result.get("cpu")
    if cpu:
        clusters = ", ".join(f"cpu{c['cpus']} {(c['max_khz'] or 0) / 1e6:g} GHz" for c in cpu["clusters"])
        pinned = (f"latency runners pinned to CPUs {cpu['pinned_cpus']} (`taskset {cpu['pin_mask']}`)"
                  if cpu.get("pin_mask") else f"latency runners not pinned: {cpu.get('pin_note')}")
        lines += [f"CPU clusters: {clusters}; {pinned}.", ""]
    artifacts = [a for a in result.get("artifacts", []) if a["status"] != "skipped"]
    if artifacts:
        lines += ["| artifact | status | cosine mean | cosine min | cosine p1 | flips / pairs | gates |",
                  "|---|---|---|---|---|---|---|"]
        for artifact in artifacts:
            par = artifact.get("parity") or {}
            gates = ", ".join(f"{g['metric']} {g['op']} {g['threshold']}: "
                              + {True: "pass", False: "FAIL", None: "not measured"}[g["passed"]]
                              for g in artifact.get("gates", [])) or "–"
            flips = f"{par['flips']} / {par['pairs']}" if par else "–"
            lines.append(f"| {artifact['file']} | {artifact['status']} | {_fmt(par.get('cosine_mean'), 6)} | "
                         f"{_fmt(par.get('cosine_min'), 6)} | {_fmt(par.get('cosine_p1'), 6)} | {flips} | {gates} |")
        lines.append("")
        # The phone's kernels against this computer's, same artifact and faces (mobile_harness/host.py).
        versus = [(a["file"], a["vs_host"]) for a in artifacts if a.get("vs_host")]
        if versus:
            lines += ["| artifact | vs host: 1 − cosine mean | 1 − cosine min | flips / pairs |", "|---|---|---|---|"]
            for name, vs in versus:
                lines.append(f"| {name} | {1 - vs['cosine_mean']:.1e} | {1 - vs['cosine_min']:.1e} | "
                             f"{vs['flips']} / {vs['pairs']} (host {vs['host']}) |" if vs["status"] == "ok"
                             else f"| {name} | {vs['status']}: {vs['reason'][:100]} | – | – |")
            lines.append("")
        lines += ["| artifact | delegate | threads | load ms | first ms | median ms | p90 ms | p95 ms | "
                  "trimmed mean ms | mean ms | runs | tool | peak RSS MiB | start °C (cool-down) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for artifact in artifacts:
            for row in artifact.get("latency", []):
                if row["status"] != "ok":
                    lines.append(f"| {artifact['file']} | {row['delegate']} | {row['threads']} | "
                                 f"{row['status']}: {(row['reason'] or '')[:80]} | – | – | – | – | – | – | – | – | – | "
                                 f"{_row_temperature(row)} |")
                    continue
                lines.append(f"| {artifact['file']} | {row['delegate']} | {row['threads']} | {_fmt(row['load_ms'])} | "
                             f"{_fmt(row['first_inference_ms'])} | {_fmt(row['median_ms'])} | {_fmt(row['p90_ms'])} | "
                             f"{_fmt(row.get('p95_ms'))} | {_fmt(row['trimmed_mean_ms'])} | "
                             f"{_fmt(row.get('mean_ms'))} | {row['runs']} | {row['tool']} | "
                             f"{_fmt(row['peak_rss_kb'] / 1024 if row.get('peak_rss_kb') else None, 1)} | "
                             f"{_row_temperature(row)} |")
        lines.append("")
    if plot:
        lines += [f"![latency on {result['serial']}]({plot})", ""]
    return lines


def write_device_report(build_dir: Path) -> Path:
    """Regenerate `BUILD/devices.md` and the per-device plots from every `result.json`, and merge the
    summary into `BUILD/report.md` when the build has one."""
    results = load_results(build_dir)
    lines = ["# On-device results", "",
             "Measured on phones by `python -m mobile_harness run`; regenerate with "
             f"`python -m mobile_harness report {build_dir}`. Parity compares each phone's embeddings of the "
             "golden faces with the build's reference embeddings; latency is per face, after warm-up.", ""]
    if not results:
        lines.append("No device results yet.")
    lines += ["| device | model | SoC | status | verdict |", "|---|---|---|---|---|"]
    for result in results:
        device = result.get("device") or {}
        lines.append(f"| {result['serial']} | {device.get('model', '–')} | {device.get('soc', '–')} | "
                     f"{result['status']} | {result.get('verdict', '–')} |")
    lines.append("")
    plots = {}
    for result in results:
        plot = result_path(build_dir, result["serial"]).parent / "latency.png"
        plots[result["serial"]] = str(plot.relative_to(build_dir)) if plot_latency(result, plot) else None
        lines += _device_section(result, plots[result["serial"]])
    path = build_dir / "devices.md"
    _write_atomic(path, "\n".join(lines))
    report = build_dir / "report.md"
    if report.is_file():
        _write_atomic(report, merge_summary(report.read_text(), summary_lines(results, plots)))
    return path


def summary_lines(results: list[dict[str, Any]], plots: dict[str, str | None]) -> list[str]:
    """The build report's section on devices: one row per device, artifact and latency row."""
    lines = [BEGIN, "## On devices", "",
             f"{len(results)} phone(s), merged by `python -m mobile_harness report`; thermal state, gates and every "
             "timing in [devices.md](devices.md). Latency is per face after warm-up; the mean stands in where "
             "the runner gives no percentiles.", "",
             "| device | verdict | artifact | cosine mean | flips / pairs | delegate, threads | median ms | p95 ms | "
             "mean ms |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        device = result.get("device") or {}
        name = result["serial"]
        if device.get("model"):
            name += f" ({device['model']}, {device.get('soc')})"
        verdict = result.get("verdict") or "–"
        if result["status"] != "ok":
            verdict += f" ({result.get('failed_stage')}: {(result.get('reason') or '')[:60]})"
        measured = [a for a in result.get("artifacts", []) if a["status"] != "skipped"]
        if not measured:
            lines.append(f"| {name} | {verdict} | – | – | – | – | – | – | – |")
        for artifact in measured:
            par = artifact.get("parity") or {}
            flips = f"{par['flips']} / {par['pairs']}" if par else "–"
            rows = [r for r in artifact.get("latency", []) if r["status"] == "ok"] or [None]
            for row in rows:
                timing = (f"{row['delegate']}, {row['threads']} | {_fmt(row['median_ms'])} | {_fmt(_tail(row))} | "
                          f"{_fmt(row.get('mean_ms'))}" if row else "– | – | – | –")
                lines.append(f"| {name} | {verdict} | {artifact['file']} | {_fmt(par.get('cosine_mean'), 6)} | {flips} "
                             f"| {timing} |")
    lines.append("")
    lines += [f"![latency on {serial}]({plot})" for serial, plot in plots.items() if plot]
    return [*lines, "", END]


def merge_summary(report: str, summary: list[str]) -> str:
    """`report` with its previous device summary (if any) replaced by `summary`, at the end."""
    if BEGIN in report and END in report:
        report = report[:report.index(BEGIN)] + report[report.index(END) + len(END):]
    return report.rstrip("\n") + "\n\n" + "\n".join(summary) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
