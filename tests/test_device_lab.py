"""The device lab end to end: the real adb client and server, simulated phones, a tiny factory build.

Every test drives `adb` 29 against `tests/adb_sim` phones on loopback, through a private adb server
port that is killed afterwards. Runner stand-ins compute real outputs with the host runtimes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from adb_sim.lab import GOLDEN_FACES, PhoneLab, make_tiny_build, phone_lab
from adb_sim.runtimes import RuntimeService
from adb_sim.sim import Faults

from mobile_harness.lab import LabOptions, result_path, run_lab

pytestmark = pytest.mark.skipif(shutil.which("adb") is None,
                                reason="needs the adb client: `apt-get install -y adb` (make test installs it)")


@pytest.fixture(scope="module")
def tiny_build(tiny_backbone, tmp_path_factory) -> Path:
    return make_tiny_build(tiny_backbone, tmp_path_factory.mktemp("builds") / "tiny")


@pytest.fixture
def build(tiny_build: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so each test sees only its own device results."""
    return Path(shutil.copytree(tiny_build, tmp_path / "build"))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> Iterator[RuntimeService]:
    service = RuntimeService(tmp_path_factory.mktemp("rt") / "runtime.sock")
    yield service
    service.stop()


@pytest.fixture
def lab(tmp_path: Path, runtime: RuntimeService) -> Iterator[PhoneLab]:
    with phone_lab(tmp_path / "lab", runtime) as phone_lab_:
        yield phone_lab_


def options(lab: PhoneLab, **changes) -> LabOptions:
    settings = {"kit": lab.kit, "runs": 50, "warmup": 2, "threads": [1], "delegates": ["xnnpack"],
                "runner_timeout_s": 60, "reconnect_wait_s": 10}
    return LabOptions(**{**settings, **changes})


def run(lab: PhoneLab, build: Path, opts: LabOptions, serials: list[str] | None = None) -> dict[str, dict]:
    lines: list[str] = []
    results = run_lab(lab.adb, build, serials, serials is None, opts, "pytest", lines.append)
    for serial, result in results.items():
        on_disk = json.loads(result_path(build, serial).read_text())
        assert on_disk == json.loads(json.dumps(result)), "result.json holds what the run returned"
    return results


def remote_leftovers(device) -> list[Path]:
    return list((device.root / "data/local/tmp/mobile_harness").glob("*"))


def test_two_phones_in_parallel_measure_parity_and_latency(lab: PhoneLab, build: Path) -> None:
    phones = [lab.add(), lab.add()]
    results = run(lab, build, options(lab, threads=[1, 2], delegates=["xnnpack", "gpu"]))
    assert set(results) == {p.serial for p in phones}
    for phone in phones:
        result = results[phone.serial]
        assert result["status"] == "ok", result
        assert result["device"]["model"] == "Pixel Sim" and result["device"]["abi"] == "arm64-v8a"
        assert result["device"]["soc"] == "Tensor G-sim" and result["device"]["android"] == "14"
        by_file = {a["file"]: a for a in result["artifacts"]}
        assert by_file["tiny_fp16.mlpackage"]["status"] == "skipped"
        for name, delegates in (("tiny_fp32.tflite", {"xnnpack", "gpu"}), ("tiny_fp32.pte", {"xnnpack (in .pte)"})):
            artifact = by_file[name]
            assert artifact["status"] == "ok", artifact
            assert artifact["parity"]["faces"] == GOLDEN_FACES
            assert artifact["parity"]["cosine_mean"] > 0.9999 and artifact["parity"]["flips"] == 0
            assert [g["metric"] for g in artifact["gates"]] == ["cosine_mean", "flip_rate"]
            assert all(g["passed"] for g in artifact["gates"])
            rows = artifact["latency"]
            assert {(r["delegate"], r["threads"]) for r in rows} == {(d, t) for d in delegates for t in (1, 2)}
            for row in rows:
                if row["delegate"] == "gpu":
                    assert row["status"] == "unsupported" and "delegate" in row["reason"]
                    continue
                assert row["status"] == "ok" and row["runs"] == 50
                assert 0 < row["median_ms"] <= row["p90_ms"] and row["load_ms"] > 0 and row["first_inference_ms"] > 0
                assert row["trimmed_mean_ms"] > 0
        for moment in ("before", "after"):
            thermal = result["thermal"][moment]
            assert thermal["battery_c"] == 30.1 and thermal["cpu0_governor"] == "schedutil"
            assert thermal["thermal_status"] == "0 (none)"
        assert result["cleanup"].startswith("removed /data/local/tmp/mobile_harness/")
        assert remote_leftovers(phone) == []
        assert any(c.startswith("sha256sum /data/local/tmp/mobile_harness/") for c in phone.commands)
