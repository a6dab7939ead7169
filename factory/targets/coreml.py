"""Core ML target: coremltools converts the exported program to an ML program (.mlpackage).

fp16: weights and compute in float16, the precision the Neural Engine runs (iOS 16+).
w8: weights stored as int8 (per-channel symmetric, `constexpr_affine_dequantize`, iOS 16+), compute
and activations in float16: coremltools' post-training weight quantisation.
int8: static W8A8 like the other formats' int8. The backbone is quantised on the PyTorch side with
coremltools' PT2E CoreMLQuantizer (as packaged by ExecuTorch), calibrated on the recipe's real faces;
ct.convert turns its int8 weights into `constexpr_affine_dequantize` and its activation
quantise/dequantise pairs into iOS 17 `quantize`/`dequantize` ops, which the Neural Engine fuses into
int8 compute.

Core ML programs execute only in Apple's runtime. On macOS the factory verifies with it (CPU only, plus
the GPU and Neural Engine as extra rows); on other hosts it verifies with the factory's Core ML
reference interpreter (`factory.coreml_interpreter`), which runs the saved program op by op with
float16 rounding emulated, and says so in every report.
"""

from __future__ import annotations

import json
import platform
import uuid
from pathlib import Path

import numpy as np
import torch

from factory.io import atomic_path
from factory.stages import Stage
from factory.targets.base import CompiledArtifact, CompileRequest, Runner, batched, register_target

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEPLOYMENT_TARGETS = {"fp16": "iOS16", "w8": "iOS16", "int8": "iOS17"}  # iOS 17 brings activation quantize
QUANTIZATION = {
    "fp16": "none (float16 weights and compute)",
    "w8": "W8: int8 per-channel symmetric weights (constexpr_affine_dequantize), float16 activations and compute",
    "int8": "W8A8: int8 per-channel weights (constexpr_affine_dequantize), uint8 activations calibrated on real "
            "faces (iOS 17 quantize/dequantize around every conv), float16 between them",
}
RUNTIME_MACOS = "Core ML runtime (macOS, CPU_ONLY)"
EXTRA_COMPUTE_UNITS = ("CPU_AND_GPU", "CPU_AND_NE")
RUNTIME_INTERPRETER = "Core ML reference interpreter (factory, fp16 emulation)"
# Faces per interpreter run. Small batches keep each activation in the CPU's caches: MobileFaceNet's fp16
# program takes about 3.5 ms a face at batch 8 and 9-11 ms at batch 64 on the 2-core build machine.
INTERPRETER_BATCH = 8


# Package metadata that changes with the day of the build, not with the model: left out of shipped packages.
VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)
_MANIFEST_NAMESPACE = uuid.UUID("6f1d3c1e-52b1-4e55-9a57-0c3f1f0e7a10")


