"""LiteRT's benchmark_model on the simulated arm64 phone: the host stand-in of `adb_sim.runtimes`, run by
Debian's aarch64 Python under qemu-user with the manylinux aarch64 wheels of ai-edge-litert and numpy, so
the model runs on LiteRT's ARM kernels (XNNPACK's NEON / dot-product microkernels), not x86 ones.

Same flags, output lines and failures as `adb_sim.runtimes.benchmark_model` (which follows the real tool).
Standard library and numpy only at import: every run is a new process under qemu.
"""

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for the adb_sim package

from adb_sim.runtimes import FlagError, benchmark_model


def main() -> int:
    if platform.machine() != "aarch64":
        print(f"ERROR: this benchmark_model runs on aarch64 only (here: {platform.machine()}); start it through "
              ".cache/arm64/run-aarch64 (tests/adb_sim/arm64/build.sh writes it)", file=sys.stderr)
        return 1
    try:
        return benchmark_model(sys.argv[1:], Path.cwd(), sys.stdout, sys.stderr)
    except FlagError as error:  # what the real tool's flag parser rejects
        print(f"ERROR: {error}\nERROR: Benchmarking failed.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
