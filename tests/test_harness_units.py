"""Device lab pieces without a phone: runner output parsing, latency statistics, parity, the kit check."""

from pathlib import Path

import numpy as np
import pytest

from mobile_harness.kit import KitError, kit_binaries
from mobile_harness.lab import (
    big_core_mask,
    cluster_label,
    cpu_clusters,
    hottest_zone,
    parse_cpus,
    parse_thermal_zones,
    peak_rss_kb,
    runner_failure,
    value_file_item,
)
from mobile_harness.latency import (
    DelegateNotApplied,
    RunnerOutputError,
    delegation,
    not_applied_reason,
    parse_benchmark_model,
    parse_executor_runner,
    require_delegation,
    summarize,
)
from mobile_harness.parity import evaluate_gates, parity

# benchmark_model's log as a TensorFlow Lite build from before percentiles prints it on a phone
# (tensorflow/lite/tools/benchmark/benchmark_model.cc, Stat::OutputToStream).
BENCHMARK_LOG = """\
INFO: STARTING!
INFO: Num threads: [4]
INFO: Graph: [/data/local/tmp/mobile_harness/x/mobilefacenet_fp32.tflite]
INFO: Loaded model /data/local/tmp/mobile_harness/x/mobilefacenet_fp32.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: The input model file size (MB): 4.19332
INFO: Initialized session in 31.584ms.
INFO: Running benchmark for at least 10 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=10 first=9876 curr=5012 min=4990 max=9876 avg=5530.1 std=1450

INFO: Running benchmark for at least 50 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=50 first=5020 curr=4998 min=4870 max=6120 avg=5043.7 std=190

INFO: Inference timings in us: Init: 31584, First inference: 9876, Warmup (avg): 5530.1, Inference (avg): 5043.7
"""


# The same run from a current LiteRT build: StatWithPercentiles appends p5 / median / p95.
LITERT_LOG = BENCHMARK_LOG.replace("avg=5530.1 std=1450", "avg=5530.1 std=1450 p5=4990 median=5020 p95=9876").replace(
    "avg=5043.7 std=190", "avg=5043.7 std=190 p5=4901 median=5011 p95=5480")


def test_benchmark_model_log_gives_load_first_inference_and_aggregates() -> None:
    parsed = parse_benchmark_model(BENCHMARK_LOG)
    assert parsed["load_ms"] == pytest.approx(31.584) and parsed["first_inference_ms"] == pytest.approx(9.876)
    assert parsed["warmup_runs"] == 10 and parsed["warmup_mean_ms"] == pytest.approx(5.5301)
    # An older build prints no percentiles: no median is made up from the mean.
    assert parsed["benchmark_model"] == {"runs": 50, "mean_ms": pytest.approx(5.0437), "std_ms": pytest.approx(0.19),
                                         "min_ms": pytest.approx(4.87), "max_ms": pytest.approx(6.12),
                                         "p5_ms": None, "median_ms": None, "p95_ms": None}
    with pytest.raises(RunnerOutputError, match="Inference timings"):
        parse_benchmark_model(BENCHMARK_LOG.split("INFO: count=50")[0])


def test_benchmark_model_percentiles_give_the_real_median() -> None:
    timed = parse_benchmark_model(LITERT_LOG)["benchmark_model"]
    assert timed["median_ms"] == pytest.approx(5.011) and timed["mean_ms"] == pytest.approx(5.0437)
    assert timed["p5_ms"] == pytest.approx(4.901) and timed["p95_ms"] == pytest.approx(5.48)
    # The profiling summary's `Timings (microseconds): count=...` form reads the same.
    labelled = LITERT_LOG.replace("INFO: count=50", "Timings (microseconds): count=50")
    assert parse_benchmark_model(labelled)["benchmark_model"]["median_ms"] == pytest.approx(5.011)
    # Every run the same: `count=N curr=X(all same)` stands for min, max and mean.
    same = LITERT_LOG.replace("count=50 first=5020 curr=4998 min=4870 max=6120 avg=5043.7 std=190 p5=4901 "
                              "median=5011 p95=5480", "count=50 curr=5000(all same) p5=5000 median=5000 p95=5000")
    assert parse_benchmark_model(same)["benchmark_model"] == {
        "runs": 50, "mean_ms": 5.0, "std_ms": 0.0, "min_ms": 5.0, "max_ms": 5.0, "p5_ms": 5.0, "median_ms": 5.0,
        "p95_ms": 5.0}


