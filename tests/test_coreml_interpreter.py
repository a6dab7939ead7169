"""The Core ML reference interpreter against PyTorch and NumPy, op by op, on programs coremltools builds here.

Each test converts a tiny torch module (or a MIL program, for pad types torch never emits) with coremltools,
saves the .mlpackage, loads it back through the interpreter and compares with an independent reference.
Each also checks that the op under test really is in the saved program, so a converter rewrite cannot make
a test vacuous.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from factory.coreml_interpreter import CoreMLInterpreter
from factory.coreml_interpreter.ops import WEIGHT_KERNELS
from factory.errors import FactoryError

BATCH = 3  # programs are converted at batch 1; running 3 at once checks the batch handling everywhere


def convert_torch(module: nn.Module, example: torch.Tensor, tmp_path: Path, fp16: bool = False,
                  target: str = "iOS16") -> Path:
    import coremltools as ct

    exported = torch.export.export(module.eval(), (example,)).run_decompositions({})
    model = ct.convert(exported, inputs=[ct.TensorType(name="x", shape=tuple(example.shape), dtype=np.float32)],
                       convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                       minimum_deployment_target=getattr(ct.target, target))
    path = tmp_path / "model.mlpackage"
    model.save(str(path))
    return path


def convert_mil(build: Callable[..., object], shape: tuple[int, ...], tmp_path: Path, fp16: bool = False) -> Path:
    """A MIL program of one input `x` built by `build(x)`, saved as an iOS 17 .mlpackage."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    program = mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)(build)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
    path = tmp_path / "program.mlpackage"
    model.save(str(path))
    return path


def run(interpreter: CoreMLInterpreter, x: np.ndarray) -> np.ndarray:
    (name,) = interpreter.inputs
    return next(iter(interpreter.run({name: x}).values()))


def torch_batch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def check_module(module: nn.Module, shape: tuple[int, ...], tmp_path: Path, op_type: str) -> None:
    """fp32 program of `module` at batch 1, run at batch BATCH, equals PyTorch to float32 rounding."""
    torch.manual_seed(0)
    x = random_input((BATCH, *shape[1:]))
    interpreter = CoreMLInterpreter.from_package(convert_torch(module, torch.from_numpy(x[:1]), tmp_path))
    assert op_type in interpreter.op_types, interpreter.op_types
    np.testing.assert_allclose(run(interpreter, x), torch_batch(module, x), rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------- convolution

CONVS = {
    "3x3 pad 1, odd 17x13": (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 17, 13)),
    "3x5 kernel, stride (2,1), pad (1,2)": (nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2)), (1, 4, 15, 11)),
    "depthwise stride 2": (nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (1, 8, 13, 13)),
    "grouped 3, dilation 2": (nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3), (1, 6, 12, 10)),
    "4x4 stride 3, no pad, leftover rows": (nn.Conv2d(3, 4, 4, stride=3), (1, 3, 14, 16)),
    "torch padding='same', dilation 2": (nn.Conv2d(3, 5, 3, padding="same", dilation=2), (1, 3, 9, 8)),
    "no bias 1x1": (nn.Conv2d(5, 7, 1, bias=False), (1, 5, 6, 6)),
    "conv1d stride 2": (nn.Conv1d(3, 4, 5, stride=2, padding=1), (1, 3, 21)),
    "global depthwise 7x7 (GDC head)": (nn.Conv2d(16, 16, 7, groups=16), (1, 16, 7, 7)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_matches_torch(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, shape = CONVS[case]
    check_module(module, shape, tmp_path, "conv")


# MIL pad types torch never emits, with the paddings worked out by hand from the MIL spec
# (same: out = ceil(in / stride), the odd pixel after; same_lower: before).
PAD_TYPES = {
    "same, in 7, k 4, s 2 -> pad (1, 2)": ("same", [0, 0, 0, 0], (1, 2, 1, 2)),
    "same_lower, in 7, k 4, s 2 -> pad (2, 1)": ("same_lower", [0, 0, 0, 0], (2, 1, 2, 1)),
    "valid -> no pad": ("valid", [0, 0, 0, 0], (0, 0, 0, 0)),
    "custom asymmetric (0, 3, 2, 1)": ("custom", [0, 3, 2, 1], (0, 3, 2, 1)),
}


@pytest.mark.parametrize("case", list(PAD_TYPES))
def test_conv_pad_types(case: str, tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    pad_type, pad, (top, bottom, left, right) = PAD_TYPES[case]
    weight = random_input((5, 2, 4, 4), seed=1)
    path = convert_mil(lambda x: mb.conv(x=x, weight=weight, strides=[2, 2], pad_type=pad_type, pad=pad),
                       (1, 2, 7, 7), tmp_path)
    interpreter = CoreMLInterpreter.from_package(path)
    x = random_input((BATCH, 2, 7, 7))
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(padded, torch.from_numpy(weight), stride=2).numpy()
    np.testing.assert_allclose(run(interpreter, x), expected, rtol=1e-4, atol=2e-5)


CONV_TRANSPOSES = {
    "2x2 stride 2 (the normaliser's up-sampling)": (nn.ConvTranspose2d(8, 6, 2, stride=2), (1, 8, 7, 7)),
    "3x3 stride 2 pad 1, output padding 1": (nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1, output_padding=1),
                                             (1, 4, 6, 5)),
    "grouped 2, stride (2, 1), no bias": (nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), groups=2, bias=False),
                                          (1, 4, 5, 6)),
    "dilation 2": (nn.ConvTranspose2d(3, 4, 3, dilation=2), (1, 3, 6, 6)),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSES))
