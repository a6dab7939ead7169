"""ExecuTorch target: torch.export, XNNPACK partitioner, .pte program.

int8 uses ExecuTorch's XNNPACKQuantizer (static, per-channel symmetric weights, per-tensor
activations) calibrated on real faces. Every build checks that the whole graph was delegated to
XNNPACK: an op left on the portable kernels would be silently slow on a phone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from factory.errors import FactoryError
from factory.io import atomic_path
from factory.stages import Stage
from factory.targets.base import CompiledArtifact, CompileRequest, Runner, batched, register_target

# The size last given to XNNPACK's process-wide threadpool (None: never set by the factory).
_threadpool_size: int | None = None

# Graph nodes that are bookkeeping, not computation left outside the delegate.
_BOOKKEEPING = {"executorch_call_delegate", "getitem"}


def undelegated_ops(edge_program: torch.export.ExportedProgram) -> list[str]:
    """Names of compute ops in a lowered program that did not go to a delegate."""
    return [
        str(node.target)
        for node in edge_program.graph.nodes
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in _BOOKKEEPING
    ]


class ExecuTorchTarget:
    format = "executorch"
    suffix = ".pte"
    precisions = ("fp32", "int8")
    runtime_name = "executorch.runtime (XNNPACK)"
    host_latency = True

    def compile(self, request: CompileRequest) -> CompiledArtifact:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        backbone = request.backbone
        if request.precision == "int8":
            backbone = request.quantized_backbone(*self.int8_quantizer(request), fold_quantize=True)
        with request.stages.stage(Stage.EXPORT, request.label):
            exported = torch.export.export(request.deployable(backbone), request.example_pixels())
        with request.stages.stage(Stage.LOWER, f"{request.label}: XNNPACK partitioner"):
            lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        leftover = undelegated_ops(lowered.exported_program())
        if leftover:
            raise FactoryError(
                f"ExecuTorch {request.precision}: {len(leftover)} op(s) were not delegated to XNNPACK "
                f"({sorted(set(leftover))}); they would run on slow portable kernels. Change the model or "
                "report the op upstream"
            )
        with request.stages.stage(Stage.SERIALIZE, request.label), atomic_path(request.output) as tmp:
            tmp.write_bytes(lowered.to_executorch().buffer)
        artifact = self.describe(request.output, request.precision)
        artifact.details["delegated"] = True
        artifact.details["delegate_calls"] = sum(
            1 for n in lowered.exported_program().graph.nodes
            if getattr(n.target, "__name__", "") == "executorch_call_delegate"
        )
        return artifact

    @staticmethod
    def int8_quantizer(request: CompileRequest) -> tuple[object, torch.nn.Module]:
        """A fresh PT2E quantiser for int8, and the network it quantises (the backbone)."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)), request.backbone

    def describe(self, path: Path, precision: str) -> CompiledArtifact:
        """Read the program's real I/O metadata back from the file."""
        from executorch.runtime import Runtime

        meta = Runtime.get().load_program(path).metadata("forward")
        inp, out = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
        return CompiledArtifact(
            path=path,
            format=self.format,
            precision=precision,
            input_name="forward:input0",
            input_layout="NCHW",
            input_shape=list(inp.sizes()),
            input_dtype=_scalar_name(inp.dtype()),
            output_name="forward:output0",
            output_shape=list(out.sizes()),
            output_dtype=_scalar_name(out.dtype()),
            quantization=(
                "static W8A8: int8 per-channel symmetric weights, int8 per-tensor activations "
                "(XNNPACKQuantizer), float32 I/O" if precision == "int8" else "none (float32)"
            ),
        )

    def load_runner(self, path: Path, threads: int | None = None) -> Runner:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        global _threadpool_size
        if threads and threads != _threadpool_size:
            # XNNPACK's process-wide threadpool; the pybindings expose its size for exactly this. Resetting it
            # leaves methods loaded before the reset with a stale pool (running one crashes the process), so
            # it is reset only when the size changes, and callers load a runner right before using it.
            portable_lib._unsafe_reset_threadpool(threads)
            _threadpool_size = threads
        method = Runtime.get().load_program(path).load_method("forward")

        def run_one(x: np.ndarray) -> np.ndarray:
            # The runtime reads the buffer as contiguous NCHW whatever the array's strides say.
            return method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy().copy()

        return batched(run_one)

    def extra_runners(self, path: Path) -> dict[str, Runner]:
        return {}


# c10::ScalarType codes as the runtime's metadata reports them.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 15: "bfloat16"}


def _scalar_name(dtype: object) -> str:
    return _SCALAR_TYPES.get(int(dtype), str(dtype))


register_target(ExecuTorchTarget())
