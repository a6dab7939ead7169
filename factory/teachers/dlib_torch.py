"""dlib's ResNet face-recognition network v1 in PyTorch, read straight from dlib's `.dat` file.

The network is dlib's `anet_type` of `examples/dnn_face_recognition_ex.cpp` (see
`factory.teachers.dlib_resnet` for the paper): a 7x7/2 convolution, 3x3/2 max pooling, residual
blocks at 32, 64, 128, 256 and 256 filters (3, 4, 3, 3 and 1 blocks; the first block of each level but
the first halves the size), global average pooling and a 128x256 linear map without bias. Every
batch-norm was folded into an affine (scale and shift) layer before the file was saved.

dlib's conventions kept here: a stride-2 convolution or pooling has no padding (stride 1: half the
kernel); a downsampling block's shortcut is 2x2/2 average pooling of its input, and the sum of two
tensors of different shapes is taken over the larger shape with the smaller zero-padded at the end
(more channels, and 3x3 against 4x4 at the 256-filter level); input pixels are RGB, minus the per
channel means stored in the file, divided by 256.

The `.dat` file is dlib's serialisation of the whole network object, outermost layer first, each
layer's sub-network before its own fields: so the layers appear input first. Integers are a length
byte (bit 7: negative) and that many little-endian bytes; strings are an integer length and the bytes;
scalar floats are an integer mantissa and an integer exponent; tensors are a version (2), four
dimensions and raw little-endian float32 values. Only the layers' names, shapes and parameters are
read; their order is checked against the architecture above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.errors import FactoryError
from factory.metrics import l2_normalise
from factory.teachers.dlib_files import RESNET_V1, model_file
from factory.teachers.dlib_resnet import NAME as DLIB_NAME
from factory.teachers.dlib_resnet import check_faces, crops_to_chips
from factory.teachers.registry import register_teacher, teacher_entry

NAME = "dlib_resnet_v1_torch"

LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))  # filters, blocks, down
KINDS = ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2")
# A layer's fields start with its name, serialised as a string: length (one-byte integer), then the bytes.
LAYER_NAME = re.compile(b"|".join(b"\\x01" + re.escape(bytes([len(kind)]) + kind.encode()) for kind in KINDS))


@dataclass
class Layer:
    """One layer read from the file: its kind and, where it has them, its parameters and settings."""

    kind: str
    values: np.ndarray | None = None  # the flat parameter tensor
    settings: dict[str, int | float] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, position: int) -> None:
        self.data, self.position = data, position

    def integer(self) -> int:
        header = self.data[self.position]
        size = header & 0x0F
        value = int.from_bytes(self.data[self.position + 1 : self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if header & 0x80 else value

    def scalar(self) -> float:
        mantissa = self.integer()
        return float(np.ldexp(float(mantissa), self.integer()))

    def tensor(self) -> np.ndarray:
        if (version := self.integer()) != 2:
            raise ValueError(f"tensor version {version} at byte {self.position}, expected 2")
        count = int(np.prod([self.integer() for _ in range(4)]))
        values = np.frombuffer(self.data, "<f4", count, self.position).copy()
        self.position += 4 * count
        return values


def read_layers(path: Path) -> list[Layer]:
    """The layers of a dlib network file, input first, with the parameters of the convolutions, affine and
    fully connected layers and the settings of the input and pooling layers."""
    data = path.read_bytes()
    layers: list[Layer] = []
    position = 0
    while (match := LAYER_NAME.search(data, position)) is not None:
        kind = match.group(0)[2:].decode()
        reader = _Reader(data, match.end())
        try:
            layers.append(_read_layer(kind, reader))
        except (IndexError, ValueError) as error:
            raise FactoryError(f"{path}: {kind} layer at byte {match.start()} is unreadable ({error}); the file is "
                               "damaged or not a dlib network") from None
        position = reader.position
    return layers


def _read_layer(kind: str, reader: _Reader) -> Layer:
    layer = Layer(kind)
    if kind == "input_rgb_image_sized":
        layer.settings = {"mean_red": reader.scalar(), "mean_green": reader.scalar(),
                          "mean_blue": reader.scalar(), "rows": reader.integer(), "cols": reader.integer()}
    elif kind == "con_4":
        layer.values = reader.tensor()
        layer.settings = dict(zip(("filters", "rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x"),
                                  (reader.integer() for _ in range(7)), strict=True))
    elif kind == "affine_":
        layer.values = reader.tensor()
    elif kind in ("max_pool_2", "avg_pool_2"):
        layer.settings = dict(zip(("rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x"),
                                  (reader.integer() for _ in range(6)), strict=True))
    elif kind == "fc_2":
        layer.settings = {"outputs": reader.integer(), "inputs": reader.integer()}
        layer.values = reader.tensor()
    return layer


def expected_kinds() -> list[str]:
    """Layer kinds of the face-recognition `anet_type`, input first."""
    kinds = ["input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2"]
    for _, blocks, down in LEVELS:
        for index in range(blocks):
            kinds += ["con_4", "affine_", "relu_", "con_4", "affine_"]
            kinds += ["avg_pool_2", "add_prev_", "relu_"] if down and index == 0 else ["add_prev_", "relu_"]
    return [*kinds, "avg_pool_2", "fc_2"]


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger shape, the smaller tensor zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c))

    return pad(a) + pad(b)


class Block(nn.Module):
    """conv-affine-relu-conv-affine plus the shortcut (2x2/2 average pooling when downsampling), then relu."""

    def __init__(self, channels_in: int, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(_add_padded(y, F.avg_pool2d(x, 2) if self.down else x))


class DlibResNetTorch(nn.Module):
    """The network on (N, 3, 150, 150) float RGB pixel values in [0, 255]; returns dlib's raw 128-D descriptor."""

    def __init__(self, mean: tuple[float, float, float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, stride=2)
        blocks, channels = [], 32
        for filters, count, down in LEVELS:
            for index in range(count):
                blocks.append(Block(channels, filters, down and index == 0))
                channels = filters
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, stride=2)
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


