"""One lab run: every runnable artifact of a build on every chosen phone, in parallel.

Per device: probe (getprop, df) -> check the runner kit against the ABI -> check free storage ->
CPU clusters (max frequency, governor) and the big-core mask -> thermal state before (optional
cool-down) -> push kit, artifacts and golden inputs into a per-run folder under /data/local/tmp, each
checked by sha256 on the phone -> per artifact: golden faces through the runner (parity with the
reference), then latency rows (threads x delegates), each after the hottest CPU thermal zone is read
(and, as an option, cooled below a threshold), each runner pinned to the big cores with `taskset`
and its peak memory (VmHWM) polled while it runs -> thermal state after -> `rm -rf` of the per-run folder, always.

`BUILD/devices/<serial>/result.json` is rewritten atomically after every step that adds results,
so a fault (vanished phone, crash, hang, full storage) ends with a failed status and a reason next
to everything measured before it. A failure on one phone never stops the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mobile_harness.adb import Adb, AdbError, Device, DeviceGone, ShellTimeout
from mobile_harness.host import compare_with_host
from mobile_harness.kit import KitError, kit_binaries, kit_emulation
from mobile_harness.latency import (
    OFF_CPU_DELEGATES,
    DelegateNotApplied,
    RunnerOutputError,
    executor_runner_total,
    has_iteration_lines,
    not_applied_reason,
    parse_benchmark_model,
    parse_executor_runner,
    parse_executor_runner_totals,
    parse_tflite_embed,
    require_delegation,
)
from mobile_harness.manifest import Golden, load_golden, load_manifest
from mobile_harness.parity import evaluate_gates, parity

# executor_runner passes run at most to meet --min-secs (each sized from the last one's mean).
MIN_SECS_PASSES = 3

REMOTE_ROOT = "/data/local/tmp/mobile_harness"
# Exit status of the on-phone parity script when a runner exited 0 but wrote no output file.
NO_OUTPUT_FILE = 92
ANDROID_FORMATS = {"tflite", "executorch"}
DELEGATES = ("xnnpack", "cpu", "gpu", "nnapi")
MIN_RUNS = 50
PROPS = {"model": "ro.product.model", "soc": "ro.soc.model", "board": "ro.board.platform",
         "abi": "ro.product.cpu.abi", "android": "ro.build.version.release", "sdk": "ro.build.version.sdk"}
GOVERNOR = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
# One line per core: `cpuN|max kHz|governor|related cpus` (a field the phone does not give is empty).
CPU_PROBE = ("for c in /sys/devices/system/cpu/cpu[0-9]*; do f=$c/cpufreq; echo \"${c##*/}|"
             "$(cat $f/cpuinfo_max_freq 2>/dev/null)|$(cat $f/scaling_governor 2>/dev/null)|"
             "$(cat $f/related_cpus 2>/dev/null)\"; done")
# The line a measured runner's wrapper ends with: the runner's last VmHWM reading in kB (empty: none).
PEAK_TAG = "mobile_harness peak_rss_kb:"
# Seconds between VmHWM readings; the kernel keeps the high-water mark, so the last reading misses only what
# the runner adds in its last interval (and a runner shorter than one interval may go unread: None).
PEAK_POLL_S = 0.01
# Process names (/proc/PID/status Name:) on the way to the runner's exec, whose memory is not the runner's.
NOT_RUNNERS = ("sh", "mksh", "dash", "bash", "taskset", "toybox")
# One line per thermal zone: `thermal_zoneN|type|temp` (temp in millidegrees C; empty where unreadable).
THERMAL_PROBE = ("for z in /sys/class/thermal/thermal_zone*; do echo \"${z##*/}|$(cat $z/type 2>/dev/null)|"
                 "$(cat $z/temp 2>/dev/null)\"; done")
# Zone types that measure the CPU cores: Qualcomm `cpu-1-0-usr` / `cpuss-0`, MediaTek `cpu_big`, Exynos and Tensor
# `BIG` / `MID` / `LITTLE`, and the SoC as a whole (`soc_therm`). Battery, skin and modem zones lag the cores.
CPU_ZONES = r"cpu|big|mid|little|soc"
# Readings outside this range (degrees C) are a sensor's error codes, not temperatures.
PLAUSIBLE_C = (-40.0, 150.0)
# Thermal status codes of android.os.PowerManager (THERMAL_STATUS_*).
THERMAL_STATUS = {0: "none", 1: "light", 2: "moderate", 3: "severe", 4: "critical", 5: "emergency", 6: "shutdown"}
# Signals a runner dies of, by number (an exit status above 128 is 128 + the signal).
SIGNALS = {4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}
# A runner's own words for why it stopped: an abort (TFLITE_LOG(FATAL), a failed check), else an error line;
# benchmark_model's closing "Benchmarking failed." names nothing.
_FATAL_LINE = re.compile(r"^.*\b(?:FATAL|Check failed)\b.*$", re.M)
_ERROR_LINE = re.compile(r"^.*\bERROR\b(?!: Benchmarking failed).*$", re.M)


@dataclass
class LabOptions:
    """How a lab run measures.

    Attributes:
        kit: Runner kit folder (`KIT/<abi>/<binary>`).
        runs: Timed runs per latency row (at least `MIN_RUNS`, for a p90 that means something).
        warmup: Untimed runs before the timed ones.
        threads: Thread counts, one latency row each.
        delegates: LiteRT delegates, one latency row each (.pte delegation is fixed at build time).
        runner_timeout_s: A runner still going after this is killed and the device fails.
        push_retries: Attempts per pushed file before the device fails.
        reconnect_wait_s: How long to wait for a dropped device to come back between push attempts.
        cool_down_above_c: Wait before measuring while the battery is hotter than this (None: never).
        cool_down_max_s: Longest cool-down wait; the run then goes on and records that it was hot.
        cool_down_poll_s: Seconds between temperature readings while cooling down.
        row_cool_down_above_c: Before each latency row, wait while the hottest CPU thermal zone (`thermal_zones`;
            the battery where no zone is readable) is above this (None: never; the start temperature of each row
            is recorded anyway).
        row_cool_down_max_s: Longest wait before one row; a row still hot then is measured all the same and
            flagged (`cool_down.cooled` false), so a phone that cannot cool still gives numbers to look at.
        row_cool_down_poll_s: Seconds between thermal zone readings while a row waits.
        thermal_zones: Regular expression (case-insensitive, searched) on thermal zone types that count as CPU.
        pin_big_cores: Run latency runners under `taskset` on the cores with the highest max frequency.
        force_idle: `dumpsys deviceidle force-idle` before measuring (no background jobs, syncs or alarms),
            `dumpsys deviceidle unforce` after, always, even when the run fails.
        idle_settle_s: Seconds to wait after forcing idle, before the first measurement.
        min_secs: Timed runs last at least this long in all (0: `runs` alone decides); benchmark_model's
            `--min_secs`, emulated for executor_runner by running more executions.
    """

    kit: Path
    runs: int = 50
    warmup: int = 10
    threads: list[int] = field(default_factory=lambda: [1, 4])
    delegates: list[str] = field(default_factory=lambda: ["xnnpack"])
    runner_timeout_s: float = 600
    push_retries: int = 3
    reconnect_wait_s: float = 20
    cool_down_above_c: float | None = None
    cool_down_max_s: float = 600
    cool_down_poll_s: float = 15
    pin_big_cores: bool = True
    force_idle: bool = False
    idle_settle_s: float = 5
    min_secs: float = 0
    row_cool_down_above_c: float | None = None
    row_cool_down_max_s: float = 120
    row_cool_down_poll_s: float = 2
    thermal_zones: str = CPU_ZONES

    def __post_init__(self) -> None:
        unknown = [d for d in self.delegates if d not in DELEGATES]
        if unknown:
            raise ValueError(f"unknown delegate(s) {unknown}; choose from {list(DELEGATES)}")
        if self.runs < MIN_RUNS:
            raise ValueError(f"--runs {self.runs}: at least {MIN_RUNS} timed runs, or p90 rests on a handful of runs")
        if self.min_secs < 0:
            raise ValueError(f"--min-secs {self.min_secs:g}: give 0 (off) or more seconds")
        if self.warmup < 0 or not self.threads or min(self.threads) < 1:
            raise ValueError("warmup must be >= 0 and every thread count >= 1")
        if self.row_cool_down_max_s < 0 or self.row_cool_down_poll_s <= 0:
            raise ValueError(f"--row-cool-down-max {self.row_cool_down_max_s:g} / poll {self.row_cool_down_poll_s:g} "
                             "s: give a wait of 0 or more seconds and a poll interval above 0")
        try:
            re.compile(self.thermal_zones)
        except re.error as error:
            raise ValueError(f"--thermal-zones {self.thermal_zones!r} is not a regular expression ({error}); "
                             f"e.g. the default {CPU_ZONES!r}") from None


class DeviceFailure(Exception):
    """This device cannot go on; `stage` says where it stopped."""

    def __init__(self, stage: str, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.details = details or {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def runner_failure(tool: str, label: str, exit_code: int, output: str) -> str:
    """One reason for a runner that exited `exit_code`: how it ended, and the line of its log naming the problem
    (its FATAL or check-failure line when it aborted, else its first ERROR line), else its last output."""
    ending = f"exit {exit_code}"
    if exit_code > 128:
        number = exit_code - 128
        ending += f", killed by signal {number}" + (f" ({SIGNALS[number]})" if number in SIGNALS else "")
    problem = _FATAL_LINE.search(output) or _ERROR_LINE.search(output)
    said = problem.group(0).strip() if problem else f"last output: {output.strip()[-300:]!r}"
    return f"{tool} failed on {label} ({ending}): {said}"


def value_file_item(name: str, path: str) -> str:
    """An `--input_layer_value_files` item: benchmark_model splits `name:path` at its single ':' and reads '::'
    as a ':' of the name or path (SplitInputLayerNameAndValueFile). Only this flag escapes; `--input_layer`
    takes the name as it is."""
    return f"{name.replace(':', '::')}:{path.replace(':', '::')}"


def parse_cpus(output: str) -> list[dict[str, Any]]:
    """Cores from `CPU_PROBE`'s lines: index, max kHz, governor and related CPUs (None where unreadable)."""
    cores = []
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4 or not re.fullmatch(r"cpu\d+", fields[0]):
            continue
        related = [int(c) for c in fields[3].split() if c.isdigit()]
        cores.append({"cpu": int(fields[0][3:]), "max_khz": int(fields[1]) if fields[1].isdigit() else None,
                      "governor": fields[2] or None, "related": related or None})
    return sorted(cores, key=lambda core: core["cpu"])


