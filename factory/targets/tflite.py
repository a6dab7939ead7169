"""TFLite (LiteRT) target: litert-torch converts PyTorch straight to .tflite, no TensorFlow needed.

Input/output are float32 in both precisions, so apps need no quantisation maths. The input is NHWC
(the layout of camera frames and of TFLite's own kernels); `to_channel_last_io` puts the transpose
inside the graph, where the converter folds it into the first convolution.
int8 is static W8A8: per-channel symmetric int8 weights, per-tensor int8 activations calibrated on
real faces with litert-torch's PT2E quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factory.io import atomic_path
from factory.latency import all_threads
from factory.stages import Stage
from factory.targets.base import CompiledArtifact, CompileRequest, Runner, batched, register_target


class TFLiteTarget:
    format = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "int8")
    runtime_name = "LiteRT Interpreter (ai-edge-litert)"
    host_latency = True

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig

        quant_config = None
        backbone = request.backbone
        if request.precision == "int8":
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
            )
            backbone = request.quantized_backbone(quantizer, fold_quantize=False)
            quant_config = QuantConfig(pt2e_quantizer=quantizer)
        module = litert_torch.to_channel_last_io(request.deployable(backbone), args=[0])
        example = (request.example_pixels()[0].permute(0, 2, 3, 1).contiguous(),)
        # litert-torch runs torch.export itself as the first step of its conversion.
        with request.stages.stage(Stage.LOWER, f"{request.label}: torch.export + litert-torch lowering"):
            edge_model = litert_torch.convert(module, example, quant_config=quant_config)
        with request.stages.stage(Stage.SERIALIZE, request.label), atomic_path(request.output) as tmp:
            edge_model.export(str(tmp))
        return self.describe(request.output, request.precision)

    def describe(self, path: Path, precision: str) -> CompiledArtifact:
        """Read the artifact's real I/O signature back from the file."""
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        (inp,) = interpreter.get_input_details()
        (out,) = interpreter.get_output_details()
        scale, zero_point = out["quantization"]
        output_dtype = np.dtype(out["dtype"]).name
        io = "float32 I/O"
        if np.issubdtype(out["dtype"], np.integer):
            output_dtype += f" (real = {scale:.6g} * (q - {zero_point}))"
            io = f"float32 input, {np.dtype(out['dtype']).name} output"
        return CompiledArtifact(
            path=path,
            format=self.format,
            precision=precision,
            input_name=inp["name"],
            input_layout="NHWC",
            input_shape=[int(d) for d in inp["shape"]],
            input_dtype=np.dtype(inp["dtype"]).name,
            output_name=out["name"],
            output_shape=[int(d) for d in out["shape"]],
            output_dtype=output_dtype,
            quantization=(
                "static W8A8: int8 per-channel symmetric weights, int8 per-tensor activations "
                f"(litert-torch PT2E), {io}" if precision == "int8" else "none (float32)"
            ),
        )

    def load_runner(self, path: Path, threads: int | None = None) -> Runner:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads or all_threads())
        interpreter.allocate_tensors()
        input_index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]
        scale, zero_point = output["quantization"]

        def run_one(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(input_index, np.ascontiguousarray(x))
            interpreter.invoke()
            result = interpreter.get_tensor(output["index"])
            if np.issubdtype(result.dtype, np.integer):
                # A quantised output (the converter keeps the graph's tail int8 when every op after the last
                # convolution has an int8 kernel): real value = scale * (q - zero_point), as apps compute it.
                return (result.astype(np.float32) - zero_point) * np.float32(scale)
            return result.copy()

        return batched(run_one)

    def extra_runners(self, path: Path) -> dict[str, Runner]:
        return {}

    def host_support(self) -> str | None:
        return None


register_target(TFLiteTarget())
