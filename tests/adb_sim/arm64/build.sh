#!/usr/bin/env bash
# The simulated arm64 phone's runtimes (tests/adb_sim/qemu.py), built from Debian and PyPI packages only:
#   tests/adb_sim/arm64/build.sh [ROOT]      (`make arm64` runs it; ROOT defaults to .cache/arm64)
#
# Writes, under ROOT:
#   sysroot/             Debian 12 arm64 packages unpacked with `dpkg -x` (glibc, libstdc++, Python 3.11), and
#                        the /proc/cpuinfo and /sys CPU files of the emulated CPU (qemu-user passes the host's
#                        through, and the runtimes' cpuinfo crashes on an x86 /proc/cpuinfo)
#   site/                the manylinux aarch64 wheels of ai-edge-litert and numpy, unpacked
#   executorch/          the executorch aarch64 wheel's runtime libraries and headers
#   bin/executor_runner  tests/adb_sim/arm64/executor_runner.cpp, cross-compiled against them
#   run-aarch64          runs an aarch64 program of this tree under qemu-user on that CPU
# The wheels are the versions installed in the project's venv, so the ARM and x86 runs use one release.
# Installs the Debian packages qemu-user and g++-aarch64-linux-gnu (needs root) when missing.
set -euo pipefail

ROOT=$(mkdir -p "${1:-.cache/arm64}" && cd "${1:-.cache/arm64}" && pwd)
PY=${PYTHON:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
# A phone big core XNNPACK has NEON dot-product (int8) and fp16 kernels for; /proc/cpuinfo below describes it.
QEMU_CPU=cortex-a76
DEBS=(libc6 libgcc-s1 libstdc++6 zlib1g libffi8 libexpat1 libpython3.11-minimal libpython3.11-stdlib
      python3.11-minimal)

die() { echo "error: $*" >&2; exit 1; }

missing=()
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
if (( ${#missing[@]} )); then
  echo "installing ${missing[*]} (Debian) for the simulated arm64 phone"
  { apt-get install -y --no-install-recommends "${missing[@]}" || {
      apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }; } >/dev/null ||
    die "could not install ${missing[*]}; as root run 'apt-get install -y ${missing[*]}', then rerun make"
fi

read -r LITERT EXECUTORCH NUMPY < <("$PY" -c 'import importlib.metadata as m
print(*(m.version(p) for p in ("ai-edge-litert", "executorch", "numpy")))') ||
  die "$PY has no ai-edge-litert / executorch / numpy: run 'make .venv/.installed' first"
STAMP="litert $LITERT executorch $EXECUTORCH numpy $NUMPY $(cat "$0" "$HERE/executor_runner.cpp" | sha256sum | cut -c1-16)"
if [ -f "$ROOT/.built" ] && [ "$(cat "$ROOT/.built")" = "$STAMP" ]; then
  echo "arm64 runtimes up to date in $ROOT"
  exit 0
fi
rm -rf "$ROOT/sysroot" "$ROOT/site" "$ROOT/executorch" "$ROOT/bin" "$ROOT/debs" "$ROOT/.built"
mkdir -p "$ROOT/debs" "$ROOT/wheels" "$ROOT/sysroot" "$ROOT/site" "$ROOT/executorch" "$ROOT/bin"

# Debian's arm64 packages: apt fetches them once arm64 is a foreign architecture with package lists.
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1 || apt-get update >/dev/null ||
  die "apt-get update failed; as root run 'dpkg --add-architecture arm64 && apt-get update'"
(cd "$ROOT/debs" && apt-get download "${DEBS[@]/%/:arm64}" 2>&1 | grep -v "^W: Download is performed unsandboxed" ||
  true)
for package in "${DEBS[@]}"; do
  deb=$(ls "$ROOT/debs/${package}_"*_arm64.deb 2>/dev/null | head -n 1)
  [ -n "$deb" ] || die "apt-get download ${package}:arm64 fetched nothing; check 'apt-cache policy ${package}:arm64'"
  dpkg -x "$deb" "$ROOT/sysroot"
done

"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
  --python-version 3.11 --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
  --platform manylinux2014_aarch64 --dest "$ROOT/wheels" \
  "ai-edge-litert==$LITERT" "executorch==$EXECUTORCH" "numpy==$NUMPY"
"$PY" - "$ROOT" "$LITERT" "$EXECUTORCH" "$NUMPY" <<'EOF'
import sys
import zipfile
from pathlib import Path

root, litert, executorch, numpy = Path(sys.argv[1]), *sys.argv[2:]
wheels = root / "wheels"
for pattern in (f"ai_edge_litert-{litert}-*aarch64*.whl", f"numpy-{numpy}-*aarch64*.whl"):
    zipfile.ZipFile(next(wheels.glob(pattern))).extractall(root / "site")
# The runtime only: libraries and headers, not the Python package (its bindings need torch).
with zipfile.ZipFile(next(wheels.glob(f"executorch-{executorch}-*aarch64*.whl"))) as wheel:
    for name in wheel.namelist():
        if name.startswith(("executorch/include/", "executorch/lib/lib")):
            wheel.extract(name, root)

# The emulated CPU as the kernel would describe it: four Cortex-A76 cores (MIDR 0x414fd0b1).
cores = 4
features = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
(root / "sysroot/proc").mkdir(exist_ok=True)
(root / "sysroot/proc/cpuinfo").write_text("".join(
    f"processor\t: {i}\nBogoMIPS\t: 38.40\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    f"CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n" for i in range(cores)))
cpu = root / "sysroot/sys/devices/system/cpu"
for name in ("possible", "present", "online"):
    (cpu / name).parent.mkdir(parents=True, exist_ok=True)
    (cpu / name).write_text(f"0-{cores - 1}\n")
for i in range(cores):
    (cpu / f"cpu{i}/regs/identification").mkdir(parents=True)
    (cpu / f"cpu{i}/regs/identification/midr_el1").write_text("0x00000000414fd0b1\n")
EOF

cat > "$ROOT/run-aarch64" <<EOF
#!/bin/sh
# Runs an aarch64 program of $ROOT under qemu-user on a $QEMU_CPU (written by tests/adb_sim/arm64/build.sh).
exec qemu-aarch64 -cpu $QEMU_CPU -L "$ROOT/sysroot" -E PYTHONPATH="$ROOT/site" \\
  -E LD_LIBRARY_PATH="$ROOT/executorch/lib" "\$@"
EOF
chmod 755 "$ROOT/run-aarch64"

include="$ROOT/executorch/include"
# The definitions and standard the wheel's executorch-config.cmake gives its consumers; --no-as-needed keeps
# the kernel and backend libraries, which register themselves when loaded.
aarch64-linux-gnu-g++ -std=c++17 -O2 -Wno-deprecated-declarations -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED \
  -I "$include" -I "$include/executorch/runtime/core/portable_type/c10" \
  -o "$ROOT/bin/executor_runner" "$HERE/executor_runner.cpp" -L "$ROOT/executorch/lib" \
  -Wl,--no-as-needed -lexecutorch_kernels_optimized -lexecutorch_kernels_quantized -lexecutorch_backend_xnnpack \
  -lexecutorch_threadpool -lexecutorch -Wl,--as-needed

machine=$("$ROOT/run-aarch64" "$ROOT/sysroot/usr/bin/python3.11" -S -c \
  'import platform, numpy, ai_edge_litert.interpreter; print(platform.machine())') ||
  die "the aarch64 Python in $ROOT/sysroot does not start under qemu-aarch64"
[ "$machine" = aarch64 ] || die "the arm64 Python reports machine '$machine', not aarch64"
echo "$STAMP" > "$ROOT/.built"
echo "arm64 runtimes in $ROOT: $(du -sh "$ROOT" | cut -f1) (LiteRT $LITERT, ExecuTorch $EXECUTORCH, numpy $NUMPY)"