def cpu_clusters(cores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cores grouped into clusters by `related_cpus` (cores sharing a clock), else by equal max frequency;
    each with its CPUs, max kHz and governor(s), slowest cluster first."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for core in cores:
        key = tuple(core["related"]) if core["related"] else ("khz", core["max_khz"])
        groups.setdefault(key, []).append(core)
    clusters = []
    for members in groups.values():
        governors = sorted({c["governor"] for c in members if c["governor"]})
        khz = [c["max_khz"] for c in members if c["max_khz"] is not None]
        clusters.append({"cpus": [c["cpu"] for c in members], "max_khz": max(khz) if khz else None,
                         "governor": governors[0] if len(governors) == 1 else (governors or None)})
    return sorted(clusters, key=lambda c: (c["max_khz"] or 0, c["cpus"][0]))


def parse_thermal_zones(output: str) -> list[dict[str, Any]]:
    """Zones from `THERMAL_PROBE`'s lines: name, type and degrees C (None where unreadable or implausible).
    The kernel writes millidegrees; a few vendor drivers write degrees, told apart by magnitude."""
    zones = []
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not re.fullmatch(r"thermal_zone\d+", fields[0]):
            continue
        celsius = None
        if re.fullmatch(r"-?\d+", fields[2]):
            value = int(fields[2])
            celsius = value / 1000 if abs(value) >= 1000 else float(value)
            if not PLAUSIBLE_C[0] < celsius < PLAUSIBLE_C[1]:
                celsius = None
        zones.append({"zone": fields[0], "type": fields[1] or None, "c": celsius})
    return sorted(zones, key=lambda z: int(z["zone"].removeprefix("thermal_zone")))


def hottest_zone(zones: list[dict[str, Any]], pattern: str) -> dict[str, Any] | None:
    """The readable zone whose type matches `pattern` (case-insensitive) with the highest temperature."""
    matching = [z for z in zones if z["c"] is not None and z["type"] and re.search(pattern, z["type"], re.I)]
    return max(matching, key=lambda z: z["c"]) if matching else None


def big_core_mask(cores: list[dict[str, Any]]) -> str | None:
    """taskset's hex mask of the cores with the highest max frequency; None when no frequency is readable."""
    known = [c for c in cores if c["max_khz"] is not None]
    if not known:
        return None
    top = max(c["max_khz"] for c in known)
    return format(sum(1 << c["cpu"] for c in known if c["max_khz"] == top), "x")


def cluster_label(cpus: list[int]) -> str:
    """`cpu4-6` for consecutive CPUs, else `cpu0,2`."""
    if cpus == list(range(cpus[0], cpus[-1] + 1)) and len(cpus) > 1:
        return f"cpu{cpus[0]}-{cpus[-1]}"
    return "cpu" + ",".join(str(c) for c in cpus)


def peak_rss_kb(output: str) -> tuple[str, int | None]:
    """The runner's output without the wrapper's `PEAK_TAG` line, and the VmHWM it read (kB; None if none)."""
    kept, peak = [], None
    for line in output.splitlines(keepends=True):
        if line.startswith(PEAK_TAG):
            value = line[len(PEAK_TAG):].strip()
            peak = int(value) if value.isdigit() else None
        else:
            kept.append(line)
    return "".join(kept), peak


def result_path(build_dir: Path, serial: str) -> Path:
    """Where a device's result goes; serials such as `127.0.0.1:5555` become safe folder names."""
    return build_dir / "devices" / re.sub(r"[^A-Za-z0-9._-]", "_", serial) / "result.json"


class DeviceRun:
    """The lab flow on one device (see the module docstring)."""

    def __init__(self, adb: Adb, serial: str, build_dir: Path, manifest: dict[str, Any], golden: Golden,
                 options: LabOptions, command: str, printer: Callable[[str], None]) -> None:
        self.device = Device(adb, serial)
        self.build_dir = build_dir
        self.manifest = manifest
        self.golden = golden
        self.options = options
        self.printer = printer
        self.remote = f"{REMOTE_ROOT}/{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.path = result_path(build_dir, serial)
        self.binaries: dict[str, Path] = {}
        self.pin_mask: str | None = None
        self.row_peaks: list[int | None] = []
        self.result: dict[str, Any] = {
            "serial": serial, "status": "running", "reason": None, "failed_stage": None,
            "started": _now(), "finished": None, "command": command, "build": manifest.get("recipe"),
            "device": None, "settings": {k: v for k, v in asdict(options).items() if k != "kit"},
            "cpu": None, "idle": None, "thermal": {}, "artifacts": [], "remote_folder": self.remote, "cleanup": None,
        }

    def say(self, message: str) -> None:
        self.printer(f"[{self.device.serial}] {message}")

    def save(self) -> None:
        _write_json_atomic(self.path, self.result)

    def run(self) -> dict[str, Any]:
        self.save()
        created = False
        forced = False
        try:
            self.result["device"] = self.probe()
            self.save()
            artifacts = [a for a in self.manifest["artifacts"] if a["format"] in ANDROID_FORMATS]
            try:
                binaries = kit_binaries(self.options.kit, self.result["device"]["abi"],
                                        {a["format"] for a in artifacts})
                # Natively, or how the kit's binaries are emulated (then their timings would be the emulator's).
                self.result["execution"] = kit_emulation(self.options.kit, self.result["device"]["abi"]) or "native"
            except KitError as error:
                raise DeviceFailure("kit", str(error)) from None
            self.binaries = binaries
            self.check_storage(artifacts, binaries)
            self.result["cpu"] = self.cpu_setup()
            self.result["thermal"]["before"] = self.thermal(cool_down=True)
            self.save()
            self.device.check_shell(f"mkdir -p {self.remote}")
            created = True
            self.push_all(artifacts, binaries)
            if self.options.force_idle:
                forced = True
                self.force_idle()
            for artifact in self.manifest["artifacts"]:
                self.run_artifact(artifact)
            self.result["thermal"]["after"] = self.thermal(cool_down=False)
            self.result["status"] = "ok"
        except DeviceFailure as failure:
            self.fail(failure.stage, failure.reason, failure.details)
        except (AdbError, OSError) as error:
            self.fail(self.current_stage(), f"{type(error).__name__}: {error}")
        finally:
            if self.result["thermal"] and "after" not in self.result["thermal"]:
                # A failed run still says how hot the phone was when it stopped, if the phone answers.
                try:
                    self.result["thermal"]["after"] = self.read_thermal()
                except AdbError:
                    self.result["thermal"]["after"] = None
            if forced:
                self.unforce_idle()
            if created:
                self.cleanup()
            self.result["finished"] = _now()
            gate_failures = [a["file"] for a in self.result["artifacts"] if a["status"] == "gate failed"]
            # pass: the phone ran everything and every artifact met the recipe's gates on it.
            self.result["verdict"] = "pass" if self.result["status"] == "ok" and not gate_failures else "fail"
            self.result["gate_failures"] = gate_failures
            self.save()
        self.say(f"{self.result['status']}, verdict {self.result['verdict']}"
                 + (f": {self.result['reason']}" if self.result["reason"] else ""))
        return self.result

    def current_stage(self) -> str:
        return "run" if self.result["artifacts"] else "setup"

    def fail(self, stage: str, reason: str, details: dict[str, Any] | None = None) -> None:
        self.result.update(status="failed", failed_stage=stage, reason=reason)
        if details:
            self.result["failure_details"] = details
        for artifact in self.result["artifacts"]:
            if artifact["status"] == "running":
                artifact.update(status="failed", reason=reason)

    def cleanup(self) -> None:
        """`rm -rf` the run folder; a phone that just dropped off gets one reconnect to allow it."""
        for attempt in (1, 2):
            try:
                self.device.check_shell(f"rm -rf {self.remote}", timeout=60)
                self.result["cleanup"] = f"removed {self.remote}"
                return
            except AdbError as error:
                self.result["cleanup"] = f"could not remove {self.remote}: {error}"
                if attempt == 2 or not isinstance(error, DeviceGone) or not self.reconnect():
                    return

    # -- probing ---------------------------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        try:
            output = self.device.check_shell("; ".join(f"getprop {prop}" for prop in PROPS.values()))
        except DeviceGone as error:
            raise DeviceFailure("connect", f"device not usable: {error}") from None
        values = output.split("\n")
        info: dict[str, Any] = {key: (values[i].strip() if i < len(values) else "") for i, key in enumerate(PROPS)}
        info["soc"] = info["soc"] or info["board"]
        info["free_kb"] = self.free_kb()
        self.say(f"{info['model']} ({info['soc']}, {info['abi']}, Android {info['android']}), "
                 f"{info['free_kb'] // 1024} MiB free in /data/local/tmp")
        return info

    def free_kb(self) -> int:
        output = self.device.check_shell("df -k /data/local/tmp")
        row = output.strip().split("\n")[-1].split()
        try:
            return int(row[3])
        except (IndexError, ValueError):
            raise DeviceFailure("probe", f"cannot read free space from `df -k /data/local/tmp`: {output!r}") from None

    def check_storage(self, artifacts: list[dict[str, Any]], binaries: dict[str, Path]) -> None:
        golden_bytes = sum(p.stat().st_size for p in self.golden.inputs.values())
        # Artifacts, kit and golden inputs, plus the per-face split of the inputs for executor_runner
        # and the outputs; doubled for headroom.
        needed = 2 * (sum(a["bytes"] for a in artifacts) + sum(p.stat().st_size for p in binaries.values())
                      + 2 * golden_bytes)
        free = self.result["device"]["free_kb"] * 1024
        if free < needed:
            raise DeviceFailure("storage", f"not enough free storage in /data/local/tmp: {free // 1024} KiB free, "
                                f"the run needs about {needed // 1024} KiB; free space on the phone")

    def read_cpus(self) -> list[dict[str, Any]]:
        return parse_cpus(self.device.shell(CPU_PROBE).output)

    def cpu_setup(self) -> dict[str, Any]:
        """The phone's clusters and the taskset mask latency runners get (None: not pinned, `pin_note` says why)."""
        cores = self.read_cpus()
        mask = big_core_mask(cores)
        info: dict[str, Any] = {"clusters": cpu_clusters(cores), "pin_mask": None, "pinned_cpus": None,
                                "pin_note": None}
        if not self.options.pin_big_cores:
            info["pin_note"] = "off (--no-pin)"
        elif mask is None:
            info["pin_note"] = "no cpufreq/cpuinfo_max_freq readable: runners not pinned"
        else:
            probe = self.device.shell(f"taskset {mask} true")
            if probe.exit_code != 0:
                info["pin_note"] = f"taskset {mask} failed on the phone: {probe.output.strip()[-200:]}"
            else:
                self.pin_mask = mask
                info.update(pin_mask=mask, pinned_cpus=[c for c in range(4 * len(mask)) if int(mask, 16) >> c & 1])
        self.say("CPU clusters " + ", ".join(f"{cluster_label(c['cpus'])} {(c['max_khz'] or 0) / 1e6:g} GHz "
                                             f"{c['governor']}" for c in info["clusters"])
                 + (f"; latency runners pinned with taskset {self.pin_mask}" if self.pin_mask
                    else f"; not pinned: {info['pin_note']}"))
        return info

    def force_idle(self) -> None:
        """Doze the phone (deep idle) so background work does not share the CPUs, then settle."""
        output = self.device.shell("dumpsys deviceidle force-idle").output.strip()
        entered = "deep idle" in output and "Unable" not in output
        self.result["idle"] = {"forced": entered, "force_idle": output[-300:], "settle_s": self.options.idle_settle_s,
                               "restored": None}
        self.save()
        self.say(f"dumpsys deviceidle force-idle: {output[-120:]}" + (
            f"; settling {self.options.idle_settle_s:g} s" if entered else ""))
        if entered:
            time.sleep(self.options.idle_settle_s)

    def unforce_idle(self) -> None:
        """`dumpsys deviceidle unforce`, whatever happened; a phone that no longer answers is recorded as such."""
        try:
            output = self.device.shell("dumpsys deviceidle unforce", timeout=60).output.strip()
            restored: str = f"unforced: {output[-200:]}"
        except AdbError as error:
            restored = f"could not unforce (run `adb shell dumpsys deviceidle unforce`): {error}"
        if self.result["idle"] is None:
            self.result["idle"] = {"forced": None}
        self.result["idle"]["restored"] = restored

    def thermal(self, cool_down: bool) -> dict[str, Any]:
        state = self.read_thermal()
        limit = self.options.cool_down_above_c
        if cool_down and limit is not None and state["battery_c"] is not None and state["battery_c"] > limit:
            self.say(f"battery at {state['battery_c']} C, above {limit} C: cooling down "
                     f"(up to {self.options.cool_down_max_s:g} s)")
            start = time.monotonic()
            while state["battery_c"] is not None and state["battery_c"] > limit:
                if time.monotonic() - start >= self.options.cool_down_max_s:
                    break
                time.sleep(self.options.cool_down_poll_s)
                state = self.read_thermal()
            state["cool_down_s"] = round(time.monotonic() - start, 1)
            state["still_hot"] = state["battery_c"] is not None and state["battery_c"] > limit
        return state

    def cpu_zone(self) -> dict[str, Any] | None:
        """The hottest readable CPU thermal zone (`thermal_zones`): `{"zone": "thermal_zoneN (type)", "c": °C}`."""
        zone = hottest_zone(parse_thermal_zones(self.device.shell(THERMAL_PROBE).output), self.options.thermal_zones)
        return {"zone": f"{zone['zone']} ({zone['type']})", "c": zone["c"]} if zone else None

    def cpu_temperature(self) -> dict[str, Any]:
        """`cpu_zone` with `source` "thermal zone"; the battery (`dumpsys battery`) where no CPU zone is readable,
        as on phones whose SELinux policy hides /sys/class/thermal from the shell; `c` None when neither is."""
        zone = self.cpu_zone()
        if zone is not None:
            return {"source": "thermal zone", **zone}
        return {"source": "battery", "zone": None, "c": self.battery_c()}

    def battery_c(self) -> float | None:
        match = re.search(r"temperature:\s*(-?\d+)", self.device.shell("dumpsys battery").output)
        return int(match.group(1)) / 10 if match else None

    def cool_down_row(self, label: str) -> dict[str, Any]:
        """Before a latency row: the CPU's temperature, and with `row_cool_down_above_c` a wait (polling every
        `row_cool_down_poll_s`, at most `row_cool_down_max_s`) until it is at or below that threshold. A row that
        did not cool in time is still measured; `cooled` false flags it."""
        options = self.options
        limit = options.row_cool_down_above_c
        reading = self.cpu_temperature()
        record: dict[str, Any] = {"threshold_c": limit, "source": reading["source"], "zone": reading["zone"],
                                  "found_c": reading["c"], "start_c": reading["c"], "waited_s": 0.0, "cooled": None}
        if limit is None or reading["c"] is None:
            if limit is not None:
                record["note"] = "no thermal zone or battery temperature readable: not cooled"
            return record
        start = time.monotonic()
        if reading["c"] > limit:
            self.say(f"{label}: {reading['zone'] or 'battery'} at {reading['c']:g} C, above {limit:g} C: cooling "
                     f"down (up to {options.row_cool_down_max_s:g} s)")
        while reading["c"] is not None and reading["c"] > limit:
            left = options.row_cool_down_max_s - (time.monotonic() - start)
            if left <= 0:
                break
            time.sleep(min(options.row_cool_down_poll_s, left))
            reading = self.cpu_temperature()
        record.update(start_c=reading["c"], zone=reading["zone"], source=reading["source"],
                      waited_s=round(time.monotonic() - start, 2),
                      cooled=reading["c"] is not None and reading["c"] <= limit)
        if not record["cooled"]:
            record["note"] = (f"still above {limit:g} C after {options.row_cool_down_max_s:g} s: measured hot; "
                              "compare with care, or raise --row-cool-down-max")
        return record

    def read_thermal(self) -> dict[str, Any]:
        """Battery temperature, the hottest CPU thermal zone, thermal status, cpu0's and every cluster's CPU
        governor; a value the phone does not give is None."""
        state: dict[str, Any] = {"time": _now(), "battery_c": self.battery_c(), "cpu_zone": self.cpu_zone(),
                                 "thermal_status": None, "cpu0_governor": None, "governors": None}
        thermal = self.device.shell("dumpsys thermalservice")
        match = re.search(r"Thermal Status:\s*(\d+)", thermal.output)
        if match:
            code = int(match.group(1))
            state["thermal_status"] = f"{code} ({THERMAL_STATUS.get(code, 'unknown')})"
        governor = self.device.shell(f"cat {GOVERNOR}")
        if governor.exit_code == 0:
            state["cpu0_governor"] = governor.output.strip()
        clusters = cpu_clusters(self.read_cpus())
        if clusters:
            state["governors"] = {cluster_label(c["cpus"]): c["governor"] for c in clusters}
        return state

    # -- pushing ---------------------------------------------------------------------------------

    def push_all(self, artifacts: list[dict[str, Any]], binaries: dict[str, Path]) -> None:
        layouts = {a["io"]["input"]["layout"] for a in artifacts}
        files = [*binaries.values(), *(self.build_dir / a["file"] for a in artifacts),
                 *(self.golden.inputs[layout] for layout in sorted(layouts))]
        for local in files:
            self.push_checked(local)
        self.device.check_shell(" && ".join(f"chmod 755 {self.remote}/{name}" for name in binaries))
        self.say(f"pushed {len(files)} files to {self.remote}, sha256 checked on the phone")

    def push_checked(self, local: Path) -> None:
        """Push `local` and compare the phone's sha256sum; retries through a dropped connection."""
        remote = f"{self.remote}/{local.name}"
        expected = _sha256(local)
        last_error = ""
        for attempt in range(1, self.options.push_retries + 1):
            try:
                self.device.push(local, remote)
                output = self.device.check_shell(f"sha256sum {remote}")
                if output.split()[0] == expected:
                    return
                last_error = f"sha256 on the phone {output.split()[0]} != {expected}"
            except AdbError as error:
                last_error = str(error)
                if "No space left" in last_error:
                    raise DeviceFailure("push", f"storage full while pushing {local.name}: {last_error}") from None
            self.say(f"push of {local.name} failed (attempt {attempt}/{self.options.push_retries}): {last_error}")
            if attempt < self.options.push_retries and not self.reconnect():
                raise DeviceFailure("push", f"device disconnected while pushing {local.name} and did not come back "
                                    f"within {self.options.reconnect_wait_s:g} s: {last_error}")
        raise DeviceFailure("push", f"push of {local.name} failed {self.options.push_retries} times: {last_error}")

    def reconnect(self) -> bool:
        """Wait for the device to be back; network devices (host:port) are reconnected explicitly."""
        if re.fullmatch(r"[\w.-]+:\d+", self.device.serial):
            try:
                self.device.adb.connect(self.device.serial)
            except AdbError:
                pass
        return self.device.wait_until_ready(self.options.reconnect_wait_s)

    # -- running ---------------------------------------------------------------------------------

    def runner(self, tool: str, args: list[str], label: str, measure: bool = False) -> str:
        """Run a kit binary in the run folder; output on success, `DeviceFailure` on crash or hang.

        `measure` (latency runs): the binary runs under `taskset` on the big cores (when pinning), and a wrapper
        shell polls its VmHWM in /proc/PID/status until it exits (toybox has no `time -v`); the reading goes to
        `row_peaks`. The wrapper runs on the other cores, so its polling does not share the runner's.
        """
        pin = f"taskset {self.pin_mask} " if measure and self.pin_mask else ""
        inner = f"echo $$ > {tool}.pid; exec {pin}./{tool} {' '.join(shlex.quote(a) for a in args)}"
        if not measure:
            return self.script(f"cd {self.remote} && sh -c {shlex.quote(inner)} 2>&1", tool, label)
        # Shell builtins only (read, case) between sleeps. The loop ends when the status has no VmHWM (a zombie, or
        # gone); readings of the shells before the exec (sh, taskset) are not the runner's and are skipped.
        wrapper = (f"sh -c {shlex.quote(inner)} & pid=$!; hwm=; "
                   "while :; do n=; v=; while read -r k a _; do case $k in Name:) n=$a;; VmHWM:) v=$a;; esac; "
                   "done 2>/dev/null < /proc/$pid/status; [ -n \"$v\" ] || break; "
                   f"case $n in {'|'.join(NOT_RUNNERS)}) ;; *) hwm=$v;; esac; sleep {PEAK_POLL_S:g}; done; "
                   f"wait $pid; code=$?; echo \"{PEAK_TAG} $hwm\"; exit $code")
        others = self.other_cores_mask()
        outer = f"taskset {others} sh -c {shlex.quote(wrapper)}" if others else f"sh -c {shlex.quote(wrapper)}"
        output, peak = peak_rss_kb(self.script(f"cd {self.remote} && {outer} 2>&1", tool, label))
        self.row_peaks.append(peak)
        return output

    def other_cores_mask(self) -> str | None:
        """The mask of the cores outside the pinned ones, for the polling shell (None: no pinning, or no others)."""
        if not self.pin_mask or not self.result["cpu"]:
            return None
        cpus = [c for cluster in self.result["cpu"]["clusters"] for c in cluster["cpus"]]
        rest = sum(1 << c for c in cpus) & ~int(self.pin_mask, 16)
        return format(rest, "x") if rest else None

    def script(self, command: str, tool: str, label: str) -> str:
        try:
            result = self.device.shell(command, timeout=self.options.runner_timeout_s)
        except ShellTimeout:
            # The parity loop's shell too (script.pid), or it would start the next face.
            killed = self.device.shell(f"cd {self.remote} && kill -9 $(cat script.pid {tool}.pid 2>/dev/null)",
                                       timeout=30)
            # adbd may already have ended it when the client went away; then kill finds nothing.
            ending = "killed it" if killed.exit_code == 0 else "it had already ended with the adb session"
            raise DeviceFailure("run", f"{tool} hung on {label}: no result within {self.options.runner_timeout_s:g} s; "
                                f"{ending}") from None
        if result.exit_code != 0:
            details = {"exit_code": result.exit_code, "output_tail": result.output[-2000:],
                       "logcat_tail": self.device.shell("logcat -d -t 60", timeout=60).output[-4000:]}
            raise DeviceFailure("run", runner_failure(tool, label, result.exit_code, result.output), details)
        return result.output

    def run_artifact(self, artifact: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"file": artifact["file"], "format": artifact["format"],
                                 "precision": artifact["precision"], "status": "running", "reason": None,
                                 "parity": None, "gates": [], "latency": []}
        self.result["artifacts"].append(entry)
        if artifact["format"] not in ANDROID_FORMATS:
            entry.update(status="skipped", reason=f"{artifact['format']} does not run on Android")
            self.save()
            return
        self.say(f"{artifact['file']}: {self.golden.faces} golden faces")
        embeddings = (self.embed_tflite if artifact["format"] == "tflite" else self.embed_pte)(artifact)
        entry["parity"] = parity(embeddings, self.golden.reference, self.golden.pairs, self.golden.threshold)
        gate = self.manifest.get("resolved_recipe", {}).get("gates", {}).get(artifact["precision"])
        entry["gates"] = evaluate_gates(gate, entry["parity"])
        # The same artifact and faces on this computer: the phone's kernels against the host's.
        entry["vs_host"] = compare_with_host(self.build_dir, artifact, self.golden, embeddings, self.options.threads[0])
        self.save()
        if self.result.get("execution", "native") != "native":
            entry["latency_note"] = f"not timed: {self.result['execution']}"
        else:
            for delegate in (self.options.delegates if artifact["format"] == "tflite" else ["xnnpack (in .pte)"]):
                for threads in self.options.threads:
                    entry["latency"].append(self.latency_row(artifact, delegate, threads))
                    self.save()
        failed_gates = [g for g in entry["gates"] if g["passed"] is False]
        entry["status"] = "gate failed" if failed_gates else "ok"
        self.save()

    def embed_tflite(self, artifact: dict[str, Any]) -> np.ndarray:
        """LiteRT's benchmark_model, one face per run: `--input_layer_value_files` in, `--output_filepath` out."""
        io = artifact["io"]["input"]
        command = ("./benchmark_model " + " ".join(shlex.quote(a) for a in [
            f"--graph={artifact['file']}", f"--num_threads={self.options.threads[0]}", "--use_xnnpack=true",
            "--warmup_runs=0", "--warmup_min_secs=0", "--num_runs=1", "--min_secs=0", f"--input_layer={io['name']}",
            f"--input_layer_shape={','.join(str(d) for d in io['shape'])}"])
            # The face's file follows unquoted, so that the parity script's $0 in it expands; it holds no ':'.
            + " " + shlex.quote("--input_layer_value_files=" + value_file_item(io["name"], "")) + "@IN@"
            + " --output_filepath=@OUT@")
        try:
            return self.embed_per_face(artifact, "benchmark_model", command, "@OUT@")
        except DeviceFailure as failure:
            if failure.details.get("exit_code") != NO_OUTPUT_FILE:
                raise
            if "tflite_embed" not in self.binaries:
                raise DeviceFailure("run", "benchmark_model in the runner kit wrote no output file: it predates "
                                    "--output_filepath. Put a current LiteRT benchmark_model in the kit, or add "
                                    "tflite_embed (mobile_harness/runners/build_kit.sh tflite_embed ABI)",
                                    failure.details) from None
        self.say("benchmark_model predates --output_filepath: golden faces through tflite_embed")
        stem = Path(artifact["file"]).stem
        inputs = self.golden.inputs[artifact["io"]["input"]["layout"]].name
        self.runner("tflite_embed", [f"--graph={artifact['file']}", f"--inputs={inputs}",
                                     f"--count={self.golden.faces}", f"--output=out_{stem}.bin",
                                     f"--num_threads={self.options.threads[0]}", "--use_xnnpack=true"],
                    f"{artifact['file']} golden faces")
        return self.pull_embeddings(f"out_{stem}.bin", artifact)

    def embed_pte(self, artifact: dict[str, Any]) -> np.ndarray:
        """ExecuTorch's executor_runner, one face per run: `--inputs` in, `--output_file` out (`<base>-0.bin`)."""
        command = (f"./executor_runner --model_path={shlex.quote(artifact['file'])} --inputs=@IN@ "
                   f"--output_file=@OUT@ --cpu_threads={self.options.threads[0]}")
        return self.embed_per_face(artifact, "executor_runner", command, "@OUT@-0.bin")

    def embed_per_face(self, artifact: dict[str, Any], tool: str, command: str, written: str) -> np.ndarray:
        """Run `command` once per golden face on the phone and pull the embeddings.

        The official runners take one input file per run, so a script on the phone cuts the golden file
        into faces. In `command`, @IN@ is the face's input file and @OUT@ its output name; `written` is the
        file the tool writes for @OUT@. A run that exits 0 without writing it ends the script with
        `NO_OUTPUT_FILE`.
        """
        # tiny_fp32.tflite and tiny_fp32.pte share a stem; their folders and scripts must not. Plain characters
        # only: the names go into shell commands and benchmark_model's `name:path` flag.
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(artifact["file"]).name)
        inputs = self.golden.inputs[artifact["io"]["input"]["layout"]].name
        face_bytes = 4 * int(np.prod(artifact["io"]["input"]["shape"]))
        face_in, face_out = f"in_{stem}/$0.bin", f"out_{stem}/$0"
        runner = f"echo $$ > {tool}.pid; exec " + command.replace("@IN@", face_in).replace("@OUT@", face_out)
        output = "out_" + stem + "/$i" + written.removeprefix("@OUT@")
        script = "\n".join([
            f"mkdir -p in_{stem} out_{stem} || exit 90",
            "echo $$ > script.pid",
            "i=0",
            f"while [ $i -lt {self.golden.faces} ]; do",
            f"  dd if={inputs} of=in_{stem}/$i.bin bs={face_bytes} skip=$i count=1 2>/dev/null || exit 91",
            f"  sh -c {shlex.quote(runner)} $i > out_{stem}/log.txt 2>&1",
            "  code=$?",
            f"  if [ $code -ne 0 ]; then echo \"face $i\"; cat out_{stem}/log.txt; exit $code; fi",
            f"  if [ ! -f {output} ]; then echo \"face $i: {tool} wrote no {output}\"; "
            f"tail -n 5 out_{stem}/log.txt; exit {NO_OUTPUT_FILE}; fi",
            "  i=$((i+1))",
            "done",
            "i=0",
            f"while [ $i -lt {self.golden.faces} ]; do cat {output}; i=$((i+1)); done > out_{stem}.bin",
            "rm -f script.pid",
        ]) + "\n"
        local = self.path.parent / f"parity_{stem}.sh"
        local.write_text(script)
        try:
            self.push_checked(local)
        finally:
            local.unlink()
        # Relative paths only: the script runs in the run folder.
        self.script(f"cd {self.remote} && sh parity_{stem}.sh", tool, f"{artifact['file']} golden faces")
        return self.pull_embeddings(f"out_{stem}.bin", artifact)

    def pull_embeddings(self, remote_name: str, artifact: dict[str, Any]) -> np.ndarray:
        width = int(artifact["io"]["output"]["shape"][-1])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / remote_name
            self.device.pull(f"{self.remote}/{remote_name}", local)
            data = np.fromfile(local, dtype=np.float32)
        if data.size != self.golden.faces * width:
            raise DeviceFailure("run", f"{remote_name} holds {data.size} floats, expected "
                                f"{self.golden.faces} x {width}")
        return data.reshape(self.golden.faces, width)

    def latency_row(self, artifact: dict[str, Any], delegate: str, threads: int) -> dict[str, Any]:
        row: dict[str, Any] = {"delegate": delegate, "threads": threads, "status": "ok", "reason": None}
        label = f"{artifact['file']} latency ({delegate}, {threads} thread(s))"
        row["cool_down"] = self.cool_down_row(label)
        self.row_peaks = []
        try:
            if artifact["format"] == "executorch":
                row.update(self.pte_latency(artifact, threads, label))
            else:
                row.update(self.tflite_latency(artifact, delegate, threads, label))
        except RunnerOutputError as error:
            row.update(status="failed", reason=str(error))
        except DelegateNotApplied as error:
            row.update(status="unsupported", reason=str(error))
        except DeviceFailure as failure:
            # A delegate the phone does not have is an unsupported row, not a failed device; any other failure
            # (bad model, crash, abort) fails the device.
            refused = not_applied_reason(failure.details.get("output_tail", ""))
            if delegate not in OFF_CPU_DELEGATES or refused is None or failure.details.get("exit_code") != 1:
                raise
            row.update(status="unsupported", reason=f"benchmark_model could not run the whole model on the "
                       f"{delegate} delegate: {refused}")
        self.say(f"{label}: " + (f"median {row['median_ms']:.3f} ms" if row.get("median_ms") is not None
                                 else row.get("reason") or ""))
        peaks = [p for p in self.row_peaks if p is not None]
        # The largest VmHWM of the row's runner processes (a row may take several); None if none was read.
        row["peak_rss_kb"] = max(peaks) if peaks else None
        row["pinned"] = self.pin_mask
        return row

    def pte_latency(self, artifact: dict[str, Any], threads: int, label: str) -> dict[str, Any]:
        options = self.options

        def executions(count: int) -> str:
            return self.runner("executor_runner", [f"--model_path={artifact['file']}", f"--num_executions={count}",
                                                   f"--cpu_threads={threads}"], label, measure=True)

        def measured(runs: int) -> dict[str, Any]:
            output = executions(options.warmup + runs)
            if has_iteration_lines(output) or executor_runner_total(output) is None:
                return {"tool": "executor_runner", **parse_executor_runner(output, options.warmup)}
            # An executor_runner that logs totals only: two more invocations isolate first inference and warm-up.
            return {"tool": "executor_runner (totals)",
                    **parse_executor_runner_totals(executions(1), executions(options.warmup), output, options.warmup)}

        row = measured(options.runs)
        if options.min_secs > 0:
            # executor_runner has no --min_secs: when the timed runs fell short, run again with as many executions
            # as the measured mean says fill the floor (10 % over, for the spread), as benchmark_model would.
            # A faster second pass can still fall short (the first pass's mean included a slower start): size
            # again from the latest mean, a bounded number of times.
            floor_ms = options.min_secs * 1000
            for _ in range(MIN_SECS_PASSES):
                mean = row.get("mean_ms") or row.get("trimmed_mean_ms") or row.get("median_ms")
                if not mean or mean * row["runs"] >= floor_ms:
                    break
                row = measured(max(options.runs, math.ceil(1.1 * floor_ms / mean)))
            mean = row.get("mean_ms") or row.get("trimmed_mean_ms") or row.get("median_ms") or 0
            row["min_secs"] = {"floor_s": options.min_secs, "timed_s": round(mean * row["runs"] / 1000, 3),
                               "reached": mean * row["runs"] >= floor_ms,
                               "how": "executor_runner has no --min_secs: runs extended from the measured mean"}
        return row

    def tflite_latency(self, artifact: dict[str, Any], delegate: str, threads: int, label: str) -> dict[str, Any]:
        options = self.options
        off_cpu = delegate in OFF_CPU_DELEGATES
        output = self.runner("benchmark_model", [
            f"--graph={artifact['file']}", f"--num_threads={threads}", f"--warmup_runs={options.warmup}",
            "--warmup_min_secs=0", f"--num_runs={options.runs}", f"--min_secs={options.min_secs:g}",
            f"--use_xnnpack={str(delegate == 'xnnpack').lower()}", f"--use_gpu={str(delegate == 'gpu').lower()}",
            f"--use_nnapi={str(delegate == 'nnapi').lower()}",
            # Without it benchmark_model falls back to the CPU where the delegate takes no (or not every) op.
            *(["--require_full_delegation=true"] if off_cpu else [])], label, measure=True)
        # Older builds ignore a delegate they could not create even with --require_full_delegation.
        delegation = require_delegation(output, delegate)
        parsed = parse_benchmark_model(output)
        timed = parsed["benchmark_model"]
        row: dict[str, Any] = {"tool": "benchmark_model", "delegation": delegation, **parsed, "runs": timed["runs"],
                               "mean_ms": timed["mean_ms"], "median_ms": timed["median_ms"], "p90_ms": None,
                               "p95_ms": timed["p95_ms"], "trimmed_mean_ms": None}
        if timed["median_ms"] is not None:
            row["distribution"] = {"tool": "benchmark_model",
                                   "note": "p5, median and p95 of the timed runs as benchmark_model computes them"}
        elif delegate in ("xnnpack", "cpu") and "tflite_embed" in self.binaries:
            inputs = self.golden.inputs[artifact["io"]["input"]["layout"]].name
            embed = parse_tflite_embed(self.runner("tflite_embed", [
                f"--graph={artifact['file']}", f"--inputs={inputs}", "--count=1", f"--num_threads={threads}",
                f"--use_xnnpack={str(delegate == 'xnnpack').lower()}", f"--warmup_runs={options.warmup}",
                f"--num_runs={options.runs}"], label, measure=True))
            row.update(tool="benchmark_model + tflite_embed", median_ms=embed["median_ms"], p90_ms=embed["p90_ms"],
                       p95_ms=embed["p95_ms"], trimmed_mean_ms=embed["trimmed_mean_ms"],
                       distribution={"tool": "tflite_embed", **embed})
        else:
            why = ("tflite_embed has no " + delegate + " delegate" if "tflite_embed" in self.binaries
                   else "the runner kit has no tflite_embed")
            row["distribution"] = {"tool": None, "note": "this benchmark_model build prints no percentiles "
                                   "(p5/median/p95), only mean/std/min/max; " + why}
        return row


