"""Execute a Core ML ML program (.mlpackage) op by op on any host, with Core ML's float16 semantics.

Core ML programs run only in Apple's runtime, so off macOS nothing else can check what an .mlpackage
computes. This interpreter reads the package with coremltools' own readers (the model spec, then the
MIL proto loader that resolves weights from the package's weight blob) and runs the program's ops in
order with PyTorch kernels (`ops.py`).

Float16 emulation: wherever the program declares a float16 tensor, the interpreter rounds that op's
output to float16 (round to nearest even, as IEEE casts do). Kernels compute in float32 on the
float16-valued operands, so each op's result is the float16 rounding of an fp32-accumulated result.
Core ML's CPU path behaves the same way for elementwise ops; its GPU and Neural Engine may accumulate
convolutions in float16, which can differ from this in the last float16 bit of a sum. Float32 programs
run in float32 throughout.

Batches: factory programs are declared with batch 1. The interpreter runs N images at once by carrying
the batch in dimension 0; `reshape` ops whose literal shape starts with that batch 1 get N instead, and
every op's output shape is checked against the program's declaration (batch dimension aside), so an op
that would mix images fails loudly instead of computing the wrong thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.coreml_interpreter.ops import KERNELS, WEIGHT_KERNELS, Kernel
from factory.errors import FactoryError


@dataclass(frozen=True)
class _Output:
    name: str
    dtype: str
    shape: tuple[Any, ...]


@dataclass(frozen=True)
class _Step:
    """One op to execute: its kernel, where its inputs come from, and its declared outputs."""

    op_type: str
    name: str
    kernel: Kernel
    inputs: dict[str, str | tuple[str, ...]]
    input_shapes: dict[str, tuple[Any, ...]]
    outputs: tuple[_Output, ...]


def load_program(path: Path) -> Any:
    """The MIL program inside an .mlpackage, with every weight read from the package as a NumPy array.

    Raises:
        FactoryError: The path is not an ML-program package coremltools can read.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    if not path.exists():
        raise FactoryError(f"{path}: no such Core ML package")
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as error:  # coremltools raises bare Exceptions for unreadable packages
        raise FactoryError(f"{path}: not a readable Core ML package ({error})") from error
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise FactoryError(f"{path}: a {spec.WhichOneof('Type')} model; the interpreter runs ML programs only "
                           "(convert with convert_to='mlprogram')")
    return load(spec, spec.specificationVersion, model.weights_dir)


def _dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _round_to(value: torch.Tensor, dtype: str, in_place: bool = False) -> torch.Tensor:
    """`value` stored as a `dtype` tensor.

    Floats are float32 (float16-rounded for fp16); 8-bit integers that a float kernel produced (quantize) stay
    integral float32; other integers are int64. `in_place`: `value` is a kernel's own new tensor, which float16
    rounding may overwrite (3-5x faster than a new float32 tensor, the same numbers).
    """
    if dtype == "fp16":
        if in_place and value.dtype == torch.float32:
            return value.copy_(value.to(torch.float16))
        return value.to(torch.float16).to(torch.float32)
    if dtype == "fp32":
        return value.to(torch.float32)
    if dtype == "bool":
        return value.to(torch.bool)
    if dtype in ("int8", "uint8") and value.is_floating_point():
        # Quantised activations: float32 holds every 8-bit integer exactly, and dequantize wants floats.
        return value
    return value.to(torch.int64)


def _storage(value: Any) -> int | None:
    """The address of a tensor's memory (None for anything else)."""
    return value.untyped_storage().data_ptr() if isinstance(value, torch.Tensor) else None


def _matches(declared: tuple[Any, ...], actual: tuple[int, ...]) -> bool:
    """Whether `actual` fits a declared shape (symbolic dimensions match anything)."""
    return len(declared) == len(actual) and all(
        not isinstance(d, (int, np.integer)) or d == a for d, a in zip(declared, actual, strict=True))