def _fold(conv: nn.Conv2d, con: Layer, affine: Layer) -> None:
    """Load a dlib convolution and the affine layer after it into one PyTorch convolution."""
    weight, bias, padding = conv.weight, conv.bias, conv.padding
    expected = {"filters": weight.shape[0], "rows": weight.shape[2], "cols": weight.shape[3],
                "stride_y": conv.stride[0], "stride_x": conv.stride[1],
                "padding_y": padding[0], "padding_x": padding[1]}
    values = 0 if con.values is None else con.values.size
    if con.settings != expected or bias is None or values != weight.numel() + weight.shape[0]:
        raise FactoryError(f"dlib convolution {con.settings} ({values} values) does not match the expected {expected}")
    if affine.values is None or affine.values.size != 2 * weight.shape[0]:
        raise FactoryError(f"dlib affine layer after convolution {con.settings} has the wrong size")
    gamma, beta = np.split(affine.values, 2)
    kernel = con.values[: weight.numel()].reshape(weight.shape) * gamma[:, None, None, None]
    with torch.no_grad():
        weight.copy_(torch.from_numpy(kernel))
        bias.copy_(torch.from_numpy(con.values[weight.numel() :] * gamma + beta))


def load_dlib_resnet(path: Path) -> DlibResNetTorch:
    """The network with the weights of a dlib face-recognition `.dat` file, in eval mode."""
    layers = read_layers(path)
    kinds = [layer.kind for layer in layers]
    if kinds != expected_kinds():
        raise FactoryError(f"{path}: its layers are not dlib's ResNet v1 face-recognition network "
                           f"({len(kinds)} layers read, {len(expected_kinds())} expected)")
    source = layers[0].settings
    if (source["rows"], source["cols"]) != (150, 150):
        raise FactoryError(f"{path}: input size {source['rows']}x{source['cols']}, expected 150x150")
    model = DlibResNetTorch((float(source["mean_red"]), float(source["mean_green"]), float(source["mean_blue"])))
    convolutions = [model.stem] + [conv for block in model.blocks for conv in (block.conv1, block.conv2)]
    cons = [layer for layer in layers if layer.kind == "con_4"]
    affines = [layer for layer in layers if layer.kind == "affine_"]
    for conv, con, affine in zip(convolutions, cons, affines, strict=True):
        _fold(conv, con, affine)
    pools = [layer.settings for layer in layers if layer.kind in ("max_pool_2", "avg_pool_2")]
    expected_pools = ([{"rows": 3, "cols": 3, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}]
                      + [{"rows": 2, "cols": 2, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}] * 4
                      + [{"rows": 0, "cols": 0, "stride_y": 1, "stride_x": 1, "padding_y": 0, "padding_x": 0}])
    if pools != expected_pools:
        raise FactoryError(f"{path}: pooling layers {pools} differ from dlib's ResNet v1 ({expected_pools})")
    fc = layers[-1]
    if fc.values is None or fc.settings != {"outputs": 128, "inputs": 256} or fc.values.size != 256 * 128:
        raise FactoryError(f"{path}: final layer {fc.settings} differs from dlib's ResNet v1 (256 -> 128)")
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(fc.values.reshape(256, 128).T.copy()))
    return model.eval()


@dataclass
class DlibResNetTorchTeacher:
    """The port as a teacher: crops warped to dlib chips as for `dlib_resnet_v1`, then batched in PyTorch."""

    model: DlibResNetTorch
    digest: str
    device: str = "cpu"
    name: str = NAME
    embedding_size: int = 128
    batch_size: int = 64

    def embed(self, faces: np.ndarray) -> np.ndarray:
        check_faces(faces)
        outputs = []
        with torch.no_grad():
            for start in range(0, len(faces), self.batch_size):
                chips = crops_to_chips(faces[start : start + self.batch_size])
                batch = np.stack(chips).transpose(0, 3, 1, 2).astype(np.float32)
                outputs.append(self.model(torch.from_numpy(batch).to(self.device)).cpu().numpy())
        if not outputs:
            return np.zeros((0, self.embedding_size), np.float32)
        return l2_normalise(np.concatenate(outputs).astype(np.float64)).astype(np.float32)


def load(device: str = "cpu") -> DlibResNetTorchTeacher:
    """The port with the checked dlib model file's weights, on `device`."""
    model = load_dlib_resnet(model_file(RESNET_V1)).to(device)
    return DlibResNetTorchTeacher(model=model, digest=RESNET_V1.sha256, device=device)


register_teacher(replace(teacher_entry(DLIB_NAME), name=NAME, loader=load))
