"""Device lab pieces without a phone: runner output parsing, latency statistics, parity, the kit check."""

from pathlib import Path

import numpy as np
import pytest

from mobile_harness.kit import KitError, kit_binaries
from mobile_harness.latency import RunnerOutputError, parse_benchmark_model, parse_executor_runner, summarize
from mobile_harness.parity import evaluate_gates, parity

# benchmark_model's log as LiteRT prints it on a phone (tensorflow/lite/tools/benchmark/benchmark_model.cc).
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


def test_benchmark_model_log_gives_load_first_inference_and_aggregates() -> None:
    parsed = parse_benchmark_model(BENCHMARK_LOG)
    assert parsed["load_ms"] == pytest.approx(31.584) and parsed["first_inference_ms"] == pytest.approx(9.876)
    assert parsed["benchmark_model"] == {"runs": 50, "mean_ms": pytest.approx(5.0437), "std_ms": pytest.approx(0.19),
                                         "min_ms": pytest.approx(4.87), "max_ms": pytest.approx(6.12)}
    with pytest.raises(RunnerOutputError, match="Inference timings"):
        parse_benchmark_model(BENCHMARK_LOG.split("INFO: count=50")[0])


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