def _as_torch(value: Any) -> Any:
    """A constant as kernels take it: numeric arrays as torch tensors, strings and scalars unchanged."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        array = value.astype(np.float32) if value.dtype.kind == "f" else value.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(array))
    return value


class CoreMLInterpreter:
    """A Core ML ML program, ready to run batches on this host.

    Args:
        program: The MIL program (see `load_program`).
        source: Where it came from, named in every error.
        function: Which function of the program to run.

    Raises:
        FactoryError: The program uses an op this interpreter does not implement (named with `source`).
    """

    def __init__(self, program: Any, source: str, function: str = "main") -> None:
        self.source = source
        main = program.functions[function]
        self.inputs = {name: (_dtype_name(var), tuple(var.shape)) for name, var in main.inputs.items()}
        self.output_names = [var.name for var in main.outputs]
        self._constants: dict[str, Any] = {}
        self._steps: list[_Step] = []
        unsupported = sorted({op.op_type for op in main.operations
                              if op.op_type != "const" and op.op_type not in KERNELS | WEIGHT_KERNELS})
        if unsupported:
            raise FactoryError(f"{source}: the Core ML reference interpreter does not implement op type(s) "
                               f"{', '.join(unsupported)}; it cannot verify this artifact")
        raw: dict[str, Any] = {}
        for op in main.operations:
            if op.op_type == "const":
                raw[op.outputs[0].name] = op.outputs[0].val
            elif op.op_type in WEIGHT_KERNELS:
                # Weight decompression depends only on constants: done once, here, like Core ML's load.
                args = {key: self._raw_input(raw, var) for key, var in op.inputs.items()}
                try:
                    raw[op.outputs[0].name] = WEIGHT_KERNELS[op.op_type](args)
                except (ValueError, NotImplementedError) as error:
                    raise FactoryError(f"{source}: {op.op_type} op {op.name!r}: {error}") from error
            else:
                self._steps.append(_Step(
                    op_type=op.op_type, name=op.name, kernel=KERNELS[op.op_type],
                    inputs={key: tuple(v.name for v in var) if isinstance(var, (list, tuple)) else var.name
                            for key, var in op.inputs.items()},
                    input_shapes={key: tuple(var.shape) for key, var in op.inputs.items()
                                  if not isinstance(var, (list, tuple)) and hasattr(var, "shape")},
                    outputs=tuple(_Output(v.name, _dtype_name(v), tuple(v.shape)) for v in op.outputs),
                ))
        for name, value in raw.items():
            self._constants[name] = _as_torch(value)
        self._release = self._liveness()

    def _liveness(self) -> list[tuple[str, ...]]:
        """Per step, the intermediate values no later step reads: `run` drops them once the step is done.

        Without this a batch keeps every intermediate tensor to the end (a 4M-parameter network's W8A8 program,
        whose quantize/dequantize pairs double them, took over 24 GB at batch 64).
        """
        last_use: dict[str, int] = {}
        for index, step in enumerate(self._steps):
            for source in step.inputs.values():
                for name in source if isinstance(source, tuple) else (source,):
                    last_use[name] = index
            for output in step.outputs:
                last_use.setdefault(output.name, index)  # never read: dropped right away
        keep = set(self.output_names) | set(self._constants)
        release: list[list[str]] = [[] for _ in self._steps]
        for name, index in last_use.items():
            if name not in keep:
                release[index].append(name)
        return [tuple(names) for names in release]

    @staticmethod
    def _raw_input(raw: dict[str, Any], var: Any) -> Any:
        if isinstance(var, (list, tuple)):
            return [raw[v.name] for v in var]
        return raw[var.name] if var.name in raw else var.val

    @classmethod
    def from_package(cls, path: Path) -> CoreMLInterpreter:
        """Load an .mlpackage (see `load_program`)."""
        return cls(load_program(path), str(path))

    @property
    def op_types(self) -> list[str]:
        """The op types this program executes per image (weights decompressed at load are not listed)."""
        return [step.op_type for step in self._steps]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the program on a batch.

        Args:
            feeds: One array per program input, the batch in dimension 0 (any batch size).

        Returns:
            Every program output as a float32 (or integer) array with the same batch.

        Raises:
            FactoryError: A missing or wrongly shaped input, or an op that cannot run batched.
        """
        values: dict[str, Any] = dict(self._constants)
        batch = None
        for name, (dtype, shape) in self.inputs.items():
            if name not in feeds:
                raise FactoryError(f"{self.source}: input {name!r} not given; the program takes "
                                   f"{', '.join(self.inputs)}")
            array = np.asarray(feeds[name])
            if not _matches(shape[1:], array.shape[1:]):
                raise FactoryError(f"{self.source}: input {name!r} has shape {array.shape}; the program expects "
                                   f"{shape} (any batch size)")
            batch = array.shape[0]
            values[name] = _round_to(torch.from_numpy(np.ascontiguousarray(array)), dtype)
        with torch.no_grad():
            for index, step in enumerate(self._steps):
                args = {key: tuple(values[v] for v in source) if isinstance(source, tuple) else values[source]
                        for key, source in step.inputs.items()}
                if step.op_type == "reshape":
                    args["shape"] = self._batched_shape(step, args["shape"], batch)
                try:
                    result = step.kernel(args)
                except NotImplementedError as error:
                    raise FactoryError(f"{self.source}: {step.op_type} op {step.name!r}: {error} is not supported "
                                       "by the Core ML reference interpreter") from error
                results = result if isinstance(result, tuple) else (result,)
                # A result that shares memory with an operand (a reshape's view, an op that returns its input)
                # is rounded into a new tensor; any other is the kernel's own and is rounded where it is.
                operands: set[int | None] = set()
                if any(output.dtype == "fp16" for output in step.outputs):
                    operands = {_storage(value) for source in args.values()
                                for value in (source if isinstance(source, tuple) else (source,))}
                for output, value in zip(step.outputs, results, strict=True):
                    value = _round_to(value, output.dtype, _storage(value) not in operands)
                    self._check_shape(step, output, tuple(value.shape), batch)
                    values[output.name] = value
                for name in self._release[index]:
                    del values[name]
        return {name: values[name].numpy() for name in self.output_names}

    def _batched_shape(self, step: _Step, shape: Any, batch: int | None) -> list[int]:
        """A reshape's literal target shape with the program's batch of 1 replaced by the running batch."""
        target = [int(v) for v in np.asarray(shape.numpy() if isinstance(shape, torch.Tensor) else shape).ravel()]
        declared_in = step.input_shapes.get("x", ())
        if batch in (None, 1) or not target or not declared_in or declared_in[0] != 1:
            return target
        if target[0] == 1 and step.outputs[0].shape[:1] == (1,):
            return [batch, *target[1:]]
        if target[0] == -1:
            return target  # inferred; the output shape check refuses it if the batch was folded in
        raise FactoryError(f"{self.source}: reshape op {step.name!r} to {target} moves the batch dimension; "
                           "run this program one image at a time")

    def _check_shape(self, step: _Step, output: _Output, actual: tuple[int, ...], batch: int | None) -> None:
        declared = output.shape
        expected = declared if batch in (None, 1) or not declared or declared[0] != 1 else (batch, *declared[1:])
        if _matches(expected, actual):
            return
        raise FactoryError(f"{self.source}: {step.op_type} op {step.name!r} produced shape {actual} where the program "
                           f"declares {declared} per image; this op cannot run at batch {batch}")