def test_conv_transpose_matches_torch(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, shape = CONV_TRANSPOSES[case]
    check_module(module, shape, tmp_path, "conv_transpose")


def test_conv_transpose_same_and_custom_pads_follow_the_mil_spec(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    weight = random_input((2, 3, 4, 4), seed=1)  # [C_in, C_out, kH, kW]
    x = random_input((BATCH, 2, 5, 5))
    full = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(weight), stride=2).numpy()
    assert full.shape[2:] == (12, 12)
    # same: out = in x stride = 10, the 2 extra rows/columns cropped one before, one after
    same = convert_mil(lambda v: mb.conv_transpose(x=v, weight=weight, strides=[2, 2], pad_type="same"),
                       (1, 2, 5, 5), tmp_path / "same")
    np.testing.assert_allclose(run(CoreMLInterpreter.from_package(same), x), full[:, :, 1:11, 1:11],
                               rtol=1e-4, atol=2e-5)
    # custom (top 0, bottom 3, left 2, right 1)
    custom = convert_mil(lambda v: mb.conv_transpose(x=v, weight=weight, strides=[2, 2], pad_type="custom",
                                                     pad=[0, 3, 2, 1]), (1, 2, 5, 5), tmp_path / "custom")
    np.testing.assert_allclose(run(CoreMLInterpreter.from_package(custom), x), full[:, :, 0:9, 2:11],
                               rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------------ pools


POOLS = {
    "max 3x3 s2 p1": (nn.MaxPool2d(3, 2, 1), "max_pool"),
    "avg 2x2": (nn.AvgPool2d(2), "avg_pool"),
    "avg 3x3 s2 p1 counting padding": (nn.AvgPool2d(3, 2, 1, count_include_pad=True), "avg_pool"),
    "avg 3x3 s2 p1 excluding padding": (nn.AvgPool2d(3, 2, 1, count_include_pad=False), "avg_pool"),
    "global average": (nn.AdaptiveAvgPool2d(1), "reduce_mean"),
}


@pytest.mark.parametrize("case", list(POOLS))
def test_pool_matches_torch(case: str, tmp_path: Path) -> None:
    module, op_type = POOLS[case]
    check_module(module, (1, 4, 11, 9), tmp_path, op_type)


class ChannelSlices(nn.Module):
    """An uneven channel split, as SeesawFaceNet's blocks do, recombined so every slice matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x[:, 3:] * 2.0, x[:, :3], x[:, 1:-1:2]), dim=1)


def test_channel_slices_match_torch(tmp_path: Path) -> None:
    check_module(ChannelSlices(), (1, 8, 4, 6), tmp_path, "slice_by_index")


SLICES = {
    "masks and negative end": (dict(begin=[0, 1, 0, 0], end=[0, -1, 3, 0], begin_mask=[True, False, False, True],
                                     end_mask=[True, False, False, True]), np.s_[:, 1:-1, 0:3, :]),
    "stride 2, squeeze axis 1": (dict(begin=[0, 2, 1, 0], end=[1, 3, 5, 6], stride=[1, 1, 2, 3],
                                      squeeze_mask=[False, True, False, False]), np.s_[0:1, 2, 1:5:2, 0:6:3]),
}


@pytest.mark.parametrize("case", list(SLICES))
def test_slice_by_index_masks_follow_the_mil_spec(case: str, tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    kwargs, expected_index = SLICES[case]
    path = convert_mil(lambda x: mb.slice_by_index(x=x, **kwargs), (1, 5, 6, 6), tmp_path)
    x = random_input((1, 5, 6, 6))
    np.testing.assert_array_equal(run(CoreMLInterpreter.from_package(path), x), x[expected_index])


def test_slice_by_size_takes_the_rest_with_minus_one(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    path = convert_mil(lambda x: mb.slice_by_size(x=x, begin=[0, 1, 2, 0], size=[1, 3, -1, 4]), (1, 5, 6, 6),
                       tmp_path)
    x = random_input((1, 5, 6, 6))
    np.testing.assert_array_equal(run(CoreMLInterpreter.from_package(path), x), x[0:1, 1:4, 2:, 0:4])


# ---------------------------------------------------------------------------- elementwise, broadcasting


class Broadcasting(nn.Module):
    """Binary ops between the input and constants of lower rank / size-1 dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("per_channel", torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1))
        self.register_buffer("per_column", torch.linspace(-1, 1, 5))
        self.register_buffer("per_row", torch.linspace(1, 2, 4).view(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.per_channel) * self.per_column / (x * x + self.per_row)
        return torch.maximum(y, -x) + torch.minimum(x, self.per_column) + torch.pow(torch.abs(y), 1.5)


ELEMENTWISE = {
    "sub/mul/div/maximum/minimum/pow broadcast": (Broadcasting(), "real_div"),
    "relu": (nn.ReLU(), "relu"),
    "relu6": (nn.ReLU6(), "clip"),
    "prelu per channel": (nn.PReLU(3, 0.1), "prelu"),
    "leaky relu": (nn.LeakyReLU(0.1), "leaky_relu"),
    "sigmoid": (nn.Sigmoid(), "sigmoid"),
    "hardsigmoid": (nn.Hardsigmoid(), "sigmoid_hard"),
    "hardswish": (nn.Hardswish(), "sigmoid_hard"),
    "silu": (nn.SiLU(), "silu"),
    "tanh": (nn.Tanh(), "tanh"),
    "gelu": (nn.GELU(), "gelu"),
    "softmax over channels": (nn.Softmax(dim=1), "softmax"),
}


@pytest.mark.parametrize("case", list(ELEMENTWISE))
def test_elementwise_matches_torch(case: str, tmp_path: Path) -> None:
    module, op_type = ELEMENTWISE[case]
    with torch.no_grad():
        if isinstance(module, nn.PReLU):
            module.weight.copy_(torch.tensor([0.1, -0.5, 2.0]))
    check_module(module, (1, 3, 4, 5), tmp_path, op_type)


class Unary(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


UNARY = {
    "exp": (torch.exp, "exp"),
    "sqrt of |x|": (lambda x: torch.sqrt(torch.abs(x) + 0.1), "sqrt"),
    "rsqrt of x^2 clamped": (lambda x: torch.rsqrt(torch.clamp(x * x, min=1e-3)), "rsqrt"),
    "log of |x|": (lambda x: torch.log(torch.abs(x) + 0.5), "log"),
    "clamp": (lambda x: torch.clamp(x, -0.3, 0.7), "clip"),
}


@pytest.mark.parametrize("case", list(UNARY))
def test_unary_matches_torch(case: str, tmp_path: Path) -> None:
    fn, op_type = UNARY[case]
    check_module(Unary(fn), (1, 2, 3, 7), tmp_path, op_type)


# ------------------------------------------------------------------------- linear algebra, shapes, norms


class Head(nn.Module):
    """Flatten (a reshape with a literal batch 1), linear (matmul by a constant), transpose, concat, reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * 3 * 5, 6)
        self.register_buffer("projection", torch.randn(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.linear(torch.flatten(x, 1)) @ self.projection
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), x.sum(dim=(2, 3))], dim=1)
        transposed = torch.flatten(x.permute(0, 2, 3, 1), 1)
        return torch.cat([projected, pooled, transposed], dim=1)


def test_linear_and_shape_ops_match_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = random_input((BATCH, 4, 3, 5))
    module = Head()
    interpreter = CoreMLInterpreter.from_package(convert_torch(module, torch.from_numpy(x[:1]), tmp_path))
    ops = {"linear", "transpose", "concat", "reshape", "reduce_mean", "reduce_max", "reduce_sum"}
    assert ops <= set(interpreter.op_types), interpreter.op_types
    np.testing.assert_allclose(run(interpreter, x), torch_batch(module, x), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mode, reference", [
    ("EXACT", lambda x: torch.nn.functional.gelu(x)),
    ("TANH_APPROXIMATION", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("SIGMOID_APPROXIMATION", lambda x: x * torch.sigmoid(1.702 * x)),
])
def test_gelu_modes(mode: str, reference: Callable[[torch.Tensor], torch.Tensor], tmp_path: Path) -> None:
    # Built in MIL: coremltools 9 converts torch's gelu(approximate="tanh") to mode EXACT (it drops the kwarg).
    from coremltools.converters.mil import Builder as mb

    interpreter = CoreMLInterpreter.from_package(convert_mil(lambda x: mb.gelu(x=x, mode=mode), (1, 40), tmp_path))
    x = np.linspace(-4, 4, BATCH * 40, dtype=np.float32).reshape(BATCH, 40)
    np.testing.assert_allclose(run(interpreter, x), reference(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


# Ops torch rarely emits, built directly in MIL and compared with NumPy.
MIL_OPS = {
    "floor": (lambda mb, x: mb.floor(x=x), np.floor),
    "ceil": (lambda mb, x: mb.ceil(x=x), np.ceil),
    "square": (lambda mb, x: mb.square(x=x), np.square),
    "inverse eps 0.5": (lambda mb, x: mb.inverse(x=mb.abs(x=x), epsilon=0.5), lambda x: 1 / (np.abs(x) + 0.5)),
    "erf": (lambda mb, x: mb.erf(x=x), lambda x: torch.erf(torch.from_numpy(x)).numpy()),
    "floor_div": (lambda mb, x: mb.floor_div(x=x, y=np.float32(0.7)), lambda x: np.floor(x / np.float32(0.7))),
    "reduce_min keep_dims": (lambda mb, x: mb.reduce_min(x=x, axes=[1], keep_dims=True),
                             lambda x: x.min(1, keepdims=True)),
    "reduce_sum_square": (lambda mb, x: mb.reduce_sum_square(x=x, axes=[-1]), lambda x: (x * x).sum(-1)),
    "reduce_l2_norm": (lambda mb, x: mb.reduce_l2_norm(x=x, axes=[1, 2]), lambda x: np.sqrt((x * x).sum((1, 2)))),
    "expand_dims + squeeze": (lambda mb, x: mb.squeeze(x=mb.expand_dims(x=x, axes=[1, -1]), axes=[1]),
                              lambda x: x[..., None]),
    "matmul transpose_y": (lambda mb, x: mb.matmul(x=x, y=x, transpose_y=True), lambda x: x @ x.swapaxes(-1, -2)),
}


@pytest.mark.parametrize("case", list(MIL_OPS))
def test_mil_ops_match_numpy(case: str, tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    build, reference = MIL_OPS[case]
    interpreter = CoreMLInterpreter.from_package(convert_mil(lambda x: build(mb, x), (1, 3, 4), tmp_path))
    x = random_input((BATCH, 3, 4)) * 3.0
    np.testing.assert_allclose(run(interpreter, x), reference(x), rtol=1e-5, atol=1e-6)


class Norms(nn.Module):
    """A batch norm that cannot fold into a conv (it follows an add), then a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(6)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.1]))
            self.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3]))
            self.bn.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.bn(x + 1.0))


