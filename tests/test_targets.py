"""Each target compiled from a tiny model with MobileFaceNet's op mix, then run in its own runtime."""

import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.metrics import cosine_summary
from factory.targets import CompileRequest, get_target

MEAN, STD = [127.5, 127.5, 127.5], [128.0, 128.0, 128.0]


def pixels(count: int, seed: int) -> np.ndarray:
    """Smooth random images (closer to photographs than white noise), NCHW float32 in [0, 255]."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(count, 3, 14, 14)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=112, mode="bilinear").numpy()


def compile_tiny(backbone: torch.nn.Module, fmt: str, precision: str, out: Path):
    target = get_target(fmt)
    output = out / f"tiny_{precision}{target.suffix}"
    request = CompileRequest(backbone, MEAN, STD, 32, precision, pixels(64, 0), output)
    return target, target.compile(request)


def run_parity(target, artifact, backbone: torch.nn.Module) -> dict[str, float]:
    x = pixels(16, 1)
    with torch.no_grad():
        reference = Embedder(backbone, MEAN, STD, 32).eval()(torch.from_numpy(x)).numpy()
    runner = target.load_runner(artifact.path, 1)
    feed = x.transpose(0, 2, 3, 1).copy() if artifact.input_layout == "NHWC" else x
    out = runner(feed)
    assert out.shape == reference.shape
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3), "artifacts output unit-length embeddings"
    return cosine_summary(out, reference)


@pytest.mark.parametrize(("fmt", "precision", "min_cosine"), [
    ("tflite", "fp32", 0.9999), ("tflite", "int8", 0.98),
    ("executorch", "fp32", 0.9999), ("executorch", "int8", 0.98),
])
def test_artifact_matches_pytorch_in_its_runtime(tiny_backbone, tmp_path, fmt, precision, min_cosine) -> None:
    target, artifact = compile_tiny(tiny_backbone, fmt, precision, tmp_path)
    assert artifact.path.is_file() and artifact.path.stat().st_size > 10_000
    assert artifact.input_dtype == "float32" and artifact.output_dtype == "float32", "float I/O in every precision"
    parity = run_parity(target, artifact, tiny_backbone)
    assert parity["cosine_mean"] >= min_cosine, parity
    if fmt == "executorch":
        assert artifact.details["delegated"] and artifact.details["delegate_calls"] >= 1
    if fmt == "tflite":
        assert artifact.details["xnnpack_partitions"] == 1, "MobileFaceNet's op mix runs whole in XNNPACK"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tflite_verifies_side_by_side_with_the_numbers_of_one_runner(tiny_backbone, tmp_path, monkeypatch,
                                                                     precision) -> None:
    """On several cores LiteRT verifies on one single-threaded Interpreter per core, batches side by side: the
    embeddings are exactly those of one Interpreter on one thread, in order."""
    import factory.latency
    from factory.targets import base, verification_runner

    target, artifact = compile_tiny(tiny_backbone, "tflite", precision, tmp_path)
    faces = pixels(2 * base.VERIFY_BATCH + 5, 2).transpose(0, 2, 3, 1).copy()  # three batches, the last short
    loaded = []
    load_runner = target.load_runner
    monkeypatch.setattr(target, "load_runner", lambda path, threads=None: loaded.append(threads)
                        or load_runner(path, threads))
    monkeypatch.setattr(factory.latency, "all_threads", lambda: 3)
    side_by_side = verification_runner(target, artifact.path)(faces)
    assert loaded == [1, 1, 1], "one single-threaded runner per core"
    assert np.array_equal(side_by_side, load_runner(artifact.path, 1)(faces))
    assert side_by_side.shape == (len(faces), 32)


def test_executorch_verifies_on_one_runner_of_every_core(tiny_backbone, tmp_path, monkeypatch) -> None:
    """ExecuTorch's Python runtime holds the GIL while it runs: side by side would only take turns."""
    import factory.latency
    from factory.targets import verification_runner

    target, artifact = compile_tiny(tiny_backbone, "executorch", "fp32", tmp_path)
    loaded = []
    load_runner = target.load_runner
    monkeypatch.setattr(target, "load_runner", lambda path, threads=None: loaded.append(threads)
                        or load_runner(path, threads))
    monkeypatch.setattr(factory.latency, "all_threads", lambda: 2)
    verification_runner(target, artifact.path)
    assert loaded == [2]


