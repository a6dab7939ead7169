#!/usr/bin/env bash
# Builds (or fetches) one runner-kit binary for one Android ABI into KIT/<abi>/<binary>:
#   mobile_harness/runners/build_kit.sh {benchmark_model|executor_runner|tflite_embed} ABI [KIT]
# e.g. `mobile_harness/runners/build_kit.sh executor_runner arm64-v8a kit`.
# Needs: git, cmake >= 3.24, ninja, and $ANDROID_NDK (r27 or newer) for the two source builds; curl for
# benchmark_model. Sources are cloned once under $MOBILE_HARNESS_SOURCES (default ~/.cache/mobile_harness).
# Versions match the factory's pinned toolchain (pyproject.toml): ExecuTorch v1.5.1; TensorFlow Lite from
# $TENSORFLOW_REF.
set -euo pipefail

usage() { echo "usage: $0 {benchmark_model|executor_runner|tflite_embed} {arm64-v8a|armeabi-v7a|x86_64|x86} [KIT]" >&2; exit 2; }
[ $# -ge 2 ] || usage
tool=$1 abi=$2 kit=${3:-kit}
case $abi in arm64-v8a|armeabi-v7a|x86_64|x86) ;; *) usage ;; esac
here=$(cd "$(dirname "$0")" && pwd)
sources=${MOBILE_HARNESS_SOURCES:-$HOME/.cache/mobile_harness}
executorch_ref=${EXECUTORCH_REF:-v1.5.1}
tensorflow_ref=${TENSORFLOW_REF:-v2.19.0}
mkdir -p "$kit/$abi" "$sources"

need_ndk() {
  if [ -z "${ANDROID_NDK:-}" ] || [ ! -f "$ANDROID_NDK/build/cmake/android.toolchain.cmake" ]; then
    echo "error: set ANDROID_NDK to an Android NDK folder (https://developer.android.com/ndk/downloads)" >&2
    exit 1
  fi
}

android_cmake() {  # android_cmake SOURCE BUILD [extra cmake args...]
  local source=$1 build=$2; shift 2
  cmake -S "$source" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$ANDROID_NDK/build/cmake/android.toolchain.cmake" \
    -DANDROID_ABI="$abi" -DANDROID_PLATFORM=android-26 "$@"
}

clone() {  # clone URL REF FOLDER
  [ -d "$3/.git" ] || git clone --depth 1 --branch "$2" --recurse-submodules --shallow-submodules "$1" "$3"
}

case $tool in
  benchmark_model)
    # LiteRT's official prebuilt Android binaries (nightly). Building from source instead:
    # in a TensorFlow checkout, `bazel build -c opt --config=android_arm64 //tensorflow/lite/tools/benchmark:benchmark_model`.
    case $abi in
      arm64-v8a) name=android_aarch64_benchmark_model ;;
      armeabi-v7a) name=android_arm_benchmark_model ;;
      *) echo "error: no prebuilt benchmark_model for $abi; build it with bazel (see this script)" >&2; exit 1 ;;
    esac
    curl -fL --retry 3 -o "$kit/$abi/benchmark_model" \
      "https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/release/lite/tools/nightly/latest/$name"
    ;;
  executor_runner)
    need_ndk
    clone https://github.com/pytorch/executorch.git "$executorch_ref" "$sources/executorch"
    # The posix PAL logs to stderr, where the harness reads "Model loaded in" and "Iteration i of N";
    # the Android PAL would send those lines to logcat only.
    android_cmake "$sources/executorch" "$sources/executorch/build-$abi" \
      -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON -DEXECUTORCH_ENABLE_LOGGING=ON \
      -DEXECUTORCH_PAL_DEFAULT=posix -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON
    cmake --build "$sources/executorch/build-$abi" -j "$(nproc)" --target executor_runner
    cp "$sources/executorch/build-$abi/executor_runner" "$kit/$abi/executor_runner"
    ;;
  tflite_embed)
    need_ndk
    clone https://github.com/tensorflow/tensorflow.git "$tensorflow_ref" "$sources/tensorflow"
    android_cmake "$here/tflite_embed" "$sources/tflite_embed-$abi" -DTENSORFLOW_SOURCE_DIR="$sources/tensorflow"
    cmake --build "$sources/tflite_embed-$abi" -j "$(nproc)" --target tflite_embed
    cp "$sources/tflite_embed-$abi/tflite_embed" "$kit/$abi/tflite_embed"
    ;;
  *) usage ;;
esac
chmod 755 "$kit/$abi/$tool"
echo "wrote $kit/$abi/$tool"