def test_benchmark_model_without_warmup_runs() -> None:
    """`--warmup_runs=0`: the warm-up Stat is empty (`count=0`, its first() and avg() print 0); the first
    inference is then the first timed run."""
    log = LITERT_LOG.replace("INFO: count=10 first=9876 curr=5012 min=4990 max=9876 avg=5530.1 std=1450 p5=4990 "
                             "median=5020 p95=9876", "INFO: count=0 p5=0 median=0 p95=0").replace(
        "First inference: 9876, Warmup (avg): 5530.1", "First inference: 0, Warmup (avg): 0")
    parsed = parse_benchmark_model(log)
    assert parsed["warmup_runs"] == 0 and parsed["warmup_mean_ms"] is None
    assert parsed["first_inference_ms"] == pytest.approx(5.02) and parsed["benchmark_model"]["runs"] == 50
    assert parsed["benchmark_model"]["median_ms"] == pytest.approx(5.011)
    # Builds that print the average of no runs as NaN, and without percentiles, read the same.
    nan = log.replace("INFO: count=0 p5=0 median=0 p95=0", "INFO: count=0").replace("Warmup (avg): 0",
                                                                                     "Warmup (avg): -nan")
    assert parse_benchmark_model(nan)["first_inference_ms"] == pytest.approx(5.02)
    with pytest.raises(RunnerOutputError, match="no timed runs"):
        parse_benchmark_model(log.replace("count=50 first=5020 curr=4998 min=4870 max=6120 avg=5043.7 std=190 p5=4901 "
                                          "median=5011 p95=5480", "count=0 p5=0 median=0 p95=0"))


# What benchmark_model logs around its delegates (benchmark_tflite_model.cc, gpu_delegate_provider.cc).
GPU_APPLIED = ("INFO: Created TensorFlow Lite delegate for GPU.\n"
               "INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the "
               "delegate.\n")
GPU_MISSING = "WARN: GPU acceleration is unsupported on this platform.\n"


def test_a_delegate_counts_only_when_benchmark_model_applied_it() -> None:
    assert require_delegation(GPU_APPLIED + LITERT_LOG, "gpu") == "full"
    partial = ("INFO: Explicitly applied XNNPACK delegate, and the model graph will be partially executed by the "
               "delegate w/ 3 delegate kernels.\n")
    assert delegation(partial + LITERT_LOG, "xnnpack") == "partial (3 delegate kernels)"
    assert delegation("INFO: Applied GPU delegate.\n" + LITERT_LOG, "gpu") == "applied"
    # A build that ignores --require_full_delegation when no delegate could be created: CPU timings, exit 0.
    with pytest.raises(DelegateNotApplied, match="GPU acceleration is unsupported on this platform") as raised:
        require_delegation(GPU_MISSING + LITERT_LOG, "gpu")
    assert "not reported as gpu" in str(raised.value)
    with pytest.raises(DelegateNotApplied, match="no 'Explicitly applied NNAPI delegate' line"):
        require_delegation(GPU_APPLIED + LITERT_LOG, "nnapi")
    # CPU rows need no delegate line; an XNNPACK row without one is not refused (XNNPACK is the CPU).
    assert require_delegation(LITERT_LOG, "cpu") is None and require_delegation(LITERT_LOG, "xnnpack") is None


def test_delegate_refusals_are_told_from_other_failures() -> None:
    refused = GPU_MISSING + "ERROR: Disallowed CPU fallback detected.\nERROR: Benchmarking failed.\n"
    assert not_applied_reason(refused) == ("WARN: GPU acceleration is unsupported on this platform. "
                                           "ERROR: Disallowed CPU fallback detected.")
    assert not_applied_reason("ERROR: Failed to apply GPU delegate.\nERROR: Benchmarking failed.") == (
        "ERROR: Failed to apply GPU delegate.")
    assert not_applied_reason("ERROR: Could not open 'm.tflite'.\nERROR: Benchmarking failed.\n") is None


