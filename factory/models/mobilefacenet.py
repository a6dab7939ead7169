"""MobileFaceNet.

Chen, Liu, Gao, Han: "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
Mobile Devices", arXiv 1804.07573 (2018). Table 1 of the paper, at 112x112 input:

    input     operator              t   c    n  s
    112x112   conv3x3               -   64   1  2
    56x56     depthwise conv3x3     -   64   1  1
    56x56     bottleneck            2   64   5  2
    28x28     bottleneck            4   128  1  2
    14x14     bottleneck            2   128  6  1
    14x14     bottleneck            4   128  1  2
    7x7       bottleneck            2   128  2  1
    7x7       conv1x1               -   512  1  1
    7x7       linear GDConv7x7      -   512  1  1
    1x1       linear conv1x1        -   128  1  1

PReLU everywhere a non-linearity is used; batch normalisation after every convolution. The paper
reports 0.99M parameters and 221M multiply-adds.

`mobilefacenet_relu` is the same network with ReLU in place of every PReLU: int8 runtimes fuse ReLU into
the convolution before it, while PReLU runs as separate float ops between dequantise and quantise
(docs/quantisation.md), so its int8 artifacts run at about half the float latency.
"""

from __future__ import annotations

import torch
from torch import nn

from factory.models.layers import Activation, ConvBNAct, init_weights
from factory.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s) — Table 1 of the paper.
BOTTLENECK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def _relu(channels: int) -> nn.Module:
    return nn.ReLU()


ACTIVATIONS: dict[str, Activation] = {"prelu": nn.PReLU, "relu": _relu}


def conv_block(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, linear: bool = False,
    activation: str = "prelu",
) -> ConvBNAct:
    """Convolution + batch norm, followed by `activation` (PReLU in the paper) unless the block is linear."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups,
                     None if linear else ACTIVATIONS[activation])


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU, as used by MobileFaceNet."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expansion: int, activation: str = "prelu"
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            conv_block(in_channels, hidden, 1, activation=activation),
            conv_block(hidden, hidden, 3, stride=stride, groups=hidden, activation=activation),
            conv_block(hidden, out_channels, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone producing an (un-normalised) embedding.

    Args:
        embedding_size: Width of the final linear 1x1 convolution (128 in the paper).
        input_size: Square input side; the GDC kernel covers the whole final feature map.
        activation: The non-linearity of every non-linear block, "prelu" (the paper) or "relu".
    """

    def __init__(self, embedding_size: int = 128, input_size: int = 112, activation: str = "prelu") -> None:
        super().__init__()
        if input_size % 16 != 0:
            raise ValueError(f"MobileFaceNet needs an input size divisible by 16, got {input_size}")
        feature_side = input_size // 16
        layers: list[nn.Module] = [
            conv_block(3, 64, 3, stride=2, activation=activation),
            conv_block(64, 64, 3, groups=64, activation=activation),
        ]
        channels = 64
        for expansion, out_channels, repeats, first_stride in BOTTLENECK_SETTINGS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(Bottleneck(channels, out_channels, stride, expansion, activation))
                channels = out_channels
        layers.append(conv_block(channels, 512, 1, activation=activation))
        self.features = nn.Sequential(*layers)
        # Global depthwise convolution: one 7x7 (at 112 input) linear filter per channel.
        self.gdc = conv_block(512, 512, feature_side, groups=512, linear=True)
        self.embedding = conv_block(512, embedding_size, 1, linear=True)
        self.embedding_size = embedding_size
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.gdc(x)
        x = self.embedding(x)
        return torch.flatten(x, 1)


@register_model(
    "mobilefacenet",
    paper="arXiv 1804.07573",
    paper_numbers={"params_m": 0.99, "macs_m": 221.0, "lfw_accuracy": 0.9955},
)
def mobilefacenet(embedding_size: int = 128, input_size: int = 112) -> MobileFaceNet:
    """MobileFaceNet exactly as in Table 1 of the paper."""
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size)


@register_model(
    "mobilefacenet_relu",
    paper="arXiv 1804.07573, ReLU in place of PReLU",
    paper_numbers={"params_m": 0.99, "macs_m": 221.0},
)
def mobilefacenet_relu(embedding_size: int = 128, input_size: int = 112) -> MobileFaceNet:
    """MobileFaceNet with ReLU for PReLU: the activation int8 kernels fuse into the convolutions."""
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size, activation="relu")
