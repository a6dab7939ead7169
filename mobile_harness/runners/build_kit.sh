#!/usr/bin/env bash
# Builds (or fetches) one runner-kit binary for one Android ABI into KIT/<abi>/<binary>:
#   mobile_harness/runners/build_kit.sh {benchmark_model|executor_runner|tflite_embed} ABI [KIT]
# e.g. `mobile_harness/runners/build_kit.sh executor_runner arm64-v8a kit`.
# Needs: git, cmake >= 3.24, ninja, and $ANDROID_NDK (r27 or newer) for the two source builds, plus a Python
# with torch for ExecuTorch's code generation ($PYTHON, default: this repository's .venv); curl and sha256sum
# for benchmark_model. Sources are cloned under $MOBILE_HARNESS_SOURCES (default ~/.cache/mobile_harness)
# and fetched again when the pinned ref changes. Versions match the factory's pinned toolchain
# (pyproject.toml): ExecuTorch $EXECUTORCH_REF (v1.5.1), TensorFlow Lite $TENSORFLOW_REF (v2.19.0), from
# $EXECUTORCH_URL / $TENSORFLOW_URL (GitHub, or a mirror).
set -euo pipefail

# benchmark_model is not built here: it is LiteRT's prebuilt Android binary, downloaded from
# BENCHMARK_MODEL_URL_<ABI> and kept only if its sha256 is BENCHMARK_MODEL_SHA256_<ABI>. Google publishes
# these binaries at a moving "latest" URL only, so the pin is the sha256: record it when you adopt a build
# (`sha256sum` of a download you have checked), here or in the environment. Without one the script refuses
# to install the binary; when Google replaces "latest", the check fails until you re-pin (or point the URL
# at your own copy of the pinned build).
BENCHMARK_MODEL_URL_ARM64_V8A=${BENCHMARK_MODEL_URL_ARM64_V8A:-https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/release/lite/tools/nightly/latest/android_aarch64_benchmark_model}
BENCHMARK_MODEL_SHA256_ARM64_V8A=${BENCHMARK_MODEL_SHA256_ARM64_V8A:-}
BENCHMARK_MODEL_URL_ARMEABI_V7A=${BENCHMARK_MODEL_URL_ARMEABI_V7A:-https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/release/lite/tools/nightly/latest/android_arm_benchmark_model}
BENCHMARK_MODEL_SHA256_ARMEABI_V7A=${BENCHMARK_MODEL_SHA256_ARMEABI_V7A:-}