def test_runner_failure_names_the_abort() -> None:
    aborted = ("face 0\nINFO: STARTING!\nFATAL: Cannot find the corresponding input_layer name(x:0) in --input_layer "
               "as x::0\n")
    assert runner_failure("benchmark_model", "m.tflite golden faces", 134, aborted) == (
        "benchmark_model failed on m.tflite golden faces (exit 134, killed by signal 6 (SIGABRT)): FATAL: Cannot find "
        "the corresponding input_layer name(x:0) in --input_layer as x::0")
    size = "FATAL: The size of in/0.bin is 12 bytes. It should be 150528 bytes.\n"
    assert runner_failure("benchmark_model", "x", 134, "INFO: STARTING!\n" + size).endswith(
        "(exit 134, killed by signal 6 (SIGABRT)): FATAL: The size of in/0.bin is 12 bytes. It should be 150528 bytes.")
    # An error exit names the first error, not benchmark_model's closing "Benchmarking failed.".
    assert runner_failure("benchmark_model", "x", 1, "ERROR: Input tensor #0 should have 4 dimensions!\n"
                          "ERROR: Benchmarking failed.\n").endswith("(exit 1): ERROR: Input tensor #0 should have 4 "
                                                                   "dimensions!")
    assert runner_failure("tflite_embed", "x", 139, "tflite_embed: loading model\n") == (
        "tflite_embed failed on x (exit 139, killed by signal 11 (SIGSEGV)): last output: "
        "'tflite_embed: loading model'")


def test_only_the_value_files_flag_escapes_a_colon() -> None:
    assert value_file_item("serving_default_args:0", "in_m/0.bin") == "serving_default_args::0:in_m/0.bin"
    assert value_file_item("image", "a:b.bin") == "image:a::b.bin"


def test_executor_runner_log_skips_warmup_iterations() -> None:
    lines = ["I 00:00:00.001 executorch:executor_runner.cpp:520] Model loaded in 12.500000 ms."]
    lines += [f"I 00:00:00.1 executorch:executor_runner.cpp:640] Iteration {i + 1} of 12: {ms:f} ms"
              for i, ms in enumerate([30.0, 9.0] + [float(v) for v in range(1, 11)])]
    parsed = parse_executor_runner("\n".join(lines), warmup=2)
    assert parsed["load_ms"] == 12.5 and parsed["first_inference_ms"] == 30.0
    assert parsed["runs"] == 10 and parsed["median_ms"] == 5.5 and parsed["max_ms"] == 10.0
    with pytest.raises(RunnerOutputError, match="not more than the 12 warm-up runs"):
        parse_executor_runner("\n".join(lines), warmup=12)


def test_latency_statistics() -> None:
    stats = summarize([float(v) for v in range(1, 101)] + [1000.0])
    assert stats["median_ms"] == 51.0 and stats["p90_ms"] == pytest.approx(91.0)
    assert stats["p95_ms"] == pytest.approx(96.0)
    # The outlier is outside the 10-90% band, so the trimmed mean ignores it.
    assert stats["trimmed_mean_ms"] == pytest.approx(51.0) and stats["mean_ms"] > 59


def test_parity_counts_flips_at_the_threshold_and_gates_it() -> None:
    reference = np.eye(4, dtype=np.float32)
    device = reference.copy()
    device[1] = [0.8, 0.6, 0, 0]  # face 1 drifts towards face 0: the pair (0, 1) now crosses 0.5
    result = parity(device, reference, [[0, 1, 0], [2, 3, 0]], threshold=0.5)
    assert result["flips"] == 1 and result["flip_rate"] == 0.5
    assert result["cosine_min"] == pytest.approx(0.6) and result["cosine_mean"] == pytest.approx(0.9)
    gates = evaluate_gates({"cosine_mean_min": 0.99, "flip_rate_max": None, "lfw_accuracy_drop_max": 0.005}, result)
    assert [(g["metric"], g["passed"]) for g in gates] == [("cosine_mean", False), ("lfw_accuracy_drop", None)]


