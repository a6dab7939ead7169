"""Reading MXNet model files without MXNet: the NDArray-list `.params` file and the symbol JSON graph.

MXNet has no wheel for Python 3.11, so the factory reads its two files itself:

- `*.params`: MXNet's binary NDArray list (`NDArray::Save` / `MXNDArraySave`): a little-endian header
  (magic 0x112, a reserved word), the array count, each array (V2 magic 0xF993FAC9, storage type, shape
  as int64 dims, context, dtype flag, raw data; V1 magic 0xF993FAC8 without the storage type; the legacy
  format without a magic with uint32 dims), then the name count and each name (length-prefixed bytes).
  Names carry `arg:` (learned parameters) and `aux:` (batch-norm running statistics) prefixes.
- `*-symbol.json`: the graph: `nodes` (op, name, attrs, inputs as [node, output, version]), `arg_nodes`
  and `heads`. `SymbolGraph` turns it into a PyTorch module op by op, for the ops in `OPS`; any other op
  is refused with its name.
"""

from __future__ import annotations

import ast
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
# mshadow type flags
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


class _Reader:
    def __init__(self, data: bytes, source: Path) -> None:
        self.data, self.offset, self.source = data, 0, source

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise FactoryError(f"{self.source} is truncated or not an MXNet .params file (ends at byte "
                               f"{len(self.data)}, needed {self.offset + size}); fetch the file again")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def raw(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise FactoryError(f"{self.source} is truncated (array data ends past byte {len(self.data)}); "
                               f"fetch the file again")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _read_ndarray(reader: _Reader) -> np.ndarray:
    (magic,) = reader.take("<I")
    if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC):
        if magic == NDARRAY_V2_MAGIC:
            (storage,) = reader.take("<i")
            if storage != 0:
                raise FactoryError(f"{reader.source}: sparse arrays (storage type {storage}) are not supported")
        (ndim,) = reader.take("<I")
        shape = reader.take(f"<{ndim}q") if ndim else ()
    else:  # legacy: the magic word was the dimension count, dims are uint32
        ndim = magic
        if ndim > 32:
            raise FactoryError(f"{reader.source}: bad array header (magic {magic:#x}); not an MXNet .params file")
        shape = reader.take(f"<{ndim}I") if ndim else ()
    if not shape:
        return np.zeros((0,), np.float32)
    reader.take("<ii")  # context: device type, device id
    (flag,) = reader.take("<i")
    if flag not in DTYPES:
        raise FactoryError(f"{reader.source}: unknown array dtype flag {flag}")
    dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
    count = int(np.prod(shape))
    return np.frombuffer(reader.raw(count * dtype.itemsize), dtype=dtype).reshape(shape).astype(DTYPES[flag])


def read_params(path: Path) -> dict[str, np.ndarray]:
    """Every named array of an MXNet `.params` file, names as stored (with `arg:` / `aux:` prefixes)."""
    reader = _Reader(path.read_bytes(), path)
    magic, _reserved = reader.take("<QQ")
    if magic != LIST_MAGIC:
        raise FactoryError(f"{path} is not an MXNet .params file (header {magic:#x}, expected {LIST_MAGIC:#x}); "
                           f"fetch the file again")
    (count,) = reader.take("<Q")
    arrays = [_read_ndarray(reader) for _ in range(count)]
    (name_count,) = reader.take("<Q")
    if name_count != count:
        raise FactoryError(f"{path}: {count} arrays but {name_count} names; the file is corrupt, fetch it again")
    names = []
    for _ in range(name_count):
        (length,) = reader.take("<Q")
        names.append(reader.raw(length).decode("utf-8"))
    if reader.offset != len(reader.data):
        raise FactoryError(f"{path}: {len(reader.data) - reader.offset} unexpected bytes after the last name; "
                           f"the file is corrupt, fetch it again")
    return dict(zip(names, arrays, strict=True))


