"""The simulated arm64 phone: a `SimulatedDevice` whose runner kit runs aarch64 code under qemu-user.

`tests/adb_sim/arm64/build.sh` (`make arm64`) builds the arm64 runtimes under `.cache/arm64/` from Debian's
arm64 packages and the runtimes' manylinux aarch64 wheels. The kit's `benchmark_model` and `executor_runner`
are wrapper scripts that start, under `qemu-aarch64` on an emulated Cortex-A76, Debian's aarch64 Python
running `arm64/benchmark_model.py` (LiteRT's aarch64 wheel) and `arm64/executor_runner.cpp` cross-compiled
against ExecuTorch's aarch64 wheel. So the golden faces go through ARM code, XNNPACK's ARM microkernels
included; the timings are qemu's, and the kit says so (`KIT/<abi>/EMULATION`), so the lab times no latency.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adb_sim.sim import DeviceProfile

REPO = Path(__file__).resolve().parents[2]
ARM64_ROOT = REPO / ".cache" / "arm64"
BENCHMARK_MODEL = Path(__file__).resolve().parent / "arm64" / "benchmark_model.py"
EXECUTION = "arm64 kernels under qemu-user (latency not meaningful)"
# Four cores of one cluster, as the emulated CPU's /proc/cpuinfo in the sysroot describes them.
PROFILE = DeviceProfile(model="qemu-user arm64", soc="Cortex-A76 (qemu-user)",
                        cpus=((2_400_000, "performance"),) * 4)


def arm64_missing(root: Path = ARM64_ROOT) -> str | None:
    """Why the arm64 phone cannot run here, with the fix; None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (Debian package qemu-user): run `make arm64` (`make test` does)"
    if not (root / ".built").is_file():
        return f"the arm64 runtimes are not built in {root}: run `make arm64` (`make test` does)"
    return None


def make_arm64_kit(kit: Path, root: Path = ARM64_ROOT) -> Path:
    """A runner kit for arm64-v8a whose binaries run as aarch64 code under qemu-user (see module docstring)."""
    folder = kit / "arm64-v8a"
    folder.mkdir(parents=True, exist_ok=True)
    run = root / "run-aarch64"
    commands = {"benchmark_model": f'"{run}" "{root}/sysroot/usr/bin/python3.11" -S "{BENCHMARK_MODEL}"',
                "executor_runner": f'"{run}" "{root}/bin/executor_runner"'}
    for tool, command in commands.items():
        script = folder / tool
        script.write_text(f"#!/bin/sh\n# {tool} as aarch64 code under qemu-user (tests/adb_sim/qemu.py)\n"
                          f'exec {command} "$@"\n')
        os.chmod(script, 0o755)
    (folder / "EMULATION").write_text(EXECUTION + "\n")
    return kit