def test_tflite_int8_really_computes_in_int8(tiny_backbone, tmp_path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    _, artifact = compile_tiny(tiny_backbone, "tflite", "int8", tmp_path)
    interpreter = Interpreter(model_path=str(artifact.path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    conv_inputs = [tensors[op["inputs"][0]]["dtype"] for op in interpreter._get_ops_details()
                   if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert conv_inputs and all(dtype == np.int8 for dtype in conv_inputs)


def test_executorch_refuses_a_graph_that_is_not_fully_delegated(tmp_path) -> None:
    class WithCumsum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 112)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.conv(x).flatten(1), dim=1)  # no XNNPACK kernel for cumsum

    with pytest.raises(FactoryError, match="not delegated to XNNPACK"):
        compile_tiny(WithCumsum().eval(), "executorch", "fp32", tmp_path)
    assert not list(tmp_path.glob("*.pte")), "nothing half-written"


@pytest.mark.parametrize(("precision", "weights_int8", "activations_int8", "min_cosine"), [
    ("fp16", False, False, 0.999), ("w8", True, False, 0.999),
    ("int8", True, True, 0.98),
])
def test_coreml_program_is_built_as_promised_and_matches_pytorch(tiny_backbone, tmp_path, precision, weights_int8,
                                                                 activations_int8, min_cosine) -> None:
    import coremltools as ct

    target, artifact = compile_tiny(tiny_backbone, "coreml", precision, tmp_path)
    assert (artifact.path / "Manifest.json").is_file()
    spec = ct.models.MLModel(str(artifact.path), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["image"]
    assert [o.name for o in spec.description.output] == ["embedding"]
    ops = [op.type for function in spec.mlProgram.functions.values()
           for block in function.block_specializations.values() for op in block.operations]
    assert ("constexpr_affine_dequantize" in ops) == weights_int8
    # W8A8: every conv reads a dequantised int8 activation.
    assert ops.count("quantize") >= (ops.count("conv") if activations_int8 else 0)
    assert ("quantize" in ops) == activations_int8 and ("dequantize" in ops) == activations_int8
    # Off macOS this runs in the factory's reference interpreter, on macOS in Core ML itself.
    parity = run_parity(target, artifact, tiny_backbone)
    assert parity["cosine_mean"] >= min_cosine, parity


def test_coreml_int8_activation_ranges_count_every_calibration_face_in_any_order(tiny_backbone, tmp_path) -> None:
    """Faces are calibrated one at a time; a moving-average observer would forget all but the last ~100."""
    target = get_target("coreml")
    faces = pixels(64, 0)
    x = torch.from_numpy((pixels(8, 1) - 127.5) / 128.0)

    def embeddings(calibration: np.ndarray) -> np.ndarray:
        request = CompileRequest(tiny_backbone, MEAN, STD, 32, "int8", calibration, tmp_path / "x.mlpackage")
        quantised = request.quantized_backbone(*target.int8_quantizer(request), fold_quantize=True)
        with torch.no_grad():
            return torch.cat([quantised(x[i : i + 1]) for i in range(len(x))]).numpy()

    forward, backward = embeddings(faces), embeddings(faces[::-1].copy())
    np.testing.assert_allclose(forward, backward, rtol=0, atol=1e-6)


@pytest.mark.skipif(platform.system() == "Darwin", reason="off macOS only: the reference interpreter verifies")
def test_coreml_off_macos_is_verified_by_the_reference_interpreter_and_not_timed() -> None:
    target = get_target("coreml")
    assert target.runtime_name == "Core ML reference interpreter (factory, fp16 emulation)"
    assert target.host_latency is False
    assert target.extra_runners(Path("unused.mlpackage")) == {}


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML's runtime (CPU, GPU, Neural Engine) is macOS-only")
def test_coreml_on_macos_verifies_on_cpu_gpu_and_neural_engine(tiny_backbone, tmp_path) -> None:
    target, artifact = compile_tiny(tiny_backbone, "coreml", "fp16", tmp_path)
    assert target.runtime_name == "Core ML runtime (macOS, CPU_ONLY)" and target.host_latency
    extra = target.extra_runners(artifact.path)
    assert set(extra) == {"Core ML runtime (macOS, CPU_AND_GPU)", "Core ML runtime (macOS, CPU_AND_NE)"}
    x = pixels(8, 1)
    with torch.no_grad():
        reference = Embedder(tiny_backbone, MEAN, STD, 32).eval()(torch.from_numpy(x)).numpy()
    for runtime, runner in extra.items():
        assert cosine_summary(runner(x), reference)["cosine_mean"] >= 0.999, runtime


class TinySeedBlocks(torch.nn.Module):
    """The seed systems' export-sensitive pieces at toy width: seesaw blocks (uneven channel split,
    shuffle and share variants, squeeze-excitation with its sigmoid gate, h-swish) and a keepdim global mean."""

    def __init__(self) -> None:
        super().__init__()
        from factory.models.layers import ConvBNAct
        from factory.models.seesawfacenet import SeesawBlock

        self.features = torch.nn.Sequential(
            ConvBNAct(3, 16, 3, 4, activation=lambda _c: torch.nn.Hardswish()),
            SeesawBlock(16, 16, 32, 1, shuffle=True, shortcut="none"),
            SeesawBlock(16, 32, 64, 2, shuffle=False, shortcut="conv"),
        )
        self.embedding = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(x).mean(dim=(2, 3), keepdim=True).flatten(1))


@pytest.mark.parametrize(("fmt", "precision", "min_cosine"), [
    ("executorch", "fp32", 0.9999), ("executorch", "int8", 0.98), ("tflite", "fp32", 0.9999), ("coreml", "fp16", 0.999),
])
def test_seed_system_blocks_compile_whole_and_match_pytorch(tmp_path, fmt, precision, min_cosine) -> None:
    from helpers import settle_batchnorm

    torch.manual_seed(0)
    backbone = settle_batchnorm(TinySeedBlocks(), torch.from_numpy((pixels(32, 5) - 127.5) / 128.0))
    # ExecuTorch refuses an artifact with any op left outside XNNPACK; the others check their own graphs.
    target, artifact = compile_tiny(backbone, fmt, precision, tmp_path)
    parity = run_parity(target, artifact, backbone)
    assert parity["cosine_mean"] >= min_cosine, parity
    if fmt == "executorch":
        assert artifact.details["delegated"]


def test_tflite_int8_keeps_hardswish_inside_xnnpack(tmp_path) -> None:
    """LiteRT's XNNPACK delegate takes float HARD_SWISH but not int8: left to the converter, the seesaw blocks'
    int8 .tflite falls apart into partitions. Written as x * hardsigmoid(x) it stays whole, and as accurate."""
    from ai_edge_litert.interpreter import Interpreter
    from helpers import settle_batchnorm

    from factory.targets.tflite import gate_hardswish

    torch.manual_seed(0)
    backbone = settle_batchnorm(TinySeedBlocks(), torch.from_numpy((pixels(32, 5) - 127.5) / 128.0))
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(gate_hardswish(backbone)(x), backbone(x), atol=1e-5), "the same function"
    target, int8 = compile_tiny(backbone, "tflite", "int8", tmp_path)
    assert int8.details["xnnpack_partitions"] == 1
    ops = {op["op_name"] for op in Interpreter(model_path=str(int8.path))._get_ops_details()}
    assert "HARD_SWISH" not in ops and "MUL" in ops
    assert run_parity(target, int8, backbone)["cosine_mean"] >= 0.98


@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_lefv_recogniser_int8_matches_pytorch(tmp_path, fmt) -> None:
    """LEFV's dropout must not reach the exported graph: as a no-op node there it broke litert-torch's int8
    conversion (cosine 0.67 with PyTorch on the trained model, while its PT2E simulation gave 0.9997)."""
    from helpers import settle_batchnorm

    from factory.models import create_model

    torch.manual_seed(0)
    backbone = settle_batchnorm(create_model("lefv", embedding_size=32),
                                torch.from_numpy((pixels(32, 5) - 127.5) / 128.0))
    exported = torch.export.export(backbone, (torch.zeros(1, 3, 112, 112),))
    assert not any("dropout" in str(node.target) for node in exported.graph.nodes)
    target, artifact = compile_tiny(backbone, fmt, "int8", tmp_path)
    assert run_parity(target, artifact, backbone)["cosine_mean"] >= 0.98
