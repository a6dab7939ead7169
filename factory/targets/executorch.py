"""ExecuTorch target: torch.export, XNNPACK partitioner, .pte program.

int8 uses ExecuTorch's XNNPACKQuantizer (static, per-channel symmetric weights, per-tensor
activations) calibrated on real faces. Every build checks that the whole graph was delegated to
XNNPACK: an op left on the portable kernels would be silently slow on a phone.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

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
    compiles_in_worker = True  # factory.compile_lane
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
        from executorch.runtime import Runtime

        _size_threadpool(threads)
        method = Runtime.get().load_program(path).load_method("forward")

        def run_one(x: np.ndarray) -> np.ndarray:
            # The runtime reads the buffer as contiguous NCHW whatever the array's strides say.
            return method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy().copy()

        return batched(run_one)

    def extra_runners(self, path: Path) -> dict[str, Runner]:
        return {}

    def op_profile(self, path: Path, example: np.ndarray, threads: int, runs: int = 20) -> dict[str, Any]:
        """Per-op time of one inference, from ExecuTorch's own event tracer (ETDump) read by its Inspector.

        XNNPACK reports each of its operators (a convolution, a Convert between int8 and float, a PReLU) as a
        delegate event, so the profile shows what an int8 program spends outside int8 arithmetic. Ops are
        grouped by kind (XNNPACK's operator name without its `#n` index); each kind's time is the sum over its
        instances of the median over `runs` inferences (after 3 warm-up ones).
        """
        import tempfile

        from executorch.devtools import Inspector
        from executorch.extension.pybindings import portable_lib

        _size_threadpool(threads)
        module = portable_lib._load_for_executorch(str(path), enable_etdump=True)
        inputs = [torch.from_numpy(np.ascontiguousarray(example))]
        for _ in range(3 + runs):
            module.forward(inputs)
        with tempfile.TemporaryDirectory() as tmp:
            dump = Path(tmp) / "profile.etdp"
            module.write_etdump_result_to_file(str(dump))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Output Buffer not found": no tensor dumps were asked for
                inspector = Inspector(etdump_path=str(dump))
        events = [event for block in inspector.event_blocks if block.name == "Execute" for event in block.events
                  if event.perf_data is not None]
        if not events:
            raise FactoryError(f"{path.name}: ExecuTorch's ETDump holds no execute events; cannot profile it")
        # The runtime's own spans: the whole method, and each call into the delegate (which holds XNNPACK's ops).
        spans = {"Method::execute", "DELEGATE_CALL"}
        medians = [(event, float(np.median(np.asarray(event.perf_data.raw[-runs:], np.float64)))) for event in events]
        total = sum(ms for event, ms in medians if event.name == "Method::execute")
        kinds: dict[str, dict[str, Any]] = {}
        for event, ms in medians:
            if event.name in spans:
                continue
            kind = kinds.setdefault(re.sub(r"\s+#\d+$", "", event.name),
                                    {"count": 0, "ms": 0.0, "delegated": bool(event.is_delegated_op)})
            kind["count"] += 1
            kind["ms"] += ms
        in_ops = sum(k["ms"] for k in kinds.values())
        ranked = sorted(kinds.items(), key=lambda item: -item[1]["ms"])
        return {"tool": "ExecuTorch ETDump + Inspector (XNNPACK per-operator events)", "threads": threads,
                "runs": runs, "ops": sum(k["count"] for k in kinds.values()), "total_ms": total,
                "outside_ops_ms": max(total - in_ops, 0.0),
                "top": [{"op": name, "count": int(k["count"]), "ms": k["ms"],
                         "share": k["ms"] / total if total else 0.0, "delegated": k["delegated"]}
                        for name, k in ranked[:10]]}


def _size_threadpool(threads: int | None) -> None:
    """Size XNNPACK's process-wide threadpool; the pybindings expose its size for exactly this. Resetting it
    leaves methods loaded before the reset with a stale pool (running one crashes the process), so it is reset
    only when the size changes, and callers load a method right after."""
    from executorch.extension.pybindings import portable_lib

    global _threadpool_size
    if threads and threads != _threadpool_size:
        portable_lib._unsafe_reset_threadpool(threads)
        _threadpool_size = threads


# c10::ScalarType codes as the runtime's metadata reports them.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 15: "bfloat16"}


def _scalar_name(dtype: object) -> str:
    return _SCALAR_TYPES.get(int(dtype), str(dtype))


register_target(ExecuTorchTarget())
