"""Fake Android system tools for the simulated phone: getprop, df, dumpsys (battery, thermalservice,
deviceidle), logcat.

Each answers in the format the real tool prints, from `$SIM_ROOT/sim_state.json`.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(os.environ["SIM_ROOT"])
STATE = json.loads((ROOT / "sim_state.json").read_text())


def getprop(args: list[str]) -> None:
    props = STATE["props"]
    if args:
        print(props.get(args[0], ""))
    else:
        for key, value in sorted(props.items()):
            print(f"[{key}]: [{value}]")


def df(args: list[str]) -> None:
    # toybox `df -k PATH`: 1K blocks.
    free = STATE["free_kb"] if STATE["free_kb"] is not None else 73_689_792
    print("Filesystem       1K-blocks     Used Available Use% Mounted on")
    print(f"/dev/block/dm-8  114085324 40264460 {free:>9}  36% /data")


def battery_temperature() -> int:
    """Tenths of a degree C; the phone cools down after `cool_after_reads` readings if that is set."""
    reads_file = ROOT / "battery_reads"
    reads = int(reads_file.read_text()) + 1 if reads_file.exists() else 1
    reads_file.write_text(str(reads))
    cool_after = STATE["cool_after_reads"]
    return 250 if cool_after is not None and reads > cool_after else STATE["battery_temp_tenths"]


def dumpsys(args: list[str]) -> None:
    if args[:1] == ["battery"]:
        print(f"Current Battery Service state:\n  AC powered: false\n  USB powered: true\n  level: 87\n"
              f"  temperature: {battery_temperature()}")
    elif args[:1] == ["thermalservice"]:
        print("IsStatusOverride: false\nThermalEventListeners:\n\tcallbacks: 1\nThermal Status: 0\n"
              "Cached temperatures:\n\tTemperature{mValue=33.2, mType=3, mName=battery, mStatus=0}")
    elif args[:1] == ["deviceidle"]:
        # DeviceIdleController's shell commands; the state is kept in the sandbox for tests to read.
        state = ROOT / "deviceidle_forced"
        if args[1:] == ["force-idle"]:
            state.write_text("1")
            print("Now forced in to deep idle mode")
        elif args[1:] == ["unforce"]:
            state.unlink(missing_ok=True)
            print("Light state: ACTIVE, deep state: ACTIVE")
        else:
            print(f"Unknown command: {' '.join(args[1:])}")
    else:
        print(f"Can't find service: {' '.join(args)}", file=sys.stderr)
        sys.exit(1)


def logcat(args: list[str]) -> None:
    log = ROOT / "logcat.txt"
    lines = log.read_text().splitlines() if log.exists() else []
    count = int(args[args.index("-t") + 1]) if "-t" in args else len(lines)
    print("\n".join(lines[-count:]))


if __name__ == "__main__":
    {"getprop": getprop, "df": df, "dumpsys": dumpsys, "logcat": logcat}[sys.argv[1]](sys.argv[2:])