@pytest.mark.parametrize("op_type", ["batch_norm", "layer_norm"])
def test_norms_match_torch(op_type: str, tmp_path: Path) -> None:
    check_module(Norms(), (1, 4, 5, 6), tmp_path, op_type)


# ------------------------------------------------------------------------------------- float16 emulation


def test_fp16_program_rounds_every_op_like_numpy_float16(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    def build(x: object) -> object:
        y = mb.mul(x=x, y=np.float32(1.0 / 3.0))
        return mb.add(x=y, y=np.float32(1000.0))

    interpreter = CoreMLInterpreter.from_package(convert_mil(build, (1, 64), tmp_path, fp16=True))
    assert interpreter.op_types == ["cast", "mul", "add", "cast"]
    x = np.linspace(-5, 5, BATCH * 64, dtype=np.float32).reshape(BATCH, 64)
    half = np.float16
    expected = ((x.astype(half) * half(1.0 / 3.0)).astype(half) + half(1000.0)).astype(np.float32)
    fed = x.copy()
    got = run(interpreter, x)
    np.testing.assert_array_equal(got, expected)
    # Results are rounded in place only when they are a kernel's own tensor: the input cast returns the fed array's
    # memory, which must come back untouched.
    np.testing.assert_array_equal(x, fed)
    # float32 arithmetic gives visibly different values here: the rounding really happens.
    assert np.abs(got - (x / 3.0 + 1000.0)).max() > 0.1


def test_fp16_conv_program_stays_close_to_torch_and_is_float16_valued(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 4, 3, stride=2, groups=4))
    x = random_input((BATCH, 3, 16, 16))
    interpreter = CoreMLInterpreter.from_package(convert_torch(module, torch.from_numpy(x[:1]), tmp_path, fp16=True))
    got = run(interpreter, x)
    expected = torch_batch(module, x)
    assert np.abs(got - expected).max() < 0.01 * np.abs(expected).max()
    assert np.abs(got - expected).max() > 0  # fp16 compute is not fp32 compute
    np.testing.assert_array_equal(got.astype(np.float16).astype(np.float32), got)


