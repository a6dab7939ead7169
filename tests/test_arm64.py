"""Real arm64 kernels compute parity here, without a phone.

A simulated phone whose runner kit runs aarch64 code under qemu-user (`tests/adb_sim/qemu.py`: Debian's aarch64
Python with LiteRT's aarch64 wheel as benchmark_model, an executor_runner cross-compiled against ExecuTorch's
aarch64 wheel) takes golden faces through the shipped MobileFaceNet int8 and fp32 .tflite and .pte, through the
whole device lab (adb, push, parity script, gates), so XNNPACK's ARM microkernels compute the embeddings. The lab
also runs each artifact on this computer (x86 kernels) and records the ARM-vs-x86 difference.

Needs `make arm64` (qemu-user, the arm64 runtimes in .cache/arm64; `make test` runs it and sets
MOBILE_HARNESS_REQUIRE_ARM64=1, so these tests fail there rather than skip) and the real faces: the shipped
weights are built by the real CLI with the shipped recipe on a reduced set of faces (the session's `reduced_build`,
shared with tests/test_build.py). qemu is slow: a few faces only, and no latency (the kit says its timings are
qemu's).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from adb_sim.lab import PhoneLab, phone_lab
from adb_sim.qemu import EXECUTION, PROFILE, arm64_missing, make_arm64_kit
from adb_sim.runtimes import ABORTED, RuntimeService
from helpers import ReducedBuild

from mobile_harness.kit import KitError, kit_emulation
from mobile_harness.lab import LabOptions, result_path, run_lab
from mobile_harness.latency import parse_benchmark_model, parse_executor_runner
from mobile_harness.manifest import load_golden, load_manifest
from mobile_harness.report import write_device_report

pytestmark = [pytest.mark.arm64, pytest.mark.data]

REPO = Path(__file__).resolve().parents[1]
ANDROID = ("tflite", "executorch")
# Golden pairs kept of each kind (same identity, different identities): 3 + 3 pairs, 9 faces. Each face is one
# runner process under qemu (about 1-5 s), so this keeps the four artifacts to about two minutes.
PAIRS_PER_KIND = 3


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def golden_subset(build: Path, out: Path, pairs_per_kind: int) -> Path:
    """A build folder holding `build`'s Android artifacts (linked) and the golden faces of its first
    `pairs_per_kind` same-identity and different-identity pairs, with a manifest to match."""
    manifest = load_manifest(build)
    golden = load_golden(build, manifest)
    chosen = ([p for p in golden.pairs if p[2]][:pairs_per_kind]
              + [p for p in golden.pairs if not p[2]][:pairs_per_kind])
    faces = sorted({i for pair in chosen for i in pair[:2]})
    index = {face: position for position, face in enumerate(faces)}
    (out / "golden").mkdir(parents=True)
    artifacts = [a for a in manifest["artifacts"] if a["format"] in ANDROID]
    for artifact in artifacts:
        (out / artifact["file"]).symlink_to(build / artifact["file"])
    entry = dict(manifest["golden"])
    arrays = {layout: np.fromfile(path, dtype=np.float32).reshape(golden.faces, -1)[faces]
              for layout, path in golden.inputs.items()}
    entry["inputs"] = {}
    for layout, array in arrays.items():
        name = f"golden/inputs_{layout.lower()}.bin"
        array.tofile(out / name)
        shape = [len(faces), *manifest["golden"]["inputs"][layout]["shape"][1:]]
        entry["inputs"][layout] = {**manifest["golden"]["inputs"][layout], "shape": shape,
                                   "bytes": int(array.nbytes), "sha256": _sha256(out / name)}
    golden.reference[faces].astype(np.float32).tofile(out / "golden/reference.bin")
    entry["reference"] = {**manifest["golden"]["reference"], "shape": [len(faces), golden.reference.shape[1]],
                          "bytes": 4 * len(faces) * golden.reference.shape[1],
                          "sha256": _sha256(out / "golden/reference.bin")}
    entry.update(faces=len(faces), images=[manifest["golden"]["images"][i] for i in faces],
                 pairs=[[index[a], index[b], same] for a, b, same in chosen])
    (out / "manifest.json").write_text(json.dumps({**manifest, "artifacts": artifacts, "golden": entry}, indent=2))
    return out


@pytest.fixture(scope="module")
def arm64_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = arm64_missing()
    if missing:
        if os.environ.get("MOBILE_HARNESS_REQUIRE_ARM64"):
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    return make_arm64_kit(tmp_path_factory.mktemp("arm64") / "kit")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, reduced_build: ReducedBuild) -> Path:
    """The shipped MobileFaceNet weights as the shipped recipe compiles them (calibrated on 128 faces here;
    `tests/conftest.py` builds them once for the session), golden faces cut to a few pairs."""
    return golden_subset(reduced_build.out, tmp_path_factory.mktemp("shipped") / "build", PAIRS_PER_KIND)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[PhoneLab]:
    if shutil.which("adb") is None:
        pytest.fail("the adb client is not installed: `apt-get install -y adb` (`make test` installs it)",
                    pytrace=False)
    # The x86 stand-ins' service is part of every simulated lab; the arm64 kit never calls it.
    service = RuntimeService(tmp_path / "runtime.sock")
    try:
        with phone_lab(tmp_path / "lab", service) as lab_:
            yield lab_
    finally:
        service.stop()


def test_shipped_artifacts_meet_their_gates_on_arm64_kernels(lab: PhoneLab, shipped: Path, arm64_kit: Path) -> None:
    phone = lab.add(profile=PROFILE)
    started = time.monotonic()
    lines: list[str] = []
    results = run_lab(lab.adb, shipped, None, True, LabOptions(kit=arm64_kit, threads=[1], runner_timeout_s=600),
                      "pytest -m arm64", lines.append)
    result = results[phone.serial]
    assert json.loads(result_path(shipped, phone.serial).read_text()) == json.loads(json.dumps(result))
    assert result["status"] == "ok" and result["verdict"] == "pass", (result["reason"], lines)
    assert result["execution"] == EXECUTION
    manifest = json.loads((shipped / "manifest.json").read_text())
    faces = manifest["golden"]["faces"]
    by_file = {a["file"]: a for a in result["artifacts"]}
    assert set(by_file) == {f"mobilefacenet_reduced_{p}.{s}" for p in ("fp32", "int8") for s in ("tflite", "pte")}
    for name, artifact in by_file.items():
        precision = artifact["precision"]
        par, host = artifact["parity"], artifact["vs_host"]
        print(f"{name}: vs PyTorch cosine mean {par['cosine_mean']:.6f} min {par['cosine_min']:.6f}, "
              f"flips {par['flips']}/{par['pairs']}; ARM vs {host['host']}: "
              f"1 - cosine mean {1 - host['cosine_mean']:.1e}, worst face {1 - host['cosine_min']:.1e}, "
              f"flips {host['flips']}/{host['pairs']}")
        assert artifact["status"] == "ok" and par["faces"] == faces and par["pairs"] == 2 * PAIRS_PER_KIND
        # The recipe's gates, as on a real phone: fp32 cosine mean >= 0.9999, int8 >= 0.99 against PyTorch (the
        # LFW accuracy gate needs the full protocol: not measured on a phone).
        gates = {g["metric"]: g["passed"] for g in artifact["gates"]}
        assert gates == {"fp32": {"cosine_mean": True}, "int8": {"cosine_mean": True, "lfw_accuracy_drop": None}}[
            precision], artifact["gates"]
        assert par["cosine_mean"] >= {"fp32": 0.9999, "int8": 0.99}[precision]
        # ARM against x86 kernels, same artifact and faces: float kernels differ in summation order only; int8
        # kernels differ at most by rounding of a few requantised values.
        assert host["status"] == "ok" and host["host"] == "x86_64" and host["faces"] == faces
        assert host["cosine_min"] > {"fp32": 0.99999, "int8": 0.999}[precision], host
        assert host["flips"] == 0, host
        # qemu's timings say nothing about a phone: no latency rows, and why.
        assert artifact["latency"] == [] and artifact["latency_note"] == f"not timed: {EXECUTION}"
    # The golden faces ran in the arm64 kit's runners, one per face and artifact, not in the x86 stand-ins.
    parity_runs = [c for c in phone.commands if "sh parity_" in c]
    assert len(parity_runs) == 4 and not any("--num_runs=50" in c for c in phone.commands)
    report = write_device_report(shipped).read_text()
    assert f"Execution: {EXECUTION}; no latency timed." in report
    assert "| artifact | vs host: 1 − cosine mean | 1 − cosine min | flips / pairs |" in report
    assert "| mobilefacenet_reduced_int8.pte | " in report and " | 0 / 6 (host x86_64) |" in report
    print(f"{faces} faces x 4 artifacts under qemu in {time.monotonic() - started:.0f} s")


def test_arm64_runners_keep_the_official_tools_output_and_failures(shipped: Path, arm64_kit: Path,
                                                                   tmp_path: Path) -> None:
    """The lab parses the arm64 runners' timing lines as the real tools'; a wrong-sized input aborts as
    benchmark_model does; the binaries are aarch64 code."""
    kit = arm64_kit / "arm64-v8a"
    for artifact in ("mobilefacenet_reduced_int8.tflite", "mobilefacenet_reduced_int8.pte"):
        shutil.copy(shipped / artifact, tmp_path)
    root = Path(kit.joinpath("executor_runner").read_text().split('"')[1]).parent
    assert (root / "bin/executor_runner").read_bytes()[18:20] == (183).to_bytes(2, "little"), "ELF EM_AARCH64"
    run = subprocess.run([kit / "executor_runner", "--model_path=mobilefacenet_reduced_int8.pte", "--num_executions=3",
                          "--cpu_threads=1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = parse_executor_runner(run.stdout + run.stderr, warmup=1)
    assert row["runs"] == 2 and row["load_ms"] > 0 and 0 < row["median_ms"] <= row["p90_ms"]
    bench = [kit / "benchmark_model", "--graph=mobilefacenet_reduced_int8.tflite", "--num_threads=1", "--warmup_runs=1",
             "--num_runs=2", "--min_secs=0", "--warmup_min_secs=0"]
    run = subprocess.run(bench, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    parsed = parse_benchmark_model(run.stdout + run.stderr)
    assert parsed["benchmark_model"]["runs"] == 2 and parsed["benchmark_model"]["median_ms"] > 0
    assert "Explicitly applied XNNPACK delegate, and the model graph will be completely executed" in run.stdout
    (tmp_path / "short.bin").write_bytes(b"\0" * 12)
    run = subprocess.run([*bench, "--input_layer=serving_default_args_0", "--input_layer_shape=1,112,112,3",
                          "--input_layer_value_files=serving_default_args_0:short.bin"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == ABORTED
    assert "FATAL: The size of short.bin is 12 bytes. It should be 150528 bytes." in run.stderr


def test_an_empty_emulation_note_is_refused(tmp_path: Path) -> None:
    (tmp_path / "arm64-v8a").mkdir()
    assert kit_emulation(tmp_path, "arm64-v8a") is None
    (tmp_path / "arm64-v8a" / "EMULATION").write_text("\n")
    with pytest.raises(KitError, match="EMULATION is empty: write how the kit's binaries run"):
        kit_emulation(tmp_path, "arm64-v8a")
    make_arm64_kit(tmp_path / "kit", tmp_path / "nowhere")
    assert kit_emulation(tmp_path / "kit", "arm64-v8a") == EXECUTION
    assert "run `make arm64`" in arm64_missing(tmp_path / "nowhere")