def test_kit_binary_for_another_cpu_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "kit" / "arm64-v8a"
    folder.mkdir(parents=True)
    x86_64_elf = b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little") + bytes(40)
    (folder / "executor_runner").write_bytes(x86_64_elf)
    with pytest.raises(KitError, match=r"built for another CPU \(ELF machine 62, arm64-v8a needs 183\)"):
        kit_binaries(tmp_path / "kit", "arm64-v8a", {"executorch"})
    aarch64_elf = x86_64_elf[:18] + (183).to_bytes(2, "little") + x86_64_elf[20:]
    (folder / "executor_runner").write_bytes(aarch64_elf)
    assert kit_binaries(tmp_path / "kit", "arm64-v8a", {"executorch", "coreml"}) == {
        "executor_runner": folder / "executor_runner"}


# CPU_PROBE's lines from a phone with 4 little, 3 mid and 1 big core (cpu5 offline: nothing readable).
CPU_LINES = """\
cpu0|1800000|schedutil|0 1 2 3
cpu1|1800000|schedutil|0 1 2 3
cpu10|||
cpu2|1800000|schedutil|0 1 2 3
cpu3|1800000|schedutil|0 1 2 3
cpu4|2400000|schedutil|4 5 6
cpu5|||4 5 6
cpu6|2400000|schedutil|4 5 6
cpu7|3000000|performance|7
"""


def test_big_core_mask_and_clusters_from_cpufreq() -> None:
    cores = parse_cpus(CPU_LINES)
    assert [c["cpu"] for c in cores] == [0, 1, 2, 3, 4, 5, 6, 7, 10]
    assert big_core_mask(cores) == "80"
    clusters = cpu_clusters([c for c in cores if c["cpu"] != 10])
    assert [(c["cpus"], c["max_khz"], c["governor"]) for c in clusters] == [
        ([0, 1, 2, 3], 1800000, "schedutil"), ([4, 5, 6], 2400000, "schedutil"), ([7], 3000000, "performance")]
    assert [cluster_label(c["cpus"]) for c in clusters] == ["cpu0-3", "cpu4-6", "cpu7"]
    # Without related_cpus the cores group by max frequency; two big cores make a two-bit mask.
    flat = parse_cpus("cpu0|1800000|schedutil|\ncpu1|1800000|schedutil|\ncpu2|2800000|performance|\n"
                      "cpu3|2800000|performance|\n")
    assert big_core_mask(flat) == "c"
    assert [c["cpus"] for c in cpu_clusters(flat)] == [[0, 1], [2, 3]]
    assert big_core_mask(parse_cpus("cpu0|||\n")) is None and cluster_label([0, 2]) == "cpu0,2"


def test_peak_rss_line_is_cut_from_the_runner_output() -> None:
    output, peak = peak_rss_kb("INFO: a\nmobile_harness peak_rss_kb: 51234\n")
    assert output == "INFO: a\n" and peak == 51234
    assert peak_rss_kb("x\nmobile_harness peak_rss_kb: \n") == ("x\n", None)


def test_thermal_zones_in_millidegrees_degrees_and_unreadable() -> None:
    # THERMAL_PROBE's lines as a Snapdragon phone prints them: millidegrees, a vendor sensor in degrees, one whose
    # temp cannot be read (empty), one reporting an error code, and a stray line.
    output = ("thermal_zone0|cpu-0-0-usr|41200\nthermal_zone1|cpu-1-0-usr|47800\nthermal_zone2|battery|31000\n"
              "thermal_zone10|BIG|52\nthermal_zone3|tsens_tz_sensor9|\nthermal_zone4|cpuss-1|-274000\n"
              "cat: thermal_zone5/temp: Invalid argument\n")
    zones = parse_thermal_zones(output)
    assert [(z["zone"], z["c"]) for z in zones] == [
        ("thermal_zone0", 41.2), ("thermal_zone1", 47.8), ("thermal_zone2", 31.0), ("thermal_zone3", None),
        ("thermal_zone4", None), ("thermal_zone10", 52.0)]
    assert hottest_zone(zones, "cpu|big")["type"] == "BIG"
    assert hottest_zone(zones, "cpu")["c"] == 47.8, "the unreadable cpuss zone does not count"
    assert hottest_zone(zones, "gpu") is None