# ------------------------------------------------------------------------------------ compressed weights


def _compressed_program(tmp_path: Path, compress: Callable[[object], object], target: str) -> tuple[Path, nn.Module]:
    import coremltools as ct

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1))
    example = torch.from_numpy(random_input((1, 8, 8, 8)))
    exported = torch.export.export(module.eval(), (example,)).run_decompositions({})
    model = ct.convert(exported, inputs=[ct.TensorType(name="x", shape=(1, 8, 8, 8), dtype=np.float32)],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=getattr(ct.target, target))
    path = tmp_path / "compressed.mlpackage"
    compress(model).save(str(path))
    return path, module


def _weight_compressions() -> dict[str, tuple[str, str, Callable[[object], object]]]:
    import coremltools.optimize.coreml as cto

    def config(op_config: object) -> object:
        return cto.OptimizationConfig(global_config=op_config)

    quantize, palettize, prune = cto.linear_quantize_weights, cto.palettize_weights, cto.prune_weights
    return {
        "int8 per-channel (iOS16 affine)": ("iOS16", "constexpr_affine_dequantize", lambda m: quantize(
            m, config(cto.OpLinearQuantizerConfig(mode="linear", dtype="int8", weight_threshold=0)))),
        "int4 block 4 (iOS18 blockwise)": ("iOS18", "constexpr_blockwise_shift_scale", lambda m: quantize(
            m, config(cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                  block_size=4, weight_threshold=0)))),
        "4-bit palette (iOS16 LUT)": ("iOS16", "constexpr_lut_to_dense", lambda m: palettize(
            m, config(cto.OpPalettizerConfig(nbits=4, mode="kmeans", weight_threshold=0)))),
        "2-bit palette per 8 channels (iOS18 LUT)": ("iOS18", "constexpr_lut_to_dense", lambda m: palettize(
            m, config(cto.OpPalettizerConfig(nbits=2, mode="uniform", granularity="per_grouped_channel",
                                             group_size=8, weight_threshold=0)))),
        "50% sparse (iOS16)": ("iOS16", "constexpr_sparse_to_dense", lambda m: prune(
            m, config(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)))),
        "50% sparse (iOS18)": ("iOS18", "constexpr_sparse_to_dense", lambda m: prune(
            m, config(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)))),
    }