usage() { echo "usage: $0 {benchmark_model|executor_runner|tflite_embed} {arm64-v8a|armeabi-v7a|x86_64|x86} [KIT]" >&2; exit 2; }
[ $# -ge 2 ] || usage
tool=$1 abi=$2 kit=${3:-kit}
case $abi in arm64-v8a|armeabi-v7a|x86_64|x86) ;; *) usage ;; esac
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
sources=${MOBILE_HARNESS_SOURCES:-$HOME/.cache/mobile_harness}
executorch_ref=${EXECUTORCH_REF:-v1.5.1}
tensorflow_ref=${TENSORFLOW_REF:-v2.19.0}
executorch_url=${EXECUTORCH_URL:-https://github.com/pytorch/executorch.git}
tensorflow_url=${TENSORFLOW_URL:-https://github.com/tensorflow/tensorflow.git}
mkdir -p "$kit/$abi" "$sources"

need_ndk() {
  if [ -z "${ANDROID_NDK:-}" ] || [ ! -f "$ANDROID_NDK/build/cmake/android.toolchain.cmake" ]; then
    echo "error: set ANDROID_NDK to an Android NDK folder (https://developer.android.com/ndk/downloads)" >&2
    exit 1
  fi
}

python_with_torch() {  # the Python ExecuTorch's CMake runs its code generators with
  local python=${PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
  fi
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "error: $python cannot import torch, which ExecuTorch's code generation needs; set PYTHON to a Python" \
      "that has it (this repository's .venv/bin/python, which \`make build\` or \`make test\` creates)" >&2
    exit 1
  fi
  echo "$python"
}

android_cmake() {  # android_cmake SOURCE BUILD [extra cmake args...]
  local source=$1 build=$2; shift 2
  cmake -S "$source" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$ANDROID_NDK/build/cmake/android.toolchain.cmake" \
    -DANDROID_ABI="$abi" -DANDROID_PLATFORM=android-26 "$@"
}

checkout() {  # checkout URL REF FOLDER: a shallow clone of REF, fetched and checked out again when REF changes
  local url=$1 ref=$2 folder=$3 stamp=$3/.git/mobile_harness_ref
  if [ ! -d "$folder/.git" ]; then
    git clone --depth 1 --branch "$ref" --recurse-submodules --shallow-submodules "$url" "$folder"
  elif [ "$(cat "$stamp" 2>/dev/null)" != "$ref" ]; then
    echo "$folder is not at $ref: fetching it" >&2
    git -C "$folder" fetch --depth 1 origin "$ref"
    git -C "$folder" checkout --detach FETCH_HEAD
    git -C "$folder" submodule update --init --recursive --depth 1
  fi
  echo "$ref" > "$stamp"
}

case $tool in
  benchmark_model)
    case $abi in
      arm64-v8a) url=$BENCHMARK_MODEL_URL_ARM64_V8A sha256=$BENCHMARK_MODEL_SHA256_ARM64_V8A
        pin=BENCHMARK_MODEL_SHA256_ARM64_V8A ;;
      armeabi-v7a) url=$BENCHMARK_MODEL_URL_ARMEABI_V7A sha256=$BENCHMARK_MODEL_SHA256_ARMEABI_V7A
        pin=BENCHMARK_MODEL_SHA256_ARMEABI_V7A ;;
      *) echo "error: no prebuilt benchmark_model for $abi; build it in a TensorFlow checkout with" \
           "\`bazel build -c opt --config=android_x86_64 //tensorflow/lite/tools/benchmark:benchmark_model\`" \
           "(the --config naming $abi's CPU) and copy it to $kit/$abi/benchmark_model" >&2; exit 1 ;;
    esac
    download=$(mktemp "$kit/$abi/.benchmark_model.XXXXXX")
    trap 'rm -f "$download"' EXIT
    curl -fL --retry 3 -o "$download" "$url"
    got=$(sha256sum "$download" | cut -d' ' -f1)
    if [ -z "$sha256" ]; then
      echo "error: no sha256 pinned for $url (it downloaded as $got); check that build, then set $pin at the" \
        "top of $0 or in the environment and run again" >&2
      exit 1
    fi
    if [ "$got" != "$sha256" ]; then
      echo "error: $url has sha256 $got, not the pinned $sha256 ($pin): refusing it. The URL now serves" \
        "another build; check it and re-pin, or point BENCHMARK_MODEL_URL_* at a copy of the pinned one" >&2
      exit 1
    fi
    chmod 755 "$download"
    mv "$download" "$kit/$abi/benchmark_model"
    ;;
  executor_runner)
    need_ndk
    python=$(python_with_torch)
    checkout "$executorch_url" "$executorch_ref" "$sources/executorch"
    build="$sources/executorch-build-${executorch_ref//\//_}-$abi"
    # The posix PAL logs to stderr, where the harness reads "Model loaded in" and "Iteration i of N";
    # the Android PAL would send those lines to logcat only.
    android_cmake "$sources/executorch" "$build" -DPYTHON_EXECUTABLE="$python" \
      -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON -DEXECUTORCH_ENABLE_LOGGING=ON \
      -DEXECUTORCH_PAL_DEFAULT=posix -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON
    cmake --build "$build" -j "$(nproc)" --target executor_runner
    cp "$build/executor_runner" "$kit/$abi/executor_runner"
    ;;
  tflite_embed)
    need_ndk
    checkout "$tensorflow_url" "$tensorflow_ref" "$sources/tensorflow"
    build="$sources/tflite_embed-build-${tensorflow_ref//\//_}-$abi"
    android_cmake "$here/tflite_embed" "$build" -DTENSORFLOW_SOURCE_DIR="$sources/tensorflow"
    cmake --build "$build" -j "$(nproc)" --target tflite_embed
    cp "$build/tflite_embed" "$kit/$abi/tflite_embed"
    ;;
  *) usage ;;
esac
chmod 755 "$kit/$abi/$tool"
echo "wrote $kit/$abi/$tool"
