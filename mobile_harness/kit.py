"""The runner kit: on-device binaries per Android ABI, `KIT/<abi>/<binary>`.

The harness pushes them next to the artifacts for each run. A missing binary, or one built for
another CPU, stops that device with instructions to obtain or build exactly that binary; the build
scripts live in `mobile_harness/runners/`.
"""

from __future__ import annotations

from pathlib import Path

RUNNERS = Path(__file__).resolve().parent / "runners"

# Which binaries each artifact format needs on the phone. The official tools do parity and latency;
# tflite_embed, when present, adds per-run percentiles to .tflite rows where the kit's benchmark_model
# is a build that prints none (current LiteRT builds print p5/median/p95), and stands in for a
# benchmark_model too old to write outputs.
NEEDED = {"tflite": ("benchmark_model",), "executorch": ("executor_runner",)}
OPTIONAL = {"tflite": ("tflite_embed",)}

HOW_TO_GET = {
    "benchmark_model": (
        "LiteRT's official benchmark tool, prebuilt for Android (arm64-v8a and armeabi-v7a): "
        "`mobile_harness/runners/build_kit.sh benchmark_model {abi}` downloads android_{arch}_benchmark_model "
        "to {path} and keeps it only if its sha256 is the one pinned at the top of that script (the download "
        "URL is set there too); for another ABI build it from a TensorFlow "
        "checkout with bazel (`bazel build -c opt --config=android_x86_64 "
        "//tensorflow/lite/tools/benchmark:benchmark_model`, the --config naming {abi}'s CPU)"
    ),
    "executor_runner": (
        "ExecuTorch's executor_runner with XNNPACK: `mobile_harness/runners/build_kit.sh executor_runner {abi}` "
        "(CMake + Android NDK, ExecuTorch v1.5.1 source) writes {path}"
    ),
    "tflite_embed": (
        "the project's timing runner (mobile_harness/runners/tflite_embed): "
        "`mobile_harness/runners/build_kit.sh tflite_embed {abi}` (CMake + Android NDK) writes {path}"
    ),
}

# ELF e_machine values of each Android ABI.
_ELF_MACHINE = {"arm64-v8a": 183, "armeabi-v7a": 40, "x86_64": 62, "x86": 3}
_ARCH = {"arm64-v8a": "aarch64", "armeabi-v7a": "arm", "x86_64": "x86_64", "x86": "x86"}


# A kit whose binaries do not run natively on the phone's CPU says how they run in this file, e.g.
# "arm64 kernels under qemu-user (latency not meaningful)": results then carry that line, and no latency is timed.
EMULATION_FILE = "EMULATION"


class KitError(Exception):
    """The runner kit lacks a binary for this device, or holds one for another CPU."""


def _elf_machine(path: Path) -> int | None:
    with path.open("rb") as handle:
        header = handle.read(20)
    if header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little")


def _is_script(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(2) == b"#!"


def kit_binaries(kit: Path, abi: str, formats: set[str]) -> dict[str, Path]:
    """The binaries a device with `abi` needs for `formats`, plus the optional ones the kit has, checked;
    `KitError` lists every problem.

    Scripts (`#!`) are accepted as they are: the test kit's stand-ins are scripts.
    """
    binaries, problems = {}, []
    needed = {binary for fmt in formats for binary in NEEDED.get(fmt, ())}
    optional = {binary for fmt in formats for binary in OPTIONAL.get(fmt, ())} - needed
    for name in sorted(needed | {name for name in optional if (kit / abi / name).is_file()}):
        path = kit / abi / name
        if not path.is_file():
            problems.append(f"{path} is missing: " + HOW_TO_GET[name].format(
                arch=_ARCH.get(abi, abi), abi=abi, path=path))
            continue
        machine = _elf_machine(path)
        expected = _ELF_MACHINE.get(abi)
        if machine is not None and expected is not None and machine != expected:
            problems.append(f"{path} is built for another CPU (ELF machine {machine}, {abi} needs {expected}); "
                            f"rebuild it with `mobile_harness/runners/build_kit.sh {name} {abi}`")
            continue
        if machine is None and not _is_script(path):
            problems.append(f"{path} is neither an ELF binary nor a script; replace it")
            continue
        binaries[name] = path
    if problems:
        raise KitError("runner kit incomplete for " + abi + ":\n  - " + "\n  - ".join(problems))
    return binaries


def kit_emulation(kit: Path, abi: str) -> str | None:
    """How the kit's binaries for `abi` run when not natively (`KIT/<abi>/EMULATION`'s first line); None: natively."""
    path = kit / abi / EMULATION_FILE
    if not path.is_file():
        return None
    line = path.read_text().strip().split("\n")[0].strip()
    if not line:
        raise KitError(f"{path} is empty: write how the kit's binaries run (e.g. 'arm64 kernels under qemu-user "
                       "(latency not meaningful)'), or delete it for binaries that run natively")
    return line
