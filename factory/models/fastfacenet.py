"""Fast-FaceNet: FaceNet with a MobileNetV1 backbone.

Xu, Du, Guo, Chang, Zhao: "Lightweight FaceNet Based on MobileNet", International Journal of Intelligence
Science 11(1), 1-16 (2021), doi:10.4236/ijis.2021.111001. The paper replaces FaceNet's GoogLeNet with
MobileNetV1 (Howard et al., arXiv 1704.04861) at width multipliers 0.25, 0.5, 0.75 and 1.0, and trains it with
FaceNet's triplet loss (see `factory.losses`). The backbone is MobileNetV1's standard layer table:

    input     operator                       c (x width)  s
    112x112   conv3x3                        32           2
    56x56     depthwise separable            64           1
    56x56     depthwise separable            128          2
    28x28     depthwise separable            128          1
    28x28     depthwise separable            256          2
    14x14     depthwise separable            256          1
    14x14     depthwise separable            512          2
    7x7       depthwise separable x5         512          1
    7x7       depthwise separable            1024         2
    4x4       depthwise separable            1024         1
    4x4       global average pool, linear    128          -

Batch norm and ReLU6 follow every convolution (as in MobileNetV1); the embedding is FaceNet's bottleneck, a
linear layer without bias followed by batch norm. It is returned un-normalised: the factory's deployed graph
L2-normalises it, and so does the triplet loss.

Where the figures come from: the text of the IJIS paper was not available to the tools this module was written
with, so its table is not quoted. `paper_numbers` are MobileNetV1's own published figures (Table 6 of arXiv
1704.04861: 4.2M/569M, 2.6M/325M, 1.3M/149M, 0.5M/41M parameters/multiply-adds at widths 1.0/0.75/0.5/0.25),
checked against this backbone built as that classifier (224x224 input, 1000 outputs); "0.5M" is rounded to
one digit, hence the wider parameter tolerance at width 0.25. The factory's build (112x112, 128-D) is computed
by `factory.profile`, not quoted:

    width   params   MACs at 112x112
    0.25    0.25M    10.6M
    0.5     0.88M    38.8M
    0.75    1.92M    84.6M
    1.0     3.34M    148.0M
"""

from __future__ import annotations

import torch
from torch import nn

from factory.models.layers import ConvBNAct, init_weights
from factory.models.registry import register_model

# (output channels at width 1.0, stride) of the 13 depthwise separable layers — MobileNetV1 Table 1.
SEPARABLE_SETTINGS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)

# MobileNet never thins a layer below 8 channels (`min_depth` in the reference TensorFlow code).
MIN_CHANNELS = 8


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at width multiplier `width`, as MobileNet rounds them."""
    return max(int(channels * width), MIN_CHANNELS)


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> ConvBNAct:
    """Convolution + batch norm + ReLU6."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups, _relu6)


def _relu6(_channels: int) -> nn.Module:
    return nn.ReLU6()


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise convolution then 1x1 pointwise convolution, each with batch norm and ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            conv_bn_relu6(in_channels, in_channels, 3, stride=stride, groups=in_channels),
            conv_bn_relu6(in_channels, out_channels, 1),
        )


class FastFaceNet(nn.Module):
    """MobileNetV1 backbone with a FaceNet embedding layer.

    Args:
        width: MobileNet width multiplier (0.25, 0.5, 0.75 or 1.0 in the paper).
        embedding_size: Width of the embedding (128 in FaceNet).
        input_size: Square input side; any multiple of 16 works since the pooling is global.
    """

    def __init__(self, width: float = 1.0, embedding_size: int = 128, input_size: int = 112) -> None:
        super().__init__()
        if not 0.0 < width <= 1.0:
            raise ValueError(f"Fast-FaceNet width multiplier must lie in (0, 1], got {width}")
        if input_size % 16 != 0:
            raise ValueError(f"Fast-FaceNet needs an input size divisible by 16, got {input_size}")
        channels = scaled(32, width)
        layers: list[nn.Module] = [conv_bn_relu6(3, channels, 3, stride=2)]
        for out_channels, stride in SEPARABLE_SETTINGS:
            layers.append(DepthwiseSeparable(channels, scaled(out_channels, width), stride))
            channels = scaled(out_channels, width)
        self.features = nn.Sequential(*layers)
        # FaceNet's bottleneck layer: linear, no bias, batch norm (the normaliser takes the bias's place).
        self.embedding = nn.Sequential(nn.Linear(channels, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))
        self.width = width
        self.embedding_size = embedding_size
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # keepdim + flatten: XNNPACK delegates only the 4-D global mean.
        return self.embedding(self.features(x).mean(dim=(2, 3), keepdim=True).flatten(1))


_PAPER = "doi:10.4236/ijis.2021.111001"
# MobileNetV1's figures hold for the 224x224 ImageNet classifier; the embedding layer stands in for its
# 1000-way classifier (weights only, plus 2,000 batch-norm parameters instead of 1,000 biases).
_AS_MOBILENET_CLASSIFIER = {"input_size": 224, "embedding_size": 1000}


@register_model("fastfacenet_0_25", paper=_PAPER, paper_kwargs=_AS_MOBILENET_CLASSIFIER,
                 paper_numbers={"params_m": 0.5, "macs_m": 41.0}, tolerance={"params_m": 0.1, "macs_m": 0.03})
def fastfacenet_0_25(embedding_size: int = 128, input_size: int = 112) -> FastFaceNet:
    """Fast-FaceNet at width 0.25."""
    return FastFaceNet(0.25, embedding_size=embedding_size, input_size=input_size)


@register_model("fastfacenet_0_5", paper=_PAPER, paper_kwargs=_AS_MOBILENET_CLASSIFIER,
                paper_numbers={"params_m": 1.3, "macs_m": 149.0}, tolerance={"params_m": 0.03, "macs_m": 0.03})
def fastfacenet_0_5(embedding_size: int = 128, input_size: int = 112) -> FastFaceNet:
    """Fast-FaceNet at width 0.5."""
    return FastFaceNet(0.5, embedding_size=embedding_size, input_size=input_size)


@register_model("fastfacenet_0_75", paper=_PAPER, paper_kwargs=_AS_MOBILENET_CLASSIFIER,
                paper_numbers={"params_m": 2.6, "macs_m": 325.0}, tolerance={"params_m": 0.03, "macs_m": 0.03})
def fastfacenet_0_75(embedding_size: int = 128, input_size: int = 112) -> FastFaceNet:
    """Fast-FaceNet at width 0.75."""
    return FastFaceNet(0.75, embedding_size=embedding_size, input_size=input_size)


@register_model("fastfacenet_1_0", paper=_PAPER, paper_kwargs=_AS_MOBILENET_CLASSIFIER,
                paper_numbers={"params_m": 4.2, "macs_m": 569.0}, tolerance={"params_m": 0.03, "macs_m": 0.03})
def fastfacenet_1_0(embedding_size: int = 128, input_size: int = 112) -> FastFaceNet:
    """Fast-FaceNet at width 1.0."""
    return FastFaceNet(1.0, embedding_size=embedding_size, input_size=input_size)
