"""mobile_harness/runners/build_kit.sh without the network or an NDK: a `file://` download, local git
repositories standing in for ExecuTorch and TensorFlow, and a cmake stand-in that logs its arguments and
writes the target it is asked to build."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "mobile_harness" / "runners" / "build_kit.sh"
FAKE_CMAKE = """#!/bin/sh
echo "$@" >> "$CMAKE_LOG"
if [ "$1" = "--build" ]; then
  dir=$2 target=
  while [ $# -gt 0 ]; do [ "$1" = "--target" ] && target=$2; shift; done
  mkdir -p "$dir" && echo built > "$dir/$target"
fi
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment where the script's cmake and NDK are stand-ins and its sources go under tmp_path."""
    bin_dir, ndk = tmp_path / "bin", tmp_path / "ndk"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text(FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    (ndk / "build" / "cmake").mkdir(parents=True)
    (ndk / "build" / "cmake" / "android.toolchain.cmake").write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BENCHMARK_MODEL_", "PYTHON"))}
    return {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ANDROID_NDK": str(ndk),
            "MOBILE_HARNESS_SOURCES": str(tmp_path / "sources"), "CMAKE_LOG": str(tmp_path / "cmake.log"),
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def build_kit(env: dict[str, str], *args: str, **changes: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**env, **changes}, capture_output=True, text=True,
                          timeout=300)


def tagged_repository(folder: Path, env: dict[str, str], tags: tuple[str, ...]) -> str:
    """A git repository with one commit per tag, each writing the tag into VERSION; its file:// URL."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(folder), *args], env=env, check=True, capture_output=True)

    folder.mkdir()
    git("init", "-q", "-b", "main")
    for tag in tags:
        (folder / "VERSION").write_text(tag)
        git("add", "VERSION")
        git("commit", "-q", "-m", tag)
        git("tag", tag)
    return f"file://{folder}"


def test_benchmark_model_download_needs_its_pinned_sha256(env: dict[str, str], tmp_path: Path) -> None:
    binary = tmp_path / "android_aarch64_benchmark_model"
    binary.write_bytes(b"\x7fELF pinned build")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    kit = tmp_path / "kit"
    installed = kit / "arm64-v8a" / "benchmark_model"
    source = {"BENCHMARK_MODEL_URL_ARM64_V8A": f"file://{binary}"}

    unpinned = build_kit(env, "benchmark_model", "arm64-v8a", str(kit), **source)
    assert unpinned.returncode == 1 and f"it downloaded as {digest}" in unpinned.stderr
    assert "BENCHMARK_MODEL_SHA256_ARM64_V8A" in unpinned.stderr and not installed.exists()

    other = build_kit(env, "benchmark_model", "arm64-v8a", str(kit), **source,
                      BENCHMARK_MODEL_SHA256_ARM64_V8A="0" * 64)
    assert other.returncode == 1 and f"has sha256 {digest}, not the pinned {'0' * 64}" in other.stderr
    assert "refusing it" in other.stderr and not installed.exists()
    assert list((kit / "arm64-v8a").iterdir()) == [], "no half download is left in the kit"

    pinned = build_kit(env, "benchmark_model", "arm64-v8a", str(kit), **source, BENCHMARK_MODEL_SHA256_ARM64_V8A=digest)
    assert pinned.returncode == 0, pinned.stderr
    assert installed.read_bytes() == binary.read_bytes() and installed.stat().st_mode & 0o777 == 0o755


def test_source_checkout_follows_the_pinned_ref(env: dict[str, str], tmp_path: Path) -> None:
    url = tagged_repository(tmp_path / "tensorflow", env, ("v1", "v2"))
    checkout = tmp_path / "sources" / "tensorflow"
    kit = tmp_path / "kit"
    for ref in ("v1", "v2", "v1"):
        done = build_kit(env, "tflite_embed", "arm64-v8a", str(kit), TENSORFLOW_URL=url, TENSORFLOW_REF=ref)
        assert done.returncode == 0, done.stderr
        assert (checkout / "VERSION").read_text() == ref, f"the checkout stayed behind {ref}"
        assert f"-DTENSORFLOW_SOURCE_DIR={checkout}" in Path(env["CMAKE_LOG"]).read_text().splitlines()[-2]
        # One build folder per ref: a CMake cache never outlives the sources it was made from.
        assert f"tflite_embed-build-{ref}-arm64-v8a" in Path(env["CMAKE_LOG"]).read_text().splitlines()[-2]
    assert (kit / "arm64-v8a" / "tflite_embed").read_text() == "built\n"


def test_executorch_codegen_runs_with_a_python_that_has_torch(env: dict[str, str], tmp_path: Path) -> None:
    url = tagged_repository(tmp_path / "executorch", env, ("v1.5.1",))
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    refused = build_kit(env, "executor_runner", "arm64-v8a", str(tmp_path / "kit"), EXECUTORCH_URL=url,
                        PYTHON=str(no_torch))
    assert refused.returncode == 1 and f"{no_torch} cannot import torch" in refused.stderr
    built = build_kit(env, "executor_runner", "arm64-v8a", str(tmp_path / "kit"), EXECUTORCH_URL=url,
                      PYTHON=sys.executable)
    assert built.returncode == 0, built.stderr
    configure = Path(env["CMAKE_LOG"]).read_text().splitlines()[0]
    assert f"-DPYTHON_EXECUTABLE={sys.executable}" in configure and "-DEXECUTORCH_BUILD_XNNPACK=ON" in configure