def write_params(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays in MXNet's V2 `.params` format (for tests and hand-made files)."""
    flags = {np.dtype(v): k for k, v in DTYPES.items()}
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    for array in arrays.values():
        array = np.ascontiguousarray(array)
        parts.append(struct.pack("<IiI", NDARRAY_V2_MAGIC, 0, array.ndim))
        parts.append(struct.pack(f"<{array.ndim}q", *array.shape))
        parts.append(struct.pack("<iii", 1, 0, flags[array.dtype]))
        parts.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    parts.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        encoded = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(encoded)) + encoded)
    path.write_bytes(b"".join(parts))


def _tuple(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(ast.literal_eval(text)) if text else default


def _flag(text: str | None, default: bool) -> bool:
    return default if text is None else text.strip().lower() in ("true", "1")


@dataclass(frozen=True)
class Node:
    op: str
    name: str
    attrs: dict[str, str]
    inputs: tuple[int, ...]  # producing node indices (every op used here has one output)


class _Convolution(nn.Module):
    def __init__(self, attrs: dict[str, str], weight: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__()
        kernel = _tuple(attrs.get("kernel"), ())
        if len(kernel) != 2:
            raise FactoryError(f"only 2-D convolutions are supported, got kernel {kernel}")
        groups = int(attrs.get("num_group", "1"))
        out_channels, in_per_group = weight.shape[:2]
        self.conv = nn.Conv2d(in_per_group * groups, out_channels, kernel,
                              stride=_tuple(attrs.get("stride"), (1, 1)), padding=_tuple(attrs.get("pad"), (0, 0)),
                              dilation=_tuple(attrs.get("dilate"), (1, 1)), groups=groups, bias=bias is not None)
        self.conv.weight.data = torch.from_numpy(weight.astype(np.float32))
        if bias is not None:
            self.conv.bias.data = torch.from_numpy(bias.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _BatchNorm(nn.Module):
    """Inference-mode batch norm; MXNet's `fix_gamma=True` means gamma is 1 whatever the file holds."""

    def __init__(self, attrs: dict[str, str], gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                 var: np.ndarray) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(len(gamma), eps=float(attrs.get("eps", "0.001")),
                                 momentum=1.0 - float(attrs.get("momentum", "0.9")))
        if _flag(attrs.get("fix_gamma"), True):
            gamma = np.ones_like(gamma)
        self.bn.weight.data = torch.from_numpy(gamma.astype(np.float32))
        self.bn.bias.data = torch.from_numpy(beta.astype(np.float32))
        self.bn.running_mean.data = torch.from_numpy(mean.astype(np.float32))
        self.bn.running_var.data = torch.from_numpy(var.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The functional form takes (N, C) after a fully-connected layer as well as (N, C, H, W), so exporters
        # see one batch norm they can fold into the layer before it, not a reshape around a 2-D batch norm.
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class _FullyConnected(nn.Module):
    def __init__(self, attrs: dict[str, str], weight: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__()
        self.flatten = _flag(attrs.get("flatten"), True)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        self.linear.weight.data = torch.from_numpy(weight.astype(np.float32))
        if bias is not None:
            self.linear.bias.data = torch.from_numpy(bias.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1) if self.flatten else x)


class _Scalar(nn.Module):
    def __init__(self, op: str, scalar: float) -> None:
        super().__init__()
        self.op, self.scalar = op, scalar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "_plus_scalar":
            return x + self.scalar
        if self.op == "_minus_scalar":
            return x - self.scalar
        if self.op == "_mul_scalar":
            return x * self.scalar
        if self.op == "_div_scalar":
            return x / self.scalar
        if self.op == "_maximum_scalar":
            return x.clamp_min(self.scalar)
        return x.clamp_max(self.scalar)  # _minimum_scalar


class _Clamp(nn.Module):
    """`_maximum_scalar` then `_minimum_scalar` (MXNet's ReLU6) as one hardtanh, which exporters fuse into the
    convolution before it; the same values as the two clamps."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, self.low, self.high)


_ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class _Activation(nn.Module):

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in _ACTIVATIONS:
            raise FactoryError(f"Activation act_type {kind!r} is not supported ({', '.join(_ACTIVATIONS)})")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.kind](x)


class _Pooling(nn.Module):
    def __init__(self, attrs: dict[str, str]) -> None:
        super().__init__()
        self.kind = attrs.get("pool_type", "max")
        self.global_pool = _flag(attrs.get("global_pool"), False)
        self.kernel = _tuple(attrs.get("kernel"), (1, 1))
        self.stride = _tuple(attrs.get("stride"), (1, 1))
        self.pad = _tuple(attrs.get("pad"), (0, 0))
        if self.kind not in ("max", "avg"):
            raise FactoryError(f"Pooling pool_type {self.kind!r} is not supported (max, avg)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = x.shape[-2:] if self.global_pool else self.kernel
        if self.kind == "max":
            return F.max_pool2d(x, kernel, self.stride if not self.global_pool else 1, self.pad)
        return F.avg_pool2d(x, kernel, self.stride if not self.global_pool else 1, self.pad, count_include_pad=True)


class _Unary(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.op == "Flatten" else x  # Dropout is the identity at inference


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


# The ops `SymbolGraph` builds, with what each reads from the parameter file.
OPS = ("Convolution", "BatchNorm", "FullyConnected", "Activation", "Pooling", "Flatten", "Dropout", "elemwise_add",
       "_Plus", "_plus_scalar", "_minus_scalar", "_mul_scalar", "_div_scalar", "_maximum_scalar", "_minimum_scalar")


def read_symbol(path: Path) -> tuple[list[Node], list[int]]:
    """The nodes of a symbol JSON file and the indices of its outputs."""
    try:
        graph = json.loads(path.read_text())
        nodes = [Node(n["op"], n["name"], dict(n.get("attrs") or n.get("param") or {}),
                      tuple(int(i[0]) for i in n["inputs"])) for n in graph["nodes"]]
        heads = [int(h[0]) for h in graph["heads"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise FactoryError(f"{path} is not an MXNet symbol JSON file ({error}); fetch the file again") from None
    return nodes, heads


class SymbolGraph(nn.Module):
    """A PyTorch module that runs an MXNet symbol graph with its parameters, in eval mode.

    Args:
        nodes: The symbol's nodes (`read_symbol`).
        head: Index of the node whose output the module returns.
        params: Arrays from `read_params` (names with `arg:` / `aux:` prefixes, or bare).
        source: The symbol file, for error messages.
    """

    def __init__(self, nodes: list[Node], head: int, params: dict[str, np.ndarray], source: Path) -> None:
        super().__init__()
        bare = {name.split(":", 1)[-1]: array for name, array in params.items()}
        self.order: list[tuple[int, str, tuple[int, ...]]] = []  # (node, module key, input nodes)
        self.input_node = -1
        needed = self._ancestors(nodes, head)
        clamps = self._clamp_pairs(nodes, needed, head)
        absorbed = {inner for inner, _ in clamps.values()}
        layers: dict[str, nn.Module] = {}
        for index in sorted(needed):
            node = nodes[index]
            if node.op == "null":
                if node.name not in bare:
                    if self.input_node >= 0:
                        raise FactoryError(f"{source}: inputs {nodes[self.input_node].name!r} and {node.name!r}; "
                                           f"only graphs with one data input are supported")
                    self.input_node = index
                continue
            if index in absorbed:
                continue
            if index in clamps:
                inner, bounds = clamps[index]
                layer, data_inputs = _Clamp(*bounds), nodes[inner].inputs[:1]
            else:
                layer, data_inputs = self._layer(node, nodes, bare, source)
            key = f"n{index}"
            layers[key] = layer
            self.order.append((index, key, data_inputs))
        if self.input_node < 0:
            raise FactoryError(f"{source}: the graph has no data input")
        self.layers = nn.ModuleDict(layers)
        self.head = head
        self.eval()

    @staticmethod
    def _ancestors(nodes: list[Node], head: int) -> set[int]:
        seen, stack = set(), [head]
        while stack:
            index = stack.pop()
            if index not in seen:
                seen.add(index)
                stack.extend(nodes[index].inputs)
        return seen

    @staticmethod
    def _clamp_pairs(nodes: list[Node], needed: set[int], head: int) -> dict[int, tuple[int, tuple[float, float]]]:
        """Clamps to a range written as two scalar ops (`_maximum_scalar` feeding only a `_minimum_scalar`, or the
        reverse): the outer node's index -> (the inner node's index, (low, high))."""
        consumers: dict[int, int] = {}
        for index in needed:
            for source in nodes[index].inputs:
                consumers[source] = consumers.get(source, 0) + 1
        bounds = {"_maximum_scalar", "_minimum_scalar"}
        pairs: dict[int, tuple[int, tuple[float, float]]] = {}
        for index in sorted(needed):  # in graph order, so that in a chain of clamps no node joins two pairs
            outer = nodes[index]
            if outer.op not in bounds:
                continue
            inner_index = outer.inputs[0]
            inner = nodes[inner_index]
            if (inner.op not in bounds - {outer.op} or consumers[inner_index] != 1 or inner_index == head
                    or inner_index in pairs):
                continue
            values = float(inner.attrs["scalar"]), float(outer.attrs["scalar"])
            low, high = values if inner.op == "_maximum_scalar" else values[::-1]
            if low <= high:  # otherwise the pair is a constant, not a clamp; it stays two ops
                pairs[index] = (inner_index, (low, high))
        return pairs

    @staticmethod
    def _layer(node: Node, nodes: list[Node], params: dict[str, np.ndarray],
               source: Path) -> tuple[nn.Module, tuple[int, ...]]:
        """The module for one op node and the indices of its data (non-parameter) inputs."""

        def param(position: int) -> np.ndarray:
            name = nodes[node.inputs[position]].name
            if name not in params:
                raise FactoryError(f"{source}: {node.op} {node.name!r} needs parameter {name!r}, which the .params "
                                   f"file lacks; the symbol and params files do not belong together")
            return params[name]

        op, attrs = node.op, node.attrs
        if op not in OPS:
            raise FactoryError(f"{source}: op {op!r} (node {node.name!r}) is not supported; "
                               f"supported: {', '.join(OPS)}")
        data = node.inputs[:1]
        if op == "Convolution":
            no_bias = _flag(attrs.get("no_bias"), False)
            return _Convolution(attrs, param(1), None if no_bias else param(2)), data
        if op == "FullyConnected":
            no_bias = _flag(attrs.get("no_bias"), False)
            return _FullyConnected(attrs, param(1), None if no_bias else param(2)), data
        if op == "BatchNorm":
            return _BatchNorm(attrs, param(1), param(2), param(3), param(4)), data
        if op == "Activation":
            return _Activation(attrs.get("act_type", "")), data
        if op == "Pooling":
            return _Pooling(attrs), data
        if op in ("Flatten", "Dropout"):
            return _Unary(op), data
        if op in ("elemwise_add", "_Plus"):
            return _Add(), node.inputs[:2]
        return _Scalar(op, float(attrs["scalar"])), data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[int, torch.Tensor] = {self.input_node: x}
        for index, key, inputs in self.order:
            values[index] = self.layers[key](*(values[i] for i in inputs))
        return values[self.head]


def load_symbol_graph(symbol: Path, params: Path) -> SymbolGraph:
    """A PyTorch module computing an MXNet model's first output from its symbol JSON and `.params` files."""
    nodes, heads = read_symbol(symbol)
    return SymbolGraph(nodes, heads[0], read_params(params), symbol)
