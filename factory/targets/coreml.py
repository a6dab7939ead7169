"""Core ML target: coremltools converts the exported program to an ML program (.mlpackage).

fp16: weights and compute in float16, the precision the Neural Engine runs.
int8: weights stored as int8 (per-channel symmetric, `constexpr_affine_dequantize`, iOS 16+),
compute in float16. Activations stay float16: that is what coremltools' post-training weight
quantisation produces and what every iOS 16 device runs; a W8A8 variant needs iOS 17 activation
quantisation and is added once Core ML artifacts can be verified off macOS.
Core ML programs execute only on Apple's runtime, so on Linux they are built but not run here.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from factory.io import atomic_path
from factory.stages import Stage
from factory.targets.base import CompiledArtifact, CompileRequest, Runner, batched, register_target

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEPLOYMENT_TARGET = "iOS16"


class CoreMLTarget:
    format = "coreml"
    suffix = ".mlpackage"
    precisions = ("fp16", "int8")
    runtime_name = "Core ML (macOS only)"

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        example = request.example_pixels()
        with request.stages.stage(Stage.EXPORT, request.label):
            exported = torch.export.export(request.deployable(), example).run_decompositions({})
        shape = tuple(example[0].shape)
        with request.stages.stage(Stage.LOWER, f"{request.label}: coremltools ML program"):
            mlmodel = self._convert(exported, shape, request.precision)
        mlmodel.short_description = "Face embedding model built by the mobile face-model factory"
        with request.stages.stage(Stage.SERIALIZE, request.label), atomic_path(request.output) as tmp:
            mlmodel.save(str(tmp))
        return CompiledArtifact(
            path=request.output,
            format=self.format,
            precision=request.precision,
            input_name=INPUT_NAME,
            input_layout="NCHW",
            input_shape=list(shape),
            input_dtype="float32 (MLMultiArray)",
            output_name=OUTPUT_NAME,
            output_shape=[1, request.embedding_size],
            output_dtype="float32 (MLMultiArray)",
            quantization=(
                "W8: int8 per-channel symmetric weights (constexpr_affine_dequantize), float16 compute"
                if request.precision == "int8" else "none (float16 weights and compute)"
            ),
            details={"deployment_target": DEPLOYMENT_TARGET, "compute_precision": "float16"},
        )

    @staticmethod
    def _convert(exported: torch.export.ExportedProgram, shape: tuple[int, ...], precision: str) -> object:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        mlmodel = ct.convert(
            exported,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        )
        if precision == "int8":
            config = cto.OptimizationConfig(
                global_config=cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
                )
            )
            mlmodel = cto.linear_quantize_weights(mlmodel, config=config)
        return mlmodel

    def load_runner(self, path: Path, threads: int | None = None) -> Runner | None:
        if self.host_support() is not None:
            return None
        import coremltools as ct

        model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)

        def run_one(x: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict({INPUT_NAME: x})[OUTPUT_NAME], np.float32).reshape(1, -1)

        return batched(run_one)

    def host_support(self) -> str | None:
        if platform.system() == "Darwin":
            return None
        return f"not verified on this host: Core ML runs only on macOS/iOS (this host is {platform.system()})"


register_target(CoreMLTarget())
