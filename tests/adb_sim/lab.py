"""A phone lab for tests: a private adb server, simulated phones, a stand-in runner kit, a tiny build.

The tiny build is made with the factory's own targets and golden writer (TinyFaceNet, fp32 .tflite
and .pte), so the harness reads exactly what a factory build writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from adb_sim.runtimes import RuntimeService, make_test_kit
from adb_sim.sim import DeviceProfile, Faults, SimulatedDevice
from factory.deploy import Embedder
from factory.evaluation import EvaluationSet
from factory.golden import write_golden
from factory.targets import CompileRequest, get_target
from factory.weights import sha256_of
from mobile_harness.adb import Adb, AdbError

MEAN, STD, EMBEDDING = [127.5, 127.5, 127.5], [128.0, 128.0, 128.0], 32
GOLDEN_FACES = 8


def smooth_pixels(count: int, seed: int) -> np.ndarray:
    """Smooth random images, NCHW float32 in [0, 255] (closer to photographs than white noise)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(count, 3, 14, 14)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=112, mode="bilinear").numpy()


def make_tiny_build(backbone: torch.nn.Module, out: Path) -> Path:
    """A build folder as the factory writes it: fp32 .tflite and .pte, a Core ML stand-in, golden faces."""
    out.mkdir(parents=True)
    artifacts = []
    for fmt in ("tflite", "executorch"):
        target = get_target(fmt)
        request = CompileRequest(backbone, MEAN, STD, EMBEDDING, "fp32", smooth_pixels(8, 0),
                                 out / f"tiny_fp32{target.suffix}")
        compiled = target.compile(request)
        artifacts.append({
            "file": compiled.path.name, "format": fmt, "precision": "fp32", "bytes": compiled.path.stat().st_size,
            "sha256": sha256_of(compiled.path),
            "io": {"input": {"name": compiled.input_name, "shape": compiled.input_shape, "dtype": "float32",
                             "layout": compiled.input_layout},
                   "output": {"name": compiled.output_name, "shape": compiled.output_shape, "dtype": "float32"}}})
    # Core ML is listed by real builds too; the lab has to skip it on Android.
    bundle = out / "tiny_fp16.mlpackage"
    (bundle / "Data").mkdir(parents=True)
    (bundle / "Data" / "weights.bin").write_bytes(b"not for android")
    artifacts.append({"file": bundle.name, "format": "coreml", "precision": "fp16", "bytes": 15,
                      "sha256": sha256_of(bundle),
                      "io": {"input": {"name": "image", "shape": [1, 3, 112, 112], "layout": "NCHW"},
                             "output": {"shape": [1, EMBEDDING]}}})
    pixels = smooth_pixels(GOLDEN_FACES, 1)
    with torch.no_grad():
        reference = Embedder(backbone, MEAN, STD, EMBEDDING).eval()(torch.from_numpy(pixels)).numpy()
    # Faces 2k and 2k+1 are "the same person" in every other pair, so there are both kinds of pairs.
    index_a, index_b = np.arange(0, GOLDEN_FACES, 2), np.arange(1, GOLDEN_FACES, 2)
    same = np.arange(len(index_a)) % 2 == 0
    evaluation = EvaluationSet(pairs=[], paths=[Path(f"face_{i}.jpg") for i in range(GOLDEN_FACES)],
                               pixels_nhwc=pixels.transpose(0, 2, 3, 1), index_a=index_a, index_b=index_b,
                               same=same, folds=np.zeros(len(index_a), dtype=np.int64))
    similarities = np.sum(reference[index_a] * reference[index_b], axis=1)
    golden = write_golden(out, evaluation, reference, float(np.median(similarities)), count=GOLDEN_FACES)
    manifest = {"schema_version": 1, "recipe": "tiny", "artifacts": artifacts, "golden": golden,
                "output": {"embedding_size": EMBEDDING, "reference_threshold": golden["threshold"]},
                "resolved_recipe": {"gates": {"fp32": {"cosine_mean_min": 0.9999, "cosine_min_min": None,
                                                       "lfw_accuracy_drop_max": None, "flip_rate_max": 0.0}}}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PhoneLab:
    """A private adb server and the simulated phones connected to it."""

    def __init__(self, root: Path, runtime: RuntimeService) -> None:
        self.root = root
        self.runtime = runtime
        self.adb = Adb("adb", free_port())
        self.devices: list[SimulatedDevice] = []
        self.pending: list[subprocess.Popen[bytes]] = []
        self.kit = make_test_kit(root / "kit", "arm64-v8a")

    def add(self, faults: Faults | None = None, profile: DeviceProfile | None = None,
            expect_state: str = "device") -> SimulatedDevice:
        device = SimulatedDevice(self.root / f"phone{len(self.devices)}", profile, faults,
                                 runtime_socket=self.runtime.path)
        self.devices.append(device)
        if expect_state == "offline":
            # `adb connect` waits 10 s for a handshake that never comes; the phone is listed as
            # offline as soon as the TCP connection is up, so the client is not waited for.
            self.pending.append(subprocess.Popen(self.adb.command("connect", device.serial),
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            try:
                self.adb.connect(device.serial)
            except AdbError:
                # adb 29 says "failed to authenticate" for a phone that never accepts the key.
                if expect_state == "device":
                    raise
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = {e.serial: e.state for e in self.adb.devices()}
            if states.get(device.serial) == expect_state:
                return device
            time.sleep(0.2)
        raise AssertionError(f"{device.serial} never reached state {expect_state}: {states}")

    def close(self) -> None:
        for client in self.pending:
            client.kill()
            client.wait()
        self.adb.kill_server()
        for device in self.devices:
            device.stop()


@contextmanager
def phone_lab(root: Path, runtime: RuntimeService) -> Iterator[PhoneLab]:
    """A `PhoneLab` whose adb server keys live under `root` and which is killed on exit."""
    home = os.environ.get("HOME")
    # The adb server writes its key pair to $HOME/.android; keep the tests' keys out of the real home.
    os.environ["HOME"] = str(root)
    lab = PhoneLab(root, runtime)
    try:
        lab.adb.start_server()
        yield lab
    finally:
        lab.close()
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home
