"""The device lab end to end: the real adb client and server, simulated phones, a tiny factory build.

Every test drives `adb` 29 against `tests/adb_sim` phones on loopback, through a private adb server
port that is killed afterwards. Runner stand-ins compute real outputs with the host runtimes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from adb_sim.lab import GOLDEN_FACES, PhoneLab, make_tiny_build, phone_lab
from adb_sim.runtimes import ABORTED, RuntimeService, benchmark_model, make_test_kit
from adb_sim.sim import DeviceProfile, Faults, ThermalProfile

from factory.weights import sha256_of
from mobile_harness.adb import Adb
from mobile_harness.cli import main
from mobile_harness.lab import LabOptions, result_path, run_lab, runner_failure, value_file_item


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
    if shutil.which("adb") is None:
        pytest.fail("the adb client is not installed: `apt-get install -y adb` (`make test` installs it)",
                    pytrace=False)
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
        assert result["status"] == "ok" and result["verdict"] == "pass", result
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
                    # The phone has no GPU: benchmark_model would run on the CPU; the row holds no timings.
                    assert row["status"] == "unsupported", row
                    assert "Disallowed CPU fallback detected" in row["reason"]
                    assert not {"mean_ms", "median_ms", "benchmark_model", "runs"} & set(row)
                    continue
                assert row["status"] == "ok" and row["runs"] == 50
                assert 0 < row["median_ms"] <= row["p95_ms"] and row["load_ms"] > 0 and row["first_inference_ms"] > 0
            if name == "tiny_fp32.tflite":
                # Current benchmark_model builds print p5 / median / p95: the row is theirs, no tflite_embed run.
                for row in (r for r in rows if r["delegate"] == "xnnpack"):
                    assert row["tool"] == "benchmark_model" and row["distribution"]["tool"] == "benchmark_model"
                    assert row["median_ms"] == row["benchmark_model"]["median_ms"] and row["delegation"] == "full"
            else:
                assert all(row["trimmed_mean_ms"] > 0 and row["median_ms"] <= row["p90_ms"] for row in rows)
        for moment in ("before", "after"):
            thermal = result["thermal"][moment]
            assert thermal["battery_c"] == 30.1 and thermal["cpu0_governor"] == "schedutil"
            assert thermal["thermal_status"] == "0 (none)"
            assert thermal["governors"] == {"cpu0-3": "schedutil", "cpu4-6": "schedutil", "cpu7": "performance"}
        # The simulated phone's big core is cpu7 (3.0 GHz): mask 0x80; every latency runner went through taskset.
        assert result["cpu"]["pin_mask"] == "80" and result["cpu"]["pinned_cpus"] == [7]
        assert [(c["cpus"], c["max_khz"]) for c in result["cpu"]["clusters"]] == [
            ([0, 1, 2, 3], 1_800_000), ([4, 5, 6], 2_400_000), ([7], 3_000_000)]
        latency_commands = [c for c in phone.commands if "--num_runs=50" in c or "--num_executions=" in c]
        assert latency_commands and all("exec taskset 80 ./" in c for c in latency_commands)
        # The polling shell runs on the other cores (0x7f), the runners on 0x80.
        log = (phone.root / "taskset.log").read_text().split("\n")
        assert "80 ./benchmark_model" in log and "80 ./executor_runner" in log and "7f sh" in log
        # Golden faces (parity) are not pinned.
        assert not any("taskset 80" in c for c in phone.commands if "--output_filepath" in c)
        for artifact in (a for a in result["artifacts"] if a["latency"]):
            for row in artifact["latency"]:
                assert row["pinned"] == "80"
                if row["status"] == "ok":
                    # The stand-in runners are real host processes: a Python interpreter's high-water mark.
                    assert 1000 < row["peak_rss_kb"] < 10_000_000, row
        assert result["cleanup"].startswith("removed /data/local/tmp/mobile_harness/")
        assert remote_leftovers(phone) == []
        assert any(c.startswith("sha256sum /data/local/tmp/mobile_harness/") for c in phone.commands)


def processes_in(folder: Path) -> list[int]:
    """Host processes whose working directory is inside a simulated phone (its runners)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(Path(proc / "cwd").resolve()).startswith(str(folder)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_unauthorized_offline_and_absent_phones_fail_alone(lab: PhoneLab, build: Path) -> None:
    healthy = lab.add()
    unauthorized = lab.add(Faults(unauthorized=True), expect_state="unauthorized")
    offline = lab.add(Faults(offline=True), expect_state="offline")
    results = run(lab, build, options(lab), [healthy.serial, unauthorized.serial, offline.serial, "R58M123ABC"])
    assert results[healthy.serial]["status"] == "ok"
    assert "unauthorized" in results[unauthorized.serial]["reason"]
    assert "Allow USB debugging" in results[unauthorized.serial]["reason"]
    assert results[offline.serial]["reason"].startswith("offline")
    assert "not connected" in results["R58M123ABC"]["reason"]
    for serial in (unauthorized.serial, offline.serial, "R58M123ABC"):
        assert results[serial]["status"] == "failed" and results[serial]["failed_stage"] == "connect"


def test_phone_vanishing_mid_run_keeps_what_was_measured(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(vanish_on_command="parity_tiny_fp32_pte.sh"))
    result = run(lab, build, options(lab, reconnect_wait_s=2))[phone.serial]
    # The phone goes as the parity script's checksum is asked for.
    assert result["status"] == "failed" and result["failed_stage"] == "push"
    assert "did not come back" in result["reason"]
    tflite, pte = result["artifacts"][0], result["artifacts"][1]
    assert tflite["status"] == "ok" and tflite["parity"]["cosine_mean"] > 0.9999 and tflite["latency"]
    assert pte["status"] == "failed" and pte["reason"] == result["reason"]
    assert "could not remove" in result["cleanup"]


def test_push_survives_one_dropped_connection(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(drop_pushes=1))
    result = run(lab, build, options(lab))[phone.serial]
    assert phone.pushes_dropped == 1
    assert result["status"] == "ok", result["reason"]


def test_push_that_keeps_failing_fails_that_phone_only(lab: PhoneLab, build: Path) -> None:
    flaky, healthy = lab.add(Faults(drop_pushes=100)), lab.add()
    results = run(lab, build, options(lab, push_retries=2, reconnect_wait_s=5))
    assert results[healthy.serial]["status"] == "ok"
    flaky_result = results[flaky.serial]
    assert flaky_result["status"] == "failed" and flaky_result["failed_stage"] == "push"
    assert "failed 2 times" in flaky_result["reason"] and flaky.pushes_dropped == 2
    assert flaky_result["cleanup"].startswith("removed") and remote_leftovers(flaky) == []


def test_hung_runner_is_timed_out_and_killed(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(hang=["executor_runner"]))
    result = run(lab, build, options(lab, runner_timeout_s=4))[phone.serial]
    assert result["status"] == "failed" and "executor_runner hung on tiny_fp32.pte" in result["reason"]
    assert result["artifacts"][0]["status"] == "ok", "the .tflite results measured before the hang are kept"
    assert processes_in(phone.root) == [] and remote_leftovers(phone) == []


def test_crashing_runner_reports_exit_code_output_and_logcat(lab: PhoneLab, build: Path) -> None:
    # executor_runner runs after the .tflite artifact is measured, first on the .pte's golden faces.
    phone = lab.add(Faults(crash=["executor_runner"]))
    result = run(lab, build, options(lab))[phone.serial]
    assert result["status"] == "failed" and "executor_runner failed on tiny_fp32.pte golden faces" in result["reason"]
    assert "exit 139, killed by signal 11 (SIGSEGV)" in result["reason"]
    details = result["failure_details"]
    assert details["exit_code"] == 139 and "loading model" in details["output_tail"]
    assert "Fatal signal 11 (SIGSEGV)" in details["logcat_tail"]
    assert result["thermal"]["after"]["battery_c"] == 30.1, "thermal state is logged after a failure too"
    tflite, pte = result["artifacts"][0], result["artifacts"][1]
    assert tflite["status"] == "ok" and tflite["parity"]["faces"] == GOLDEN_FACES, "measured before the crash"
    assert tflite["latency"][0]["median_ms"] > 0
    assert pte["status"] == "failed" and pte["parity"] is None
    assert remote_leftovers(phone) == []


def test_full_storage_fails_before_pushing(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(free_kb=64))
    result = run(lab, build, options(lab))[phone.serial]
    assert result["failed_stage"] == "storage" and "64 KiB free" in result["reason"]
    assert not any(c.startswith("sha256sum") for c in phone.commands)


def test_storage_filling_up_during_the_push_fails_without_retrying(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(write_quota_kb=200))
    result = run(lab, build, options(lab))[phone.serial]
    assert result["failed_stage"] == "push" and "storage full while pushing" in result["reason"]
    assert "No space left on device" in result["reason"] and phone.pushes_dropped == 0
    assert result["cleanup"].startswith("removed") and remote_leftovers(phone) == []


def test_missing_kit_binary_says_how_to_get_it(lab: PhoneLab, build: Path, tmp_path: Path) -> None:
    phone = lab.add()
    (lab.kit / "arm64-v8a" / "executor_runner").unlink()
    result = run(lab, build, options(lab))[phone.serial]
    assert result["failed_stage"] == "kit"
    assert "executor_runner is missing" in result["reason"]
    assert "build_kit.sh executor_runner arm64-v8a" in result["reason"]
    other_abi = run(lab, build, options(lab, kit=tmp_path / "empty_kit"))[phone.serial]
    assert "benchmark_model is missing" in other_abi["reason"]
    assert "android_aarch64_benchmark_model" in other_abi["reason"]


def test_official_runners_alone_measure_parity_and_latency(lab: PhoneLab, build: Path, tmp_path: Path) -> None:
    """A kit of only the official tools, no tflite_embed, and an executor_runner that logs totals only."""
    kit = make_test_kit(tmp_path / "official_kit", "arm64-v8a", tools=("benchmark_model", "executor_runner"),
                        legacy=("executor_runner",))
    phone = lab.add()
    result = run(lab, build, options(lab, kit=kit))[phone.serial]
    assert result["status"] == "ok" and result["verdict"] == "pass", result
    by_file = {a["file"]: a for a in result["artifacts"]}
    for name in ("tiny_fp32.tflite", "tiny_fp32.pte"):
        assert by_file[name]["parity"]["faces"] == GOLDEN_FACES
        assert by_file[name]["parity"]["cosine_mean"] > 0.9999 and by_file[name]["parity"]["flips"] == 0
    # .tflite parity came from benchmark_model itself, one face per run.
    assert any("sh parity_tiny_fp32_tflite.sh" in c for c in phone.commands), phone.commands
    (tflite_row,) = by_file["tiny_fp32.tflite"]["latency"]
    assert tflite_row["tool"] == "benchmark_model" and tflite_row["runs"] == 50 and tflite_row["mean_ms"] > 0
    # The median is benchmark_model's own (its p5 / median / p95), not made up from the mean.
    timed = tflite_row["benchmark_model"]
    assert 0 < timed["p5_ms"] <= tflite_row["median_ms"] == timed["median_ms"] <= tflite_row["p95_ms"]
    assert tflite_row["p90_ms"] is None and tflite_row["distribution"]["tool"] == "benchmark_model"
    (pte_row,) = by_file["tiny_fp32.pte"]["latency"]
    assert pte_row["tool"] == "executor_runner (totals)" and pte_row["status"] == "ok", pte_row
    assert pte_row["runs"] == 50 and pte_row["mean_ms"] > 0 and pte_row["first_inference_ms"] > 0
    assert pte_row["median_ms"] is None and pte_row["load_ms"] is None
    executions = {c.split("--num_executions=")[1].split()[0].strip("'") for c in phone.commands
                  if "--num_executions=" in c}
    assert executions == {"1", "2", "52"}, "first inference, warm-up, warm-up + timed runs"


def test_benchmark_model_too_old_to_write_outputs(lab: PhoneLab, build: Path, tmp_path: Path) -> None:
    phone = lab.add()
    old = make_test_kit(tmp_path / "old_kit", "arm64-v8a", tools=("benchmark_model", "executor_runner"),
                        legacy=("benchmark_model",))
    result = run(lab, build, options(lab, kit=old))[phone.serial]
    assert result["status"] == "failed" and result["failed_stage"] == "run"
    assert "predates --output_filepath" in result["reason"] and "tflite_embed" in result["reason"]
    assert remote_leftovers(phone) == []
    with_embed = make_test_kit(tmp_path / "old_kit_embed", "arm64-v8a", legacy=("benchmark_model",))
    result = run(lab, build, options(lab, kit=with_embed))[phone.serial]
    assert result["verdict"] == "pass", result
    tflite = {a["file"]: a for a in result["artifacts"]}["tiny_fp32.tflite"]
    assert tflite["parity"]["cosine_mean"] > 0.9999
    # That old build prints no percentiles either: the distribution falls back to tflite_embed's runs.
    (row,) = tflite["latency"]
    assert row["tool"] == "benchmark_model + tflite_embed" and row["benchmark_model"]["median_ms"] is None
    assert 0 < row["median_ms"] <= row["p90_ms"] <= row["p95_ms"] and row["distribution"]["tool"] == "tflite_embed"


def test_hot_phone_cools_down_before_measuring(lab: PhoneLab, build: Path) -> None:
    phone = lab.add(Faults(battery_temp_tenths=452, cool_after_reads=3))
    result = run(lab, build, options(lab, cool_down_above_c=40, cool_down_poll_s=0.1))[phone.serial]
    before = result["thermal"]["before"]
    assert before["battery_c"] == 25.0 and before["still_hot"] is False and before["cool_down_s"] >= 0.2
    assert result["status"] == "ok"


def test_each_latency_row_waits_until_the_cpu_zone_cools(lab: PhoneLab, build: Path) -> None:
    # Every execution heats the simulated CPU zones 0.2 C; a row (2 warm-up + 50 runs) adds about 10 C, which halves
    # in tau ln 2 = 0.35 s. Rows after the first start hot and must wait for the 35 C threshold.
    tau, ambient, limit = 0.5, 30.0, 35.0
    phone = lab.add(profile=DeviceProfile(thermal=ThermalProfile(ambient_c=ambient, heat_per_run_c=0.2,
                                                                 cooling_tau_s=tau)))
    result = run(lab, build, options(lab, threads=[1, 2], row_cool_down_above_c=limit, row_cool_down_poll_s=0.05,
                                     row_cool_down_max_s=30))[phone.serial]
    assert result["status"] == "ok" and result["verdict"] == "pass", result
    # Parity: 8 faces of one execution per artifact; latency: four rows of 52 executions.
    assert phone.runs_heated == 2 * GOLDEN_FACES + 4 * 52
    rows = [row for artifact in result["artifacts"] for row in artifact["latency"]]
    assert len(rows) == 4
    waits = []
    for row in rows:
        cool = row["cool_down"]
        assert row["status"] == "ok" and row["median_ms"] > 0
        assert cool["source"] == "thermal zone" and cool["zone"] == "thermal_zone1 (cpu-1-0-usr)", cool
        assert cool["threshold_c"] == limit and cool["cooled"] is True and ambient <= cool["start_c"] <= limit
        if cool["found_c"] > limit:
            # Newton cooling of the excess over ambient: the wait it takes from found_c down to the threshold.
            needed = tau * np.log((cool["found_c"] - ambient) / (limit - ambient))
            assert needed - 0.05 <= cool["waited_s"] <= needed + 2.0, (needed, cool)
            assert cool["start_c"] > limit - 2, "polled every 0.05 s: it starts just under the threshold"
            waits.append(cool["waited_s"])
        else:
            assert cool["waited_s"] == 0 and cool["start_c"] == cool["found_c"]
    # The first row starts cool (the parity runs' heat is gone); the rows right after a latency row start hot.
    assert rows[0]["cool_down"]["found_c"] < limit and len(waits) >= 2 and min(waits) > 0, rows
    # At rest every zone reads ambient; after the last row the big core's zone is the hottest.
    assert result["thermal"]["before"]["cpu_zone"]["c"] == ambient
    after = result["thermal"]["after"]["cpu_zone"]
    assert after["zone"] == "thermal_zone1 (cpu-1-0-usr)" and after["c"] > ambient, after


def test_row_that_cannot_cool_is_measured_and_flagged(lab: PhoneLab, build: Path) -> None:
    # One phone stays hot (cooling takes hours); one has no CPU zone, so its battery (45.2 C, cool after 4 readings
    # of `dumpsys battery`: the thermal state before and three row readings) is watched instead.
    stuck = lab.add(profile=DeviceProfile(thermal=ThermalProfile(start_c=50.0, cooling_tau_s=36_000)))
    no_zone = lab.add(Faults(battery_temp_tenths=452, cool_after_reads=3),
                      DeviceProfile(thermal=ThermalProfile(zones=(("battery", 0.2), ("modem-0-usr", 1.0)))))
    results = run(lab, build, options(lab, row_cool_down_above_c=40, row_cool_down_max_s=0.5,
                                      row_cool_down_poll_s=0.1))
    result = results[stuck.serial]
    assert result["status"] == "ok" and result["verdict"] == "pass", "a hot row is flagged, not failed"
    rows = [row for artifact in result["artifacts"] for row in artifact["latency"]]
    assert len(rows) == 2
    for row in rows:
        cool = row["cool_down"]
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["runs"] == 50, "measured all the same"
        assert cool["cooled"] is False and 0.5 <= cool["waited_s"] <= 2.5, cool
        assert 49.5 < cool["start_c"] <= 50.0 and "still above 40 C after 0.5 s" in cool["note"]
    report = (build / "devices.md")
    main(["report", str(build)])
    # The wait overshoots its 0.5-s bound by up to a poll, more when the host's cores are busy.
    flagged = re.findall(r"\(waited (\d+(?:\.\d+)?) s, STILL HOT > 40\)", report.read_text())
    assert len(flagged) == 2 and all(0.5 <= float(waited) <= 2.5 for waited in flagged), report.read_text()

    fallback = [row["cool_down"] for artifact in results[no_zone.serial]["artifacts"] for row in artifact["latency"]]
    assert [c["source"] for c in fallback] == ["battery", "battery"] and fallback[0]["zone"] is None
    assert fallback[0]["found_c"] == 45.2 and fallback[0]["start_c"] == 25.0 and fallback[0]["cooled"] is True
    assert 0.2 <= fallback[0]["waited_s"] <= 2.0, "two polls of 0.1 s at least"
    assert fallback[1]["found_c"] == 25.0 and fallback[1]["waited_s"] == 0


def test_no_pin_and_time_floored_runs(lab: PhoneLab, build: Path) -> None:
    phone = lab.add()
    result = run(lab, build, options(lab, pin_big_cores=False, min_secs=1.0))[phone.serial]
    assert result["status"] == "ok", result
    assert result["cpu"]["pin_mask"] is None and result["cpu"]["pin_note"] == "off (--no-pin)"
    assert not any(f"taskset {mask} " in c for c in phone.commands for mask in ("80", "7f"))
    assert not (phone.root / "taskset.log").exists()
    rows = {a["file"]: a["latency"][0] for a in result["artifacts"] if a["latency"]}
    tflite, pte = rows["tiny_fp32.tflite"], rows["tiny_fp32.pte"]
    # benchmark_model got --min_secs=1 and ran for at least that long. Its clock counts its own time between runs
    # as well (1-2% of the second when the host's cores are busy), so the runs' summed time covers most of it.
    assert any("--min_secs=1 " in c for c in phone.commands)
    assert tflite["runs"] >= 50 and tflite["runs"] * tflite["mean_ms"] >= 1000 * 0.9
    # executor_runner was asked for more executions until the floor was met.
    assert pte["min_secs"]["floor_s"] == 1.0 and pte["min_secs"]["reached"] and pte["runs"] >= 50
    assert pte["min_secs"]["timed_s"] >= 1.0
    assert pte["peak_rss_kb"] > 0 and tflite["peak_rss_kb"] > 0 and tflite["pinned"] is None


def test_force_idle_is_undone_even_when_the_run_fails(lab: PhoneLab, build: Path) -> None:
    healthy, crashing = lab.add(), lab.add(Faults(crash=["executor_runner"]))
    results = run(lab, build, options(lab, force_idle=True, idle_settle_s=0.2))
    for phone in (healthy, crashing):
        idle = results[phone.serial]["idle"]
        assert idle["forced"] is True and idle["force_idle"] == "Now forced in to deep idle mode"
        assert idle["restored"].startswith("unforced: Light state: ACTIVE")
        assert not (phone.root / "deviceidle_forced").exists()
        commands = phone.commands
        forced_at = next(i for i, c in enumerate(commands) if c.startswith("dumpsys deviceidle force-idle"))
        unforced_at = next(i for i, c in enumerate(commands) if c.startswith("dumpsys deviceidle unforce"))
        assert any("--num_runs=50" in c for c in commands[forced_at:unforced_at])
    assert results[healthy.serial]["status"] == "ok" and results[crashing.serial]["status"] == "failed"


def test_cli_lists_devices_runs_and_writes_the_device_report(lab: PhoneLab, build: Path, capsys) -> None:
    phone = lab.add()
    lab.add(Faults(unauthorized=True), expect_state="unauthorized")
    port = ["--adb-port", str(lab.adb.port)]
    assert main(["devices", *port]) == 0
    listing = capsys.readouterr().out
    assert phone.serial in listing and "Pixel Sim" in listing and "Tensor G-sim" in listing
    assert "arm64-v8a" in listing and "unauthorized" in listing
    free_mib = str(73_689_792 // 1024)
    assert free_mib in listing

    (build / "report.md").write_text("# tiny model card\n\nfactory text\n")
    code = main(["run", str(build), "--device", phone.serial, "--kit", str(lab.kit), "--runs", "50", "--warmup", "2",
                 "--threads", "1,2", *port])
    assert code == 0, capsys.readouterr()
    report = (build / "devices.md").read_text()
    assert f"## {phone.serial} — Pixel Sim (Tensor G-sim)" in report and "**Status: ok, verdict: pass**" in report
    assert "| gpu |" not in report and "| tiny_fp32.tflite | xnnpack | 1 |" in report
    assert "| tiny_fp32.pte | xnnpack (in .pte) | 2 |" in report
    assert "cosine_mean >= 0.9999: pass" in report
    assert "| cpu0-3 schedutil, cpu4-6 schedutil, cpu7 performance |" in report
    assert "latency runners pinned to CPUs [7] (`taskset 80`)" in report and "| peak RSS MiB |" in report
    plot = build / "devices" / phone.serial.replace(":", "_") / "latency.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["run", str(build), "--device", "R58M123ABC", "--kit", str(lab.kit), *port]) == 1
    assert main(["report", str(build)]) == 0
    assert "| R58M123ABC | – | – | failed | fail |" in (build / "devices.md").read_text()
    # The build report carries one summary of every phone, replaced (not repeated) on each report.
    card = (build / "report.md").read_text()
    assert card.startswith("# tiny model card\n\nfactory text\n") and card.count("## On devices") == 1
    assert "[devices.md](devices.md)" in card and f"(devices/{phone.serial.replace(':', '_')}/latency.png)" in card
    assert f"| {phone.serial} (Pixel Sim, Tensor G-sim) | pass | tiny_fp32.pte |" in card
    assert "| R58M123ABC | fail (connect:" in card


def test_cli_refuses_bad_settings_with_what_to_use(build: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", str(build), "--all", "--delegate", "tpu"])
    assert "choose from xnnpack, cpu, gpu, nnapi" in capsys.readouterr().err
    assert main(["run", str(build), "--all", "--adb", "/nonexistent/adb"]) == 2
    assert "apt-get install -y adb" in capsys.readouterr().err
    assert main(["run", str(build), "--all", "--runs", "10"]) == 2
    assert "--runs 10: at least 50 timed runs" in capsys.readouterr().err
    assert main(["run", str(build), "--all", "--min-secs", "-1"]) == 2
    assert "--min-secs -1: give 0 (off) or more seconds" in capsys.readouterr().err
    assert main(["run", str(build), "--all", "--thermal-zones", "cpu(", "--row-cool-down-above", "40"]) == 2
    assert "--thermal-zones 'cpu(' is not a regular expression" in capsys.readouterr().err
    assert main(["run", str(build), "--all", "--row-cool-down-max", "-5"]) == 2
    assert "--row-cool-down-max -5" in capsys.readouterr().err


@pytest.mark.device
def test_real_phone_runs_the_same_flow(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """With a phone attached (and a runner kit in $MOBILE_HARNESS_KIT), the same flow on real hardware."""
    adb = Adb()
    serials = [e.serial for e in adb.devices() if e.state == "device"]
    if not serials:
        pytest.skip("no Android phone attached (`adb devices` lists none in state `device`)")
    kit = Path(os.environ.get("MOBILE_HARNESS_KIT", "kit"))
    build = Path(shutil.copytree(request.getfixturevalue("tiny_build"), tmp_path / "build"))
    results = run_lab(adb, build, serials[:1], False, LabOptions(kit=kit, threads=[1]), "pytest -m device", print)
    result = results[serials[0]]
    assert result["status"] == "ok", result["reason"]
    for artifact in result["artifacts"]:
        if artifact["status"] != "skipped":
            assert artifact["parity"]["cosine_mean"] > 0.999
            assert all(row["median_ms"] > 0 for row in artifact["latency"] if row["status"] == "ok")


def test_gate_missed_on_the_phone_fails_the_verdict(lab: PhoneLab, build: Path) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["resolved_recipe"]["gates"]["fp32"]["cosine_min_min"] = 1.5
    (build / "manifest.json").write_text(json.dumps(manifest))
    phone = lab.add()
    result = run(lab, build, options(lab))[phone.serial]
    assert result["status"] == "ok" and result["verdict"] == "fail"
    assert result["gate_failures"] == ["tiny_fp32.tflite", "tiny_fp32.pte"]
    gate = next(g for g in result["artifacts"][0]["gates"] if g["metric"] == "cosine_min")
    assert gate["passed"] is False and gate["value"] > 0.9999


def rename_tflite_input(build: Path, name: str) -> str:
    """Give the build's .tflite input tensor `name` (of the old name's length, so the flatbuffer stays valid),
    as a converter writing TensorFlow-style names (`x:0`) would; the manifest follows. Returns the old name."""
    manifest = json.loads((build / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["format"] == "tflite")
    old = artifact["io"]["input"]["name"]
    assert len(name) == len(old)
    path = build / artifact["file"]
    path.write_bytes(path.read_bytes().replace(old.encode(), name.encode()))
    artifact["sha256"] = sha256_of(path)
    artifact["io"]["input"]["name"] = name
    (build / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_input_name_with_a_colon_and_no_warmup(lab: PhoneLab, build: Path) -> None:
    """`--input_layer` takes the name as it is, only `--input_layer_value_files` writes its ':' as '::'
    (benchmark_model aborts otherwise); `--warmup 0` leaves benchmark_model a `count=0` warm-up line."""
    old = rename_tflite_input(build, "serving_default_args:0")
    assert old == "serving_default_args_0"
    from ai_edge_litert.interpreter import Interpreter

    assert Interpreter(model_path=str(build / "tiny_fp32.tflite")).get_input_details()[0]["name"] == (
        "serving_default_args:0")
    phone = lab.add()
    result = run(lab, build, options(lab, warmup=0))[phone.serial]
    assert result["status"] == "ok" and result["verdict"] == "pass", result["reason"]
    tflite = {a["file"]: a for a in result["artifacts"]}["tiny_fp32.tflite"]
    assert tflite["parity"]["faces"] == GOLDEN_FACES and tflite["parity"]["cosine_mean"] > 0.9999
    (row,) = tflite["latency"]
    assert row["status"] == "ok" and row["warmup_runs"] == 0 and row["warmup_mean_ms"] is None
    assert row["runs"] == 50 and row["first_inference_ms"] > 0 and 0 < row["median_ms"] <= row["p95_ms"]


def bench(argv: list[str], cwd: Path, legacy: bool = False) -> tuple[int, str]:
    """The benchmark_model stand-in run directly in `cwd`: exit status and output (stdout, then stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = benchmark_model(argv, cwd, out, err, legacy=legacy)
    return code, out.getvalue() + err.getvalue()


def test_benchmark_model_standin_fails_as_the_real_tool(tiny_build: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_build / "tiny_fp32.tflite", tmp_path)
    face = np.zeros((1, 112, 112, 3), dtype=np.float32)
    face.tofile(tmp_path / "face.bin")
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    name = next(a for a in manifest["artifacts"] if a["format"] == "tflite")["io"]["input"]["name"]
    common = ["--graph=tiny_fp32.tflite", "--warmup_runs=0", "--warmup_min_secs=0", "--num_runs=1", "--min_secs=0",
              "--input_layer_shape=1,112,112,3"]
    code, output = bench([*common, f"--input_layer={name}",
                          f"--input_layer_value_files={value_file_item(name, 'face.bin')}"], tmp_path)
    assert code == 0 and "INFO: count=0 p5=0 median=0 p95=0" in output, output
    # A ':' escaped in --input_layer too: the value file's layer is not found, and the tool aborts.
    code, output = bench([*common, "--input_layer=a::b", "--input_layer_value_files=a::b:face.bin"], tmp_path)
    assert code == ABORTED == 134
    assert "FATAL: Cannot find the corresponding input_layer name(a:b) in --input_layer as a::b" in output
    assert runner_failure("benchmark_model", "m golden faces", code, output) == (
        "benchmark_model failed on m golden faces (exit 134, killed by signal 6 (SIGABRT)): FATAL: Cannot find the "
        "corresponding input_layer name(a:b) in --input_layer as a::b")
    # An input file of another size than the tensor: aborts too.
    (tmp_path / "short.bin").write_bytes(b"\0" * 12)
    code, output = bench([*common, f"--input_layer={name}", f"--input_layer_value_files={name}:short.bin"], tmp_path)
    assert code == 134 and "FATAL: The size of short.bin is 12 bytes. It should be 150528 bytes." in output
    assert runner_failure("benchmark_model", "m", code, output).endswith(
        "FATAL: The size of short.bin is 12 bytes. It should be 150528 bytes.")
    # No GPU on the simulated phone: a warning and the CPU, exit 0, unless full delegation is required.
    gpu = ["--graph=tiny_fp32.tflite", "--num_runs=2", "--min_secs=0", "--use_xnnpack=false", "--use_gpu=true"]
    code, output = bench(gpu, tmp_path)
    assert code == 0 and "WARN: GPU acceleration is unsupported on this platform." in output
    assert "Explicitly applied GPU" not in output and "INFO: count=2 " in output
    code, output = bench([*gpu, "--require_full_delegation=true"], tmp_path)
    assert code == 1 and "ERROR: Disallowed CPU fallback detected." in output and "count=" not in output