def make_reproducible(package: Path) -> None:
    """Rewrite a saved .mlpackage so the same model always gives the same bytes.

    coremltools' save varies in three ways from one run to the next (`docs/reproducibility.md`):
    `Manifest.json` names each item by a random UUID; the model spec's protobuf maps (user metadata, op
    attributes) are written in an order that depends on Python's string hashing, which differs per process; and
    the metadata carries the conversion date. Here the items get UUIDs derived from their paths, the spec is
    written with protobuf's deterministic (key-sorted) serialisation, and the date is dropped (the build report
    records when it was built). The spec itself is unchanged: it parses back equal, less the date.
    """
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(_MANIFEST_NAMESPACE, entry["path"]))
               for old, entry in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    spec_path = package / "Data" / root["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    for key in VOLATILE_METADATA:
        spec.description.metadata.userDefined.pop(key, None)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


class CoreMLTarget:
    compiles_in_worker = True  # factory.compile_lane
    format = "coreml"
    suffix = ".mlpackage"
    precisions = ("fp16", "w8", "int8")

    @property
    def runtime_name(self) -> str:
        """What executes Core ML artifacts on this host: Apple's runtime on macOS, else the interpreter."""
        return RUNTIME_MACOS if platform.system() == "Darwin" else RUNTIME_INTERPRETER

    @property
    def host_latency(self) -> bool:
        return platform.system() == "Darwin"

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        example = request.example_pixels()
        backbone = None
        if request.precision == "int8":
            backbone = request.quantized_backbone(*self.int8_quantizer(request), fold_quantize=True)
        with request.stages.stage(Stage.EXPORT, request.label):
            exported = torch.export.export(request.deployable(backbone), example).run_decompositions({})
        shape = tuple(example[0].shape)
        with request.stages.stage(Stage.LOWER, f"{request.label}: coremltools ML program"):
            mlmodel = self._convert(exported, shape, request.precision, request.output_name,
                                    request.w8_keep_float16_up_to)
        mlmodel.short_description = request.description
        with request.stages.stage(Stage.SERIALIZE, request.label), atomic_path(request.output) as tmp:
            mlmodel.save(str(tmp))
            make_reproducible(tmp)
        return CompiledArtifact(
            path=request.output,
            format=self.format,
            precision=request.precision,
            input_name=INPUT_NAME,
            input_layout="NCHW",
            input_shape=list(shape),
            input_dtype="float32 (MLMultiArray)",
            output_name=request.output_name,
            output_shape=request.artifact_output_shape,
            output_dtype="float32 (MLMultiArray)",
            quantization=QUANTIZATION[request.precision] + (
                f"; weight tensors of up to {request.w8_keep_float16_up_to} elements kept in float16"
                if request.precision == "w8" and request.w8_keep_float16_up_to else ""),
            details={"deployment_target": DEPLOYMENT_TARGETS[request.precision], "compute_precision": "float16"},
        )

    @staticmethod
    def int8_quantizer(request: CompileRequest) -> tuple[object, torch.nn.Module]:
        """A fresh PT2E quantiser for int8, and the network it quantises (the backbone)."""
        import coremltools.optimize.torch.quantization as ctq

        from factory.targets.coreml_patterns import pruned_coreml_quantizer

        # Affine activations (a zero point per tensor) suit PReLU outputs, which are far from symmetric;
        # weights stay int8 per output channel. Core ML takes the folded int8 weights directly
        # (coremltools converts dequantize_per_channel but not quantize_per_channel).
        # Activation ranges: plain min/max over every calibration face. The default moving-average observer
        # (constant 0.01) remembers only the last ~100 of the faces calibrated one at a time and clips the
        # rest: on fastfacenet_0_25 it gave mean / min cosine 0.99198 / 0.847 to fp32 on 1,000 LFW faces,
        # min/max 0.99912 / 0.973 (XNNPACK's histogram observer: 0.99585 / 0.935).
        config = ctq.LinearQuantizerConfig(global_config=ctq.ModuleLinearQuantizerConfig(
            quantization_scheme="affine", activation_dtype=torch.quint8, weight_dtype=torch.qint8,
            weight_per_channel=True, activation_observer="min_max",
        ))
        return pruned_coreml_quantizer(config), request.backbone

    @staticmethod
    def _convert(exported: torch.export.ExportedProgram, shape: tuple[int, ...], precision: str,
                 output_name: str = OUTPUT_NAME, w8_keep_float16_up_to: int = 0) -> object:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        mlmodel = ct.convert(
            exported,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGETS[precision]),
        )
        if precision == "w8":
            config = cto.OptimizationConfig(
                global_config=cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_channel",
                    weight_threshold=w8_keep_float16_up_to,
                )
            )
            mlmodel = cto.linear_quantize_weights(mlmodel, config=config)
        return mlmodel

    def load_runner(self, path: Path, threads: int | None = None) -> Runner:
        if platform.system() == "Darwin":
            return self._runtime_runner(path, "CPU_ONLY")
        return self._interpreter_runner(path, threads)

    @staticmethod
    def _runtime_runner(path: Path, compute_unit: str) -> Runner:
        import coremltools as ct

        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_unit))
        output_name = model.get_spec().description.output[0].name

        def run_one(x: np.ndarray) -> np.ndarray:
            output = np.asarray(model.predict({INPUT_NAME: x})[output_name], np.float32)
            return output.reshape(1, *output.shape[1:]) if output.ndim > 1 else output.reshape(1, -1)

        return batched(run_one)

    @staticmethod
    def _interpreter_runner(path: Path, threads: int | None) -> Runner:
        from factory.coreml_interpreter import CoreMLInterpreter
        from factory.parallel import map_batches

        interpreter = CoreMLInterpreter.from_package(path)
        (output_name,) = interpreter.output_names

        def run_batch(batch: np.ndarray) -> np.ndarray:
            return interpreter.run({INPUT_NAME: batch})[output_name]

        def run(batch: np.ndarray) -> np.ndarray:
            # Batches side by side on one intra-op thread each: the same numbers on any core count.
            return map_batches(run_batch, batch, INTERPRETER_BATCH, threads).astype(np.float32)

        return run

    def extra_runners(self, path: Path) -> dict[str, Runner]:
        """On macOS, the GPU and the Neural Engine as well (Core ML may still fall back to the CPU per op)."""
        if platform.system() != "Darwin":
            return {}
        return {f"Core ML runtime (macOS, {unit})": self._runtime_runner(path, unit) for unit in EXTRA_COMPUTE_UNITS}


register_target(CoreMLTarget())
