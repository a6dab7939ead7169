"""Core ML ML-program ops as NumPy (weights) and PyTorch (activations) kernels.

Semantics follow the MIL op definitions in coremltools (`converters/mil/mil/ops/defs/iOS1x/`); each kernel
cites the rule it implements where it is not obvious. Two kinds of kernel:

* weight kernels (`WEIGHT_KERNELS`): the `constexpr_*` decompression ops. Their inputs are constants, so
  they run once, in NumPy, when a program is loaded; the result is the weight the runtime would see.
* activation kernels (`KERNELS`): everything else, on float32 torch tensors that carry the batch in
  dimension 0. The interpreter rounds each output to float16 when the program declares it float16, so a
  kernel computes in float32 on float16-valued operands (the emulation described in `interpreter.py`).

Static parameters (strides, axes, shapes, strings) arrive as the program's constants: torch tensors, NumPy
scalars or strings; `ints` and `scalar` read any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# What a kernel receives: op input name -> value (see the module docstring).
Args = dict[str, Any]
Kernel = Callable[[Args], torch.Tensor]
WeightKernel = Callable[[dict[str, Any]], np.ndarray]

KERNELS: dict[str, Kernel] = {}
WEIGHT_KERNELS: dict[str, WeightKernel] = {}


def kernel(*op_types: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for op_type in op_types:
            KERNELS[op_type] = fn
        return fn

    return register


def weight_kernel(op_type: str) -> Callable[[WeightKernel], WeightKernel]:
    def register(fn: WeightKernel) -> WeightKernel:
        WEIGHT_KERNELS[op_type] = fn
        return fn

    return register


def ints(value: Any) -> list[int]:
    """A static integer parameter (scalar or vector) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    return [int(v) for v in np.asarray(value).reshape(-1)]


