"""`python -m mobile_harness {check,devices,run,report}`: the device lab's command line.

    python -m mobile_harness devices
    python -m mobile_harness run reports/mobilefacenet --all --kit kit
    python -m mobile_harness report reports/mobilefacenet

adb is found as `--adb PATH`, else `$ADB`, else `adb` on PATH; `--adb-port` (or `$ANDROID_ADB_SERVER_PORT`)
selects the adb server, e.g. a private one for a lab machine shared with developers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from mobile_harness.adb import Adb, AdbError, Device
from mobile_harness.lab import CPU_ZONES, DELEGATES, PROPS, LabOptions, run_lab
from mobile_harness.manifest import BuildFolderError, load_golden, load_manifest
from mobile_harness.report import write_device_report


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give thread counts as integers, e.g. 1,4") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be at least 1")
    return values


def _delegates(text: str) -> list[str]:
    values = text.split(",")
    unknown = [v for v in values if v not in DELEGATES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown delegate(s) {unknown}; choose from {', '.join(DELEGATES)}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mobile_harness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_adb(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--adb", help="adb client (default: $ADB, else adb on PATH)")
        port = os.environ.get("ANDROID_ADB_SERVER_PORT")
        p.add_argument("--adb-port", type=int, default=int(port) if port else None,
                       help="adb server port (default: $ANDROID_ADB_SERVER_PORT, else adb's 5037)")
        return p

    sub.add_parser("check", help="check a build folder against its manifest").add_argument("build", type=Path)
    with_adb(sub.add_parser("devices", help="list connected devices with model, SoC, ABI, Android, free storage"))
    run = with_adb(sub.add_parser("run", help="run a build's artifacts on phones"))
    run.add_argument("build", type=Path, help="build folder (reports/<recipe>) with manifest.json")
    chosen = run.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--device", action="append", metavar="SERIAL", help="a device serial (repeatable)")
    chosen.add_argument("--all", action="store_true", help="every device adb lists")
    run.add_argument("--kit", type=Path, default=Path(os.environ.get("MOBILE_HARNESS_KIT", "kit")),
                     help="runner kit folder KIT/<abi>/<binary> (default: $MOBILE_HARNESS_KIT, else ./kit)")
    run.add_argument("--runs", type=int, default=50, help="timed runs per latency row (default 50)")
    run.add_argument("--min-secs", type=float, default=0, metavar="S",
                     help="timed runs last at least S seconds in all, next to --runs (default 0: --runs decides)")
    run.add_argument("--no-pin", action="store_true",
                     help="do not pin latency runners to the big cores with taskset")
    run.add_argument("--force-idle", action="store_true",
                     help="dumpsys deviceidle force-idle before measuring, unforce after (always)")
    run.add_argument("--idle-settle", type=float, default=5, metavar="S",
                     help="seconds to wait after forcing idle (default 5)")
    run.add_argument("--row-cool-down-above", type=float, metavar="CELSIUS",
                     help="before each latency row, wait while the hottest CPU thermal zone is above this "
                          "(each row records its start temperature and wait either way)")
    run.add_argument("--row-cool-down-max", type=float, default=120, metavar="S",
                     help="longest wait before one row (default 120); a row still hot is measured and flagged")
    run.add_argument("--thermal-zones", default=CPU_ZONES, metavar="REGEX",
                     help=f"thermal zone types that count as CPU, case-insensitive (default {CPU_ZONES!r})")
    run.add_argument("--warmup", type=int, default=10, help="warm-up runs before timing (default 10)")
    run.add_argument("--threads", type=_int_list, default=[1, 4], help="thread counts, e.g. 1,4 (default)")
    run.add_argument("--delegate", type=_delegates, default=["xnnpack"],
                     help=f"LiteRT delegates, comma-separated, from {', '.join(DELEGATES)} (default xnnpack)")
    run.add_argument("--timeout", type=float, default=600, help="seconds before a runner counts as hung")
    run.add_argument("--cool-down-above", type=float, metavar="CELSIUS",
                     help="wait before measuring while the battery is hotter than this")
    run.add_argument("--cool-down-max", type=float, default=600, help="longest cool-down wait in seconds")
    sub.add_parser("report", help="merge device results into BUILD/devices.md").add_argument("build", type=Path)
    return parser


def devices(adb: Adb) -> int:
    entries = adb.devices()
    if not entries:
        print("no devices: connect a phone with USB debugging on (or `adb connect HOST:PORT`)")
        return 1
    print(f"{'serial':24} {'state':13} {'model':18} {'SoC':16} {'ABI':12} {'Android':8} {'free MiB':>9}")
    for entry in entries:
        info = {key: "–" for key in PROPS}
        free = "–"
        if entry.state == "device":
            device = Device(adb, entry.serial)
            try:
                values = device.check_shell("; ".join(f"getprop {prop}" for prop in PROPS.values())).split("\n")
                info = {key: (values[i].strip() if i < len(values) else "") for i, key in enumerate(PROPS)}
                info["soc"] = info["soc"] or info["board"]
                free = str(int(device.check_shell("df -k /data/local/tmp").strip().split("\n")[-1].split()[3]) // 1024)
            except (AdbError, IndexError, ValueError) as error:
                info["model"] = f"(probe failed: {error})"[:60]
        print(f"{entry.serial:24} {entry.state:13} {info['model']:18} {info['soc']:16} {info['abi']:12} "
              f"{info['android']:8} {free:>9}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            manifest = load_manifest(args.build)
            for artifact in manifest["artifacts"]:
                print(f"{artifact['file']}: {artifact['format']} {artifact['precision']}, {artifact['bytes']} bytes, "
                      "sha256 ok")
            if manifest.get("golden"):
                golden = load_golden(args.build, manifest)
                print(f"golden: {golden.faces} faces, {len(golden.pairs)} pairs, sha256 ok")
            return 0
        if args.command == "report":
            load_manifest(args.build)
            print(f"wrote {write_device_report(args.build)}")
            return 0
        adb = Adb(args.adb, args.adb_port)
        if args.command == "devices":
            return devices(adb)
        options = LabOptions(kit=args.kit, runs=args.runs, warmup=args.warmup, threads=args.threads,
                             delegates=args.delegate, runner_timeout_s=args.timeout,
                             cool_down_above_c=args.cool_down_above, cool_down_max_s=args.cool_down_max,
                             pin_big_cores=not args.no_pin, min_secs=args.min_secs,
                             force_idle=args.force_idle, idle_settle_s=args.idle_settle,
                             row_cool_down_above_c=args.row_cool_down_above,
                             row_cool_down_max_s=args.row_cool_down_max, thermal_zones=args.thermal_zones)
        command = "python -m mobile_harness " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        results = run_lab(adb, args.build, args.device, args.all, options, command)
        report = write_device_report(args.build)
        failed = [serial for serial, result in results.items() if result["verdict"] != "pass"]
        print(f"{len(results) - len(failed)} of {len(results)} device(s) passed; results in "
              f"{args.build / 'devices'}, report {report}")
        return 1 if failed or not results else 0
    except (BuildFolderError, AdbError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