def select_devices(adb: Adb, serials: list[str] | None, all_devices: bool) -> tuple[list[str], dict[str, str]]:
    """Serials to run on, and the serials that cannot run with why (unauthorized, offline, absent)."""
    entries = {e.serial: e.state for e in adb.devices()}
    wanted = list(entries) if all_devices or not serials else serials
    usable, unusable = [], {}
    for serial in wanted:
        state = entries.get(serial)
        if state == "device":
            usable.append(serial)
        elif state is None:
            unusable[serial] = "not connected (not in `adb devices`)"
        elif state == "unauthorized":
            unusable[serial] = "unauthorized: accept the 'Allow USB debugging?' prompt on the phone, then retry"
        else:
            unusable[serial] = f"{state}: reconnect the phone (or `adb reconnect offline`), then retry"
    return usable, unusable


def run_lab(adb: Adb, build_dir: Path, serials: list[str] | None, all_devices: bool, options: LabOptions,
            command: str, printer: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the build on each chosen device in parallel; returns every device's result by serial.

    Args:
        adb: The adb client (and server port) to use.
        build_dir: A finished build folder (manifest.json, artifacts, golden faces).
        serials: Devices to run on; ignored when `all_devices` is set.
        all_devices: Run on every device `adb devices` lists (unusable ones get a failed result).
        options: Measurement settings.
        command: The command line, recorded in each result.
        printer: Where progress lines go (called from several threads, one line at a time).
    """
    manifest = load_manifest(build_dir)
    golden = load_golden(build_dir, manifest)
    usable, unusable = select_devices(adb, serials, all_devices)
    results: dict[str, dict[str, Any]] = {}
    for serial, reason in unusable.items():
        result = {"serial": serial, "status": "failed", "verdict": "fail", "failed_stage": "connect", "reason": reason,
                  "started": _now(), "finished": _now(), "command": command, "artifacts": []}
        _write_json_atomic(result_path(build_dir, serial), result)
        printer(f"[{serial}] failed: {reason}")
        results[serial] = result
    lock = threading.Lock()

    def locked_print(message: str) -> None:
        with lock:
            printer(message)

    def one(serial: str) -> dict[str, Any]:
        run = DeviceRun(adb, serial, build_dir, manifest, golden, options, command, locked_print)
        try:
            return run.run()
        except Exception as error:  # one phone's bug must not stop the others
            run.fail("harness", f"{type(error).__name__}: {error}")
            run.result.update(finished=_now(), verdict="fail")
            run.save()
            return run.result

    if usable:
        with ThreadPoolExecutor(max_workers=len(usable)) as pool:
            for serial, result in zip(usable, pool.map(one, usable), strict=True):
                results[serial] = result
    return results