def scalar(value: Any) -> float:
    """A static scalar parameter as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(np.asarray(value).reshape(-1)[0])


def _axes(args: Args, rank: int) -> list[int] | None:
    """`axes` normalised to non-negative ints; None when absent (meaning every axis)."""
    if args.get("axes") is None:
        return None
    return [a % rank for a in ints(args["axes"])]


# ---------------------------------------------------------------------------------------------- weights


def _along_axis(param: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A per-axis (vector) quantisation parameter reshaped to broadcast against a rank-`rank` tensor."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[axis % rank] = param.size
    return param.reshape(shape)


@weight_kernel("constexpr_affine_dequantize")
def constexpr_affine_dequantize(args: dict[str, Any]) -> np.ndarray:
    # iOS16: scale * (quantized_data - zero_point); scale/zero_point are scalars or vectors along `axis`.
    data = np.asarray(args["quantized_data"])
    axis = int(args["axis"])
    zero_point = _along_axis(args["zero_point"], data.ndim, axis).astype(np.float32)
    scale = _along_axis(args["scale"], data.ndim, axis)
    return ((data.astype(np.float32) - zero_point) * scale.astype(np.float32)).astype(scale.dtype)


def _repeat_blocks(param: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Expand a block-wise parameter (one value per block) to `shape`: block size = dim // param dim."""
    for axis, (dim, blocks) in enumerate(zip(shape, param.shape, strict=True)):
        if dim % blocks:
            raise ValueError(f"dimension {axis}: {blocks} blocks do not divide {dim}")
        param = np.repeat(param, dim // blocks, axis)
    return param


@weight_kernel("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(args: dict[str, Any]) -> np.ndarray:
    # iOS18: output[i] = scale[i // block] * (data[i] - offset[i // block]), block = data.shape / scale.shape.
    data = np.asarray(args["data"]).astype(np.float32)
    scale = np.asarray(args["scale"])
    value = data
    if args.get("offset") is not None:
        value = value - _repeat_blocks(np.asarray(args["offset"]).astype(np.float32), data.shape)
    return (value * _repeat_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """`count` unsigned `nbits`-bit fields packed LSB-first into bytes (the iOS16 constexpr layout)."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: count * nbits]
    weights = (1 << np.arange(nbits)).astype(np.int64)
    return bits.reshape(count, nbits).astype(np.int64) @ weights


@weight_kernel("constexpr_lut_to_dense")
def constexpr_lut_to_dense(args: dict[str, Any]) -> np.ndarray:
    lut = np.asarray(args["lut"])
    if args.get("shape") is not None:
        # iOS16: one flat palette; indices packed LSB-first into a uint8 vector.
        shape = ints(args["shape"])
        count = math.prod(shape)
        return lut[_unpack_bits(args["indices"], int(np.log2(lut.size)), count)].reshape(shape)
    # iOS18: indices already hold one palette index per element (coremltools unpacks uintN blobs); lut has
    # rank K + 2 (one palette per block of the first K dims, then palette entries, then vector elements).
    indices = np.asarray(args["indices"]).astype(np.int64)
    rank = indices.ndim
    block_index = [
        (np.arange(dim) // (dim // groups)).reshape([-1 if a == axis else 1 for a in range(rank)])
        for axis, (dim, groups) in enumerate(zip(indices.shape, lut.shape[:rank], strict=True))
    ]
    values = lut[(*block_index, indices)]  # indices.shape + (vector_size,)
    vector_size = lut.shape[-1]
    if vector_size == 1:
        return values[..., 0]
    vector_axis = int(args["vector_axis"]) % rank
    moved = np.moveaxis(values, -1, vector_axis + 1)
    shape = list(indices.shape)
    shape[vector_axis] *= vector_size
    return moved.reshape(shape)


@weight_kernel("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(args: dict[str, Any]) -> np.ndarray:
    nonzero = np.asarray(args["nonzero_data"])
    if args.get("shape") is not None:
        # iOS16: bit mask packed LSB-first into uint8, row-major over `shape`.
        shape = ints(args["shape"])
        mask = np.unpackbits(np.asarray(args["mask"], np.uint8), bitorder="little")[: math.prod(shape)]
        mask = mask.reshape(shape)
    else:
        mask = np.asarray(args["mask"])  # iOS18: uint1 mask of the output's shape
    dense = np.zeros(mask.shape, nonzero.dtype)
    dense[mask != 0] = nonzero
    return dense


# ---------------------------------------------------------------------------------- quantised activations

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


@kernel("quantize")
def quantize(args: Args) -> torch.Tensor:
    # iOS17: clip(round(input / scale) + zero_point) to the output dtype; round half to even like
    # coremltools' own value inference (`optimize_utils.quantize_by_scale_and_zp`, np.round).
    x = args["input"]
    axis = None if args.get("axis") is None else int(scalar(args["axis"]))
    scale = torch.as_tensor(_along_axis(_np(args["scale"]), x.dim(), axis), dtype=torch.float32)
    zero_point = args.get("zero_point")
    zp = 0.0 if zero_point is None else torch.as_tensor(
        _along_axis(_np(zero_point), x.dim(), axis).astype(np.float32))
    low, high = _INT_RANGES[str(args["output_dtype"])]
    # In place on one fresh tensor: quantised activations are the largest tensors the interpreter touches.
    levels = (x / scale).round_()
    return levels.add_(zp).clamp_(low, high)


@kernel("dequantize")
def dequantize(args: Args) -> torch.Tensor:
    # iOS17: scale * (input - zero_point).
    x = args["input"].to(torch.float32)
    axis = None if args.get("axis") is None else int(scalar(args["axis"]))
    scale = torch.as_tensor(_along_axis(_np(args["scale"]), x.dim(), axis).astype(np.float32))
    zero_point = args.get("zero_point")
    if zero_point is None:
        return x * scale
    return (x - torch.as_tensor(_along_axis(_np(zero_point), x.dim(), axis).astype(np.float32))).mul_(scale)


def _np(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# ------------------------------------------------------------------------------------------ elementwise


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Kernel:
    return lambda args: fn(torch.as_tensor(args["x"]), torch.as_tensor(args["y"]))


for _name, _fn in {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "floor_div": lambda x, y: torch.floor(x / y),
}.items():
    KERNELS[_name] = _binary(_fn)

for _name, _unary in {
    "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "sqrt": torch.sqrt,
    "abs": torch.abs, "square": torch.square, "silu": F.silu, "floor": torch.floor, "ceil": torch.ceil,
    "erf": torch.erf, "identity": lambda x: x, "relu6": lambda x: torch.clamp(x, 0.0, 6.0),
}.items():
    KERNELS[_name] = (lambda fn: lambda args: fn(args["x"]))(_unary)


@kernel("rsqrt")
def rsqrt(args: Args) -> torch.Tensor:
    return torch.rsqrt(args["x"] + scalar(args.get("epsilon", 1e-12)))


@kernel("inverse")
def inverse(args: Args) -> torch.Tensor:
    return 1.0 / (args["x"] + scalar(args.get("epsilon", 1e-4)))


@kernel("log")
def log(args: Args) -> torch.Tensor:
    return torch.log(args["x"] + scalar(args.get("epsilon", 1e-45)))


@kernel("clip")
def clip(args: Args) -> torch.Tensor:
    return torch.clamp(args["x"], scalar(args["alpha"]), scalar(args["beta"]))


@kernel("leaky_relu")
def leaky_relu(args: Args) -> torch.Tensor:
    return F.leaky_relu(args["x"], scalar(args.get("alpha", 0.01)))


@kernel("thresholded_relu")
def thresholded_relu(args: Args) -> torch.Tensor:
    # x where x >= alpha, else 0.
    x = args["x"]
    return torch.where(x >= scalar(args.get("alpha", 1.0)), x, torch.zeros_like(x))


@kernel("sigmoid_hard")
def sigmoid_hard(args: Args) -> torch.Tensor:
    # min(max(alpha * x + beta, 0), 1)
    return torch.clamp(scalar(args.get("alpha", 0.2)) * args["x"] + scalar(args.get("beta", 0.5)), 0.0, 1.0)


@kernel("gelu")
def gelu(args: Args) -> torch.Tensor:
    x = args["x"]
    mode = str(args.get("mode", "EXACT"))
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none")


@kernel("prelu")
def prelu(args: Args) -> torch.Tensor:
    # alpha has one value per channel; the channel is dimension 1 of x (rank 3 to 5).
    return F.prelu(args["x"], args["alpha"].reshape(-1))


@kernel("softmax")
def softmax(args: Args) -> torch.Tensor:
    return torch.softmax(args["x"], int(scalar(args.get("axis", -1))))


@kernel("cast")
def cast(args: Args) -> torch.Tensor:
    # The interpreter applies the destination dtype (float16 rounding) from the op's declared output.
    dtype = str(args["dtype"])
    x = args["x"]
    if dtype in ("fp16", "fp32"):
        return x.to(torch.float32)
    if dtype == "bool":
        return x != 0
    # MIL casts from float to integer truncate toward zero (numpy astype semantics in value inference).
    return torch.trunc(x.to(torch.float64)).to(torch.int64) if x.is_floating_point() else x.to(torch.int64)


# -------------------------------------------------------------------------------------- linear algebra


@kernel("linear")
def linear(args: Args) -> torch.Tensor:
    bias = args.get("bias")
    return F.linear(args["x"], args["weight"], None if bias is None else torch.as_tensor(bias))


@kernel("matmul")
def matmul(args: Args) -> torch.Tensor:
    x, y = torch.as_tensor(args["x"]), torch.as_tensor(args["y"])
    if bool(args.get("transpose_x", False)):
        x = x.transpose(-1, -2)
    if bool(args.get("transpose_y", False)):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


# ------------------------------------------------------------------------------------ convolution, pools


def spatial_padding(
    pad_type: str, pad: list[int], spatial: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dimension for MIL's pad types.

    `same` pads so that out = ceil(in / stride), the odd pixel after; `same_lower` puts it before;
    `custom` reads `pad` as [begin_0, end_0, begin_1, end_1, ...]; `valid` pads nothing.
    """
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown pad_type {pad_type!r}")
    result = []
    for size, k, s, d in zip(spatial, kernel_size, strides, dilations, strict=True):
        effective = (k - 1) * d + 1
        total = max(0, (math.ceil(size / s) - 1) * s + effective - size)
        small, large = total // 2, total - total // 2
        result.append((small, large) if pad_type == "same" else (large, small))
    return result


def _torch_pad(padding: list[tuple[int, int]]) -> list[int]:
    """MIL's per-dimension (before, after) pairs in F.pad's last-dimension-first order."""
    return [p for before_after in reversed(padding) for p in before_after]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@kernel("conv")
def conv(args: Args) -> torch.Tensor:
    x, weight = args["x"], args["weight"]
    rank = x.dim() - 2
    strides = ints(args["strides"]) if args.get("strides") is not None else [1] * rank
    dilations = ints(args["dilations"]) if args.get("dilations") is not None else [1] * rank
    pad = ints(args["pad"]) if args.get("pad") is not None else [0] * 2 * rank
    padding = spatial_padding(str(args.get("pad_type", "valid")), pad, x.shape[2:], weight.shape[2:], strides,
                              dilations)
    bias = None if args.get("bias") is None else torch.as_tensor(args["bias"])
    groups = int(scalar(args.get("groups", 1)))
    if rank == 2:
        # oneDNN's channels-last convolutions run this program's 2-D convolutions (depthwise above all) about
        # 25% faster than NCHW ones; elementwise ops after it keep the layout, so the copy happens once.
        x = x.contiguous(memory_format=torch.channels_last)
    if all(before == after for before, after in padding):
        # Symmetric padding inside the conv kernel saves a padded copy of the activation.
        return _CONV[rank](x, weight, bias, stride=strides, padding=[before for before, _ in padding],
                           dilation=dilations, groups=groups)
    return _CONV[rank](F.pad(x, _torch_pad(padding)), weight, bias, stride=strides, dilation=dilations, groups=groups)


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@kernel("conv_transpose")
def conv_transpose(args: Args) -> torch.Tensor:
    """MIL conv_transpose (weight [C_in, C_out / groups, *K], as PyTorch's): the full ("valid") transposed
    convolution, then cropped by the padding (`custom`), to input x stride (`same`) or to `output_shape`."""
    x, weight = args["x"], args["weight"]
    rank = x.dim() - 2
    strides = ints(args["strides"]) if args.get("strides") is not None else [1] * rank
    dilations = ints(args["dilations"]) if args.get("dilations") is not None else [1] * rank
    pad = ints(args["pad"]) if args.get("pad") is not None else [0] * 2 * rank
    bias = None if args.get("bias") is None else torch.as_tensor(args["bias"])
    groups = int(scalar(args.get("groups", 1)))
    full = _CONV_TRANSPOSE[rank](x, weight, bias, stride=strides, dilation=dilations, groups=groups)
    pad_type = str(args.get("pad_type", "valid"))
    if pad_type == "valid":
        pad = [0] * 2 * rank
    elif pad_type == "same":
        pad = []
        for size, full_size, stride in zip(x.shape[2:], full.shape[2:], strides, strict=True):
            total = full_size - size * stride
            pad += [total // 2, total - total // 2]
    elif pad_type != "custom":
        raise ValueError(f"unknown pad_type {pad_type!r}")
    wanted = ints(args["output_shape"])[2:] if args.get("output_shape") is not None else [
        full.shape[2 + i] - pad[2 * i] - pad[2 * i + 1] for i in range(rank)]
    out = full
    for i, size in enumerate(wanted):
        out = out.narrow(2 + i, pad[2 * i], min(size, out.shape[2 + i] - pad[2 * i]))
        if out.shape[2 + i] < size:  # an output_shape beyond the full output: zeros after (output padding)
            extra = [0, 0] * (rank - 1 - i) + [0, size - out.shape[2 + i]]
            out = F.pad(out, extra)
    return out


@kernel("crop")
def crop(args: Args) -> torch.Tensor:
    """MIL crop: remove (before, after) rows and columns from the last two dimensions."""
    x = args["x"]
    top, bottom = ints(args["crop_height"])
    left, right = ints(args["crop_width"])
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool(args: Args, reduce: str) -> torch.Tensor:
    x = args["x"]
    rank = x.dim() - 2
    kernel_sizes = ints(args["kernel_sizes"])
    strides = ints(args["strides"]) if args.get("strides") is not None else [1] * rank
    pad = ints(args["pad"]) if args.get("pad") is not None else [0] * 2 * rank
    if bool(args.get("ceil_mode", False)):
        raise NotImplementedError("ceil_mode=True pooling")
    padding = spatial_padding(str(args["pad_type"]), pad, x.shape[2:], kernel_sizes, strides, [1] * rank)
    if reduce == "max":
        padded = F.pad(x, _torch_pad(padding), value=-math.inf)
        return _MAX_POOL[rank](padded, kernel_sizes, strides)
    summed = _AVG_POOL[rank](F.pad(x, _torch_pad(padding)), kernel_sizes, strides) * math.prod(kernel_sizes)
    if bool(args.get("exclude_padding_from_average", False)):
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        count = _AVG_POOL[rank](F.pad(ones, _torch_pad(padding)), kernel_sizes, strides) * math.prod(kernel_sizes)
        return summed / count
    return summed / math.prod(kernel_sizes)


@kernel("avg_pool")
def avg_pool(args: Args) -> torch.Tensor:
    return _pool(args, "avg")


@kernel("max_pool")
def max_pool(args: Args) -> torch.Tensor:
    return _pool(args, "max")


@kernel("batch_norm")
def batch_norm(args: Args) -> torch.Tensor:
    x = args["x"]
    shape = [1, -1] + [1] * (x.dim() - 2)
    gamma = args.get("gamma")
    beta = args.get("beta")
    y = (x - args["mean"].reshape(shape)) / torch.sqrt(args["variance"].reshape(shape) + scalar(
        args.get("epsilon", 1e-5)))
    if gamma is not None:
        y = y * gamma.reshape(shape)
    return y if beta is None else y + beta.reshape(shape)


@kernel("layer_norm")
def layer_norm(args: Args) -> torch.Tensor:
    x = args["x"]
    axes = _axes(args, x.dim()) or list(range(x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(variance + scalar(args.get("epsilon", 1e-5)))
    if args.get("gamma") is not None:
        y = y * args["gamma"]
    return y if args.get("beta") is None else y + args["beta"]


# ------------------------------------------------------------------------------------------- reductions


def _reduction(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Kernel:
    def run(args: Args) -> torch.Tensor:
        x = args["x"]
        axes = _axes(args, x.dim()) or list(range(x.dim()))
        return fn(x, axes, bool(args.get("keep_dims", False)))

    return run


for _name, _reduce in {
    "reduce_mean": lambda x, a, k: x.mean(dim=a, keepdim=k),
    "reduce_sum": lambda x, a, k: x.sum(dim=a, keepdim=k),
    "reduce_max": lambda x, a, k: x.amax(dim=a, keepdim=k),
    "reduce_min": lambda x, a, k: x.amin(dim=a, keepdim=k),
    "reduce_sum_square": lambda x, a, k: (x * x).sum(dim=a, keepdim=k),
    "reduce_l2_norm": lambda x, a, k: torch.sqrt((x * x).sum(dim=a, keepdim=k)),
}.items():
    KERNELS[_name] = _reduction(_reduce)

# ------------------------------------------------------------------------------------ shape and layout


@kernel("reshape")
def reshape(args: Args) -> torch.Tensor:
    # `0` copies the input's dimension at that position (when the ranks agree); `-1` is inferred.
    x = args["x"]
    shape = ints(args["shape"])
    if len(shape) == x.dim():
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def transpose(args: Args) -> torch.Tensor:
    return args["x"].permute(ints(args["perm"]))


@kernel("squeeze")
def squeeze(args: Args) -> torch.Tensor:
    x = args["x"]
    axes = _axes(args, x.dim())
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return x.squeeze(tuple(axes))


@kernel("expand_dims")
def expand_dims(args: Args) -> torch.Tensor:
    x = args["x"]
    out_rank = x.dim() + len(ints(args["axes"]))
    for axis in sorted(a % out_rank for a in ints(args["axes"])):
        x = x.unsqueeze(axis)
    return x


def _mask(args: Args, name: str, rank: int) -> list[bool]:
    value = args.get(name)
    return [False] * rank if value is None else [bool(v) for v in np.asarray(_np(value)).reshape(-1)]


@kernel("slice_by_index")
def slice_by_index(args: Args) -> torch.Tensor:
    # MIL: per axis begin/end/stride; a set begin_mask / end_mask bit takes the whole range on that side,
    # negative indices count from the end, a set squeeze_mask bit keeps index `begin` and drops the axis.
    x = args["x"]
    rank = x.dim()
    begin, end = ints(args["begin"]), ints(args["end"])
    stride = ints(args["stride"]) if args.get("stride") is not None else [1] * rank
    begin_mask, end_mask = _mask(args, "begin_mask", rank), _mask(args, "end_mask", rank)
    squeeze_mask = _mask(args, "squeeze_mask", rank)
    index: list[slice | int] = []
    for axis in range(rank):
        size, step = x.shape[axis], stride[axis]
        start = begin[axis] + size if begin[axis] < 0 else begin[axis]
        if squeeze_mask[axis]:
            index.append(start)
            continue
        if step <= 0:
            raise NotImplementedError("slice_by_index with a negative or zero stride")
        stop = end[axis] + size if end[axis] < 0 else end[axis]
        index.append(slice(None if begin_mask[axis] else start, None if end_mask[axis] else stop, step))
    return x[tuple(index)]


@kernel("slice_by_size")
def slice_by_size(args: Args) -> torch.Tensor:
    # MIL: `size` elements from `begin` per axis; -1 takes the rest of the axis.
    x = args["x"]
    begin, size = ints(args["begin"]), ints(args["size"])
    return x[tuple(slice(b, None if n == -1 else b + n) for b, n in zip(begin, size, strict=True))]


@kernel("concat")
def concat(args: Args) -> torch.Tensor:
    values = [torch.as_tensor(v) for v in args["values"]]
    if bool(args.get("interleave", False)):
        raise NotImplementedError("concat with interleave=True")
    return torch.cat(values, dim=int(scalar(args["axis"])))
