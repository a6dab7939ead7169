"""TFLite (LiteRT) target: litert-torch converts PyTorch straight to .tflite, no TensorFlow needed.

Input/output are float32 in both precisions, so apps need no quantisation maths. The input is NHWC
(the layout of camera frames and of TFLite's own kernels); `to_channel_last_io` puts the transpose
inside the graph, where the converter folds it into the first convolution.
int8 is static W8A8: per-channel symmetric int8 weights, per-tensor int8 activations calibrated on
real faces with litert-torch's PT2E quantizer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.io import atomic_path
from factory.latency import all_threads
from factory.stages import Stage
from factory.targets.base import CompiledArtifact, CompileRequest, Runner, batched, register_target


class GatedHardswish(nn.Module):
    """h-swish written as x * hardsigmoid(x): the same function, in a form the int8 .tflite keeps inside XNNPACK."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * nn.functional.hardsigmoid(x)


def gate_hardswish(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` with every nn.Hardswish replaced by `GatedHardswish` (the backbone itself if none).

    Why: litert-torch turns a float h-swish between int8 tensors into an int8 HARD_SWISH op, which LiteRT's
    XNNPACK delegate does not take (ai-edge-litert 2.3.0), so the graph falls apart into partitions with the
    h-swish on LiteRT's built-in kernels between them. Measured on SeesawFaceNet's int8 .tflite: 19 partitions,
    7.3 ms per face on 1 thread against 2.2 ms for its fp32. As x * hardsigmoid(x), with the product left
    unquantised (`_quantizer`), the converter emits a float hard-sigmoid, its int8 quantisation and an int8 MUL:
    one partition, cosine to PyTorch unchanged (0.99284 against 0.99279 on 200 LFW faces).
    """
    if not any(isinstance(m, nn.Hardswish) for m in backbone.modules()):
        return backbone
    gated = copy.deepcopy(backbone)
    for module in list(gated.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Hardswish):
                setattr(module, name, GatedHardswish())
    return gated.eval()


def _quantizer():
    """litert-torch's PT2E quantizer, except that x * hardsigmoid(x) (`GatedHardswish`) gets no output range of
    its own: the product is quantised where its consumers quantise their input, as a plain h-swish's output is.
    With a range of its own (the quantizer's `mul` pattern) the PT2E emulation of SeesawFaceNet fell to cosine
    0.9808 on 200 LFW faces, against 0.9949 with plain h-swish; without it, 0.9950."""
    from litert_torch.quantize import pt2e_quantizer

    class Quantizer(pt2e_quantizer.PT2EQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # PT2EQuantizer.annotate for a static configuration, with the products' outputs cleared before
            # the shared ranges are propagated.
            model = self._annotate_for_static_quantization_config(model)
            for node in model.graph.nodes:
                if _is_gated_hardswish(node):
                    node.meta["quantization_annotation"].output_qspec = None
            pt2e_quantizer.propagate_annotation(model)
            return model

    return Quantizer()


def _is_gated_hardswish(node: torch.fx.Node) -> bool:
    """The product x * hardsigmoid(x), already annotated by the quantizer's `mul` pattern."""
    if node.op != "call_function" or node.target != torch.ops.aten.mul.Tensor:
        return False
    x, gate = node.args[0], node.args[1]
    return (isinstance(gate, torch.fx.Node) and gate.target == torch.ops.aten.hardsigmoid.default
            and gate.args[0] is x and "quantization_annotation" in node.meta)


class TFLiteTarget:
    compiles_in_worker = True  # factory.compile_lane
    verifies_side_by_side = True  # factory.targets.base.verification_runner: Interpreter.invoke releases the GIL
    format = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "int8")
    runtime_name = "LiteRT Interpreter (ai-edge-litert)"
    host_latency = True

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        quant_config = None
        backbone = request.backbone
        if request.precision == "int8":
            quantizer, source = self.int8_quantizer(request)
            backbone = request.quantized_backbone(quantizer, fold_quantize=False, backbone=source)
            quant_config = QuantConfig(pt2e_quantizer=quantizer)
        module = litert_torch.to_channel_last_io(request.deployable(backbone), args=[0])
        example = (request.example_pixels()[0].permute(0, 2, 3, 1).contiguous(),)
        # litert-torch runs torch.export itself as the first step of its conversion.
        with request.stages.stage(Stage.LOWER, f"{request.label}: torch.export + litert-torch lowering"):
            edge_model = litert_torch.convert(module, example, quant_config=quant_config)
        with request.stages.stage(Stage.SERIALIZE, request.label), atomic_path(request.output) as tmp:
            edge_model.export(str(tmp))
        return self.describe(request.output, request.precision)

    @staticmethod
    def int8_quantizer(request: CompileRequest) -> tuple[object, nn.Module]:
        """A fresh PT2E quantiser for int8, and the network it quantises (the backbone with `gate_hardswish`)."""
        from litert_torch.quantize import pt2e_quantizer

        quantizer = _quantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        return quantizer, gate_hardswish(request.backbone)

    @staticmethod
    def xnnpack_partitions(path: Path) -> int:
        """How many XNNPACK delegate partitions the LiteRT Interpreter makes of the model (1: the whole graph).

        Each op XNNPACK does not take runs on LiteRT's built-in kernels between two partitions, at a cost in
        speed (int8 HARD_SWISH is one: `gate_hardswish`). The Interpreter applies its default XNNPACK delegate
        when it allocates tensors, adding one node per partition.
        """
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=1)
        nodes = interpreter._interpreter.NumNodes()
        interpreter.allocate_tensors()
        return interpreter._interpreter.NumNodes() - nodes

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
            details={"xnnpack_partitions": self.xnnpack_partitions(path)},
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


register_target(TFLiteTarget())
