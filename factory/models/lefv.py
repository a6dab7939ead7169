"""LEFV recogniser: compact convolution blocks with multi-scale feature fusion.

The face recogniser of the LEFV system (ICVIP 2019). What the paper's description fixes, and this module
follows: four compact blocks of 32, 64, 128 and 256 filters; multi-scale feature fusion, in which each block's
output is max-pooled to a common size, the four are concatenated (480 channels) and fused by a 960-filter
convolution; dropout; then the embedding; training with softmax cross-entropy over the training identities
(`train.loss: softmax`).

The paper's text and layer table were not available to the tools this module was written with, so the
following are choices made here, not quoted, and nothing in `paper_numbers` is claimed:

  * a compact block is a stride-2 3x3 convolution then a 3x3 convolution, each with batch norm and ReLU, so
    the blocks see 56, 28, 14 and 7 pixels of a 112x112 face;
  * the common size is the last block's (7x7 at 112 input), and the fusion convolution is 1x1;
  * the fused map is globally averaged, dropped out with rate 0.5, and mapped to a 128-D embedding by a linear
    layer with batch norm, as in the other seed systems.

Computed by `factory.profile` at 112x112 and 128-D: 1.76M parameters, 184M multiply-adds.
"""

from __future__ import annotations

import torch
from torch import nn

from factory.models.layers import ConvBNAct, init_weights
from factory.models.registry import register_model

BLOCK_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)
FUSED_CHANNELS = 960
DROPOUT = 0.5


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> ConvBNAct:
    """3x3 convolution + batch norm + ReLU."""
    return ConvBNAct(in_channels, out_channels, 3, stride, activation=_relu)


def _relu(_channels: int) -> nn.Module:
    return nn.ReLU()


class CompactBlock(nn.Sequential):
    """Stride-2 3x3 convolution then a 3x3 convolution: halves the resolution, sets the width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(conv_bn_relu(in_channels, out_channels, stride=2), conv_bn_relu(out_channels, out_channels))


class LEFV(nn.Module):
    """LEFV recogniser producing an (un-normalised) embedding.

    Args:
        embedding_size: Width of the embedding.
        input_size: Square input side, a multiple of 16 (the blocks halve it four times).
    """

    def __init__(self, embedding_size: int = 128, input_size: int = 112) -> None:
        super().__init__()
        if input_size % 16 != 0:
            raise ValueError(f"LEFV needs an input size divisible by 16, got {input_size}")
        blocks, channels = [], 3
        for out_channels in BLOCK_CHANNELS:
            blocks.append(CompactBlock(channels, out_channels))
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        # Block i's map is 2**(3 - i) times the last block's side; a max pool of that size and stride brings
        # every scale to the common size without learnable weights.
        last = len(BLOCK_CHANNELS) - 1
        self.pools = nn.ModuleList(
            nn.MaxPool2d(2 ** (last - index)) if index < last else nn.Identity() for index in range(len(blocks))
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(sum(BLOCK_CHANNELS), FUSED_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(FUSED_CHANNELS),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(DROPOUT)
        self.embedding = nn.Sequential(nn.Linear(FUSED_CHANNELS, embedding_size, bias=False),
                                       nn.BatchNorm1d(embedding_size))
        self.embedding_size = embedding_size
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = []
        for block, pool in zip(self.blocks, self.pools, strict=True):
            x = block(x)
            scales.append(pool(x))
        fused = self.fuse(torch.cat(scales, dim=1))
        # keepdim + flatten: XNNPACK delegates only the 4-D global mean.
        pooled = fused.mean(dim=(2, 3), keepdim=True).flatten(1)
        # Dropout only while training: left in the exported graph as a no-op, it breaks litert-torch's int8
        # conversion (the .tflite's embeddings fell to cosine 0.67 with PyTorch's; without it, 0.9996).
        if self.training:
            pooled = self.dropout(pooled)
        return self.embedding(pooled)


@register_model("lefv", paper="ICVIP 2019 (LEFV)")
def lefv(embedding_size: int = 128, input_size: int = 112) -> LEFV:
    """LEFV recogniser as described in the module docstring."""
    return LEFV(embedding_size=embedding_size, input_size=input_size)