@pytest.mark.parametrize("case", ["int8 per-channel (iOS16 affine)", "int4 block 4 (iOS18 blockwise)",
                                  "4-bit palette (iOS16 LUT)", "2-bit palette per 8 channels (iOS18 LUT)",
                                  "50% sparse (iOS16)", "50% sparse (iOS18)"])
def test_weight_decompression_matches_coremltools_and_runs(case: str, tmp_path: Path) -> None:
    """Each constexpr op decompresses to exactly coremltools' own value, and the program then runs."""
    from factory.coreml_interpreter import load_program

    target, op_type, compress = _weight_compressions()[case]
    path, module = _compressed_program(tmp_path, compress, target)
    program = load_program(path)
    constexprs = [op for op in program.functions["main"].operations if op.op_type == op_type]
    assert len(constexprs) == 2, [op.op_type for op in program.functions["main"].operations]
    for op in constexprs:
        args = {key: var.val for key, var in op.inputs.items()}
        np.testing.assert_array_equal(WEIGHT_KERNELS[op_type](args), op.materialized_val_inference())

    # The decompressed weights in the original module: the interpreter must then match it to fp32 rounding.
    interpreter = CoreMLInterpreter(program, str(path))
    with torch.no_grad():
        for conv, op in zip((module[0], module[2]), constexprs, strict=True):
            conv.weight.copy_(torch.from_numpy(op.materialized_val_inference().astype(np.float32)))
    x = random_input((BATCH, 8, 8, 8))
    np.testing.assert_allclose(run(interpreter, x), torch_batch(module, x), rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------ quantised activations


@pytest.mark.parametrize("dtype, scale, zero_point, axis", [
    ("int8", np.float32(0.05), None, None),
    ("uint8", np.float32(0.02), np.uint8(128), None),
    ("int8", np.array([0.01, 0.03, 0.1], np.float32), np.array([-3, 0, 5], np.int8), 1),
])
def test_quantize_dequantize_match_numpy(dtype: str, scale: np.ndarray, zero_point: np.ndarray | None,
                                          axis: int | None, tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    def build(x: object) -> object:
        extra = {} if zero_point is None else {"zero_point": zero_point}
        if axis is not None:
            extra["axis"] = axis
        q = mb.quantize(input=x, scale=scale, output_dtype=dtype, **extra)
        return mb.dequantize(input=q, scale=scale, **extra)

    interpreter = CoreMLInterpreter.from_package(convert_mil(build, (1, 3, 4, 5), tmp_path))
    assert {"quantize", "dequantize"} <= set(interpreter.op_types)
    x = random_input((BATCH, 3, 4, 5)) * 4.0  # wide enough to saturate the int8 range
    shape = (1, -1, 1, 1) if axis is not None else ()
    s = np.reshape(scale, shape)
    zp = np.zeros(()) if zero_point is None else np.reshape(zero_point, shape).astype(np.float32)
    low, high = (-128, 127) if dtype == "int8" else (0, 255)
    levels = np.round(x / s) + zp
    assert ((levels < low) | (levels > high)).any(), "the input should exercise saturation"
    expected = ((np.clip(levels, low, high) - zp) * s).astype(np.float32)
    np.testing.assert_allclose(run(interpreter, x), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_op_names_the_op_and_the_artifact(tmp_path: Path) -> None:
    path = convert_torch(nn.ELU(), torch.zeros(1, 2, 3, 3), tmp_path)
    with pytest.raises(FactoryError, match=rf"{path}.*does not implement op type\(s\) elu"):
        CoreMLInterpreter.from_package(path)


class FoldsBatch(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape) * 2.0


@pytest.mark.parametrize(("shape", "error"), [
    ((2, -1), "moves the batch dimension"),
    ((-1,), r"produced shape \(72,\) where the program declares \(24,\) per image; this op cannot run at batch 3"),
])
def test_a_reshape_that_moves_the_batch_refuses_batches_but_runs_one_image(shape: tuple[int, ...], error: str,
                                                                            tmp_path: Path) -> None:
    x = random_input((BATCH, 2, 3, 4))
    module = FoldsBatch(shape)
    interpreter = CoreMLInterpreter.from_package(convert_torch(module, torch.from_numpy(x[:1]), tmp_path))
    with pytest.raises(FactoryError, match=error):
        run(interpreter, x)
    np.testing.assert_array_equal(run(interpreter, x[:1]), x[:1].reshape(shape) * 2.0)


def test_wrong_input_shape_is_named(tmp_path: Path) -> None:
    interpreter = CoreMLInterpreter.from_package(convert_torch(nn.ReLU(), torch.zeros(1, 2, 3, 3), tmp_path))
    with pytest.raises(FactoryError, match=r"input 'x' has shape \(4, 2, 3, 5\); the program expects \(1, 2, 3, 3\)"):
        run(interpreter, np.zeros((4, 2, 3, 5), np.float32))


# ------------------------------------------------------------------------------- the shipped model, real faces


@pytest.mark.data
def test_fp32_program_of_the_shipped_mobilefacenet_matches_pytorch_on_real_faces(faces_root: Path,
                                                                                  tmp_path: Path) -> None:
    """The whole interpreter on the real network: a float32 program must reproduce PyTorch to 1e-5 cosine."""
    import coremltools as ct

    from factory.data import load_images, read_lfw_pairs, unique_pair_images
    from factory.deploy import Embedder
    from factory.models import load_backbone
    from factory.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mobilefacenet.yaml",
                         data_root=str(faces_root))
    spec = recipe.model.input
    embedder = Embedder(load_backbone(recipe), spec.mean, spec.std, recipe.model.embedding_size).eval()
    pairs = read_lfw_pairs(faces_root / "lfw" / "pairs.txt", faces_root / "lfw" / "aligned")
    paths = unique_pair_images(pairs)[:64]
    faces = np.ascontiguousarray(load_images(paths, spec.size).astype(np.float32).transpose(0, 3, 1, 2))

    exported = torch.export.export(embedder, (torch.from_numpy(faces[:1]),)).run_decompositions({})
    model = ct.convert(exported, inputs=[ct.TensorType(name="image", shape=faces[:1].shape, dtype=np.float32)],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS16)
    model.save(str(tmp_path / "mobilefacenet_fp32.mlpackage"))
    interpreter = CoreMLInterpreter.from_package(tmp_path / "mobilefacenet_fp32.mlpackage")
    assert {"conv", "prelu", "add", "linear", "rsqrt"} <= set(interpreter.op_types)

    got = run(interpreter, faces)
    expected = torch_batch(embedder, faces)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert len(cosine) == 64 and cosine.min() >= 0.99999, (cosine.min(), cosine.mean())


class Branchy(nn.Module):
    """A value read twice, far apart (the residual), and a branch whose output is read once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return x + self.b(torch.sigmoid(y) * y)


def test_intermediate_values_are_dropped_after_their_last_reader(tmp_path: Path) -> None:
    """Memory holds only live values: each intermediate is released once, after its last reader, never sooner."""
    module = Branchy()
    x = random_input((BATCH, 4, 6, 6))
    interpreter = CoreMLInterpreter.from_package(convert_torch(module, torch.from_numpy(x[:1]), tmp_path))
    released = [name for names in interpreter._release for name in names]
    produced = [output.name for step in interpreter._steps for output in step.outputs]
    assert sorted(released) == sorted((set(produced) | set(interpreter.inputs)) - set(interpreter.output_names))
    for index, names in enumerate(interpreter._release):
        for name in names:  # no later step reads a released value
            later = [s for s in interpreter._steps[index + 1:]
                     if any(name in (v if isinstance(v, tuple) else (v,)) for v in s.inputs.values())]
            assert not later, (name, later)
    np.testing.assert_allclose(run(interpreter, x), torch_batch(module, x), rtol=1e-4, atol=2e-5)
