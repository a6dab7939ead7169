"""SeesawFaceNets.

Zhang: "SeesawFaceNets: sparse and robust face verification model for mobile platform", arXiv 1908.09124
(2019). The layer settings follow the author's public PyTorch code (github.com/cvtower/seesawfacenet_pytorch,
`src/seesaw_models/`), which names the four variants `seesaw_shuffleFaceNet`, `seesaw_shareFaceNet`,
`DW_seesawFaceNetv1` and `DW_seesawFaceNetv2`; they are registered here as `seesawfacenet_shuffle`,
`seesawfacenet_share`, `seesawfacenet_dw_v1` and `seesawfacenet_dw_v2`.

The network is MobileFaceNet's (stem, three stages of inverted residuals, 1x1 conv to 512, global depthwise
convolution, linear embedding) with every inverted residual replaced by a seesaw block:

    input channels split unevenly (1/4 : 3/4)
      -> one 1x1 expansion per part (to 1/4 and 3/4 of the hidden width), concatenated
      -> channel shuffle of two groups (the "shuffle" and "dw" variants; none in "share")
      -> 3x3 depthwise convolution -> squeeze-and-excitation
      -> hidden channels split 1/4 : 3/4, one linear 1x1 projection per part, concatenated
      -> residual connection

    variant  stem  blocks per stage: channels (hidden width)                  stride-2 block shortcut
    shuffle  64    5: 64 (128),  7: 128 (256),  3: 128 (512 first, then 256)  none
    share    64    as shuffle, without the shuffle; projections split 3/4 : 1/4  none
    dw_v1    96    9: 96 (192), 13: 192 (384),  5: 192 (768 first, then 384)  1x1 conv, stride 2
    dw_v2    96    as dw_v1                                                   2x2 max pool, 1x1 conv

The first block of each stage has stride 2. The paper's abstract gives 1.3M parameters and 146M
multiply-adds for the mobile variants and 4.2M parameters and 526M multiply-adds for the DW variants (see
the note above the registrations for how this build compares). The author's README gives accuracies only as
images and the paper's tables were not available to the tools this module was written with, so no LFW figure
is recorded here.

One deliberate departure from the author's code: the code's `h_swish` computes x * sigmoid(x) (swish) despite
its name; this module uses the piecewise-linear h-swish the paper names (MobileNetV3's `nn.Hardswish`), which the
converters map to one fused op. The squeeze-and-excitation gate is the code's sigmoid. (A hard sigmoid gate, as
in MobileNetV3, was tried first: trained with ArcFace on this project's data, 63-100% of its gate values sat at
exactly 0 or 1, where it passes no gradient, in five of the first stage's six blocks, and the embeddings
collapsed into a narrow cone, mean cosine 0.76 between different faces, LFW 56%. With the sigmoid gate the network
still collapsed at MobileFaceNet's peak learning rate of 0.1; at 0.02 it trains: recipes/seesawfacenet.yaml
and the README.)
The embedding is 128-D (the code defaults to 512) and is returned un-normalised; the factory's deployed graph
normalises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from factory.models.layers import ConvBNAct, init_weights
from factory.models.registry import register_model


def hswish_block(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, linear: bool = False
) -> ConvBNAct:
    """Convolution + batch norm, followed by h-swish unless the block is linear."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups, None if linear else _hardswish)


def _hardswish(_channels: int) -> nn.Module:
    return nn.Hardswish()


class SqueezeExcitation(nn.Module):
    """Channel gate from globally pooled features (reduction 4, PReLU inside, sigmoid gate, as in the author's code).

    The two fully connected layers are 1x1 convolutions on the pooled 1x1 map (the same weights and
    MACs as linear layers, as torchvision's SqueezeExcitation): the gate stays 4-D, which XNNPACK's
    channels-last lowering needs (a 2-D gate reshaped back to 4-D cannot be lowered).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.PReLU(channels // reduction),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=(2, 3), keepdim=True))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave `groups` equal channel groups (ShuffleNet), with a reshape-transpose-reshape."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


# Shortcut of the stride-2 blocks (stride-1 blocks add their input).
Shortcut = Literal["none", "conv", "pool_conv"]


@dataclass(frozen=True)
class SeesawVariant:
    """What distinguishes the four published networks.

    Attributes:
        stem: Channels of the first two convolutions.
        stages: Per stage (output channels, hidden width of the first block, hidden width of the others,
            blocks); the first block has stride 2.
        shuffle: Shuffle the two expanded parts before the depthwise convolution.
        shortcut: Shortcut of the stride-2 blocks: "none", "conv" (1x1, stride 2) or "pool_conv".
    """

    stem: int
    stages: tuple[tuple[int, int, int, int], ...]
    shuffle: bool
    shortcut: Shortcut


MOBILE_STAGES = ((64, 128, 128, 5), (128, 256, 256, 7), (128, 512, 256, 3))
DW_STAGES = ((96, 192, 192, 9), (192, 384, 384, 13), (192, 768, 384, 5))

VARIANTS: dict[str, SeesawVariant] = {
    "shuffle": SeesawVariant(64, MOBILE_STAGES, shuffle=True, shortcut="none"),
    "share": SeesawVariant(64, MOBILE_STAGES, shuffle=False, shortcut="none"),
    "dw_v1": SeesawVariant(96, DW_STAGES, shuffle=True, shortcut="conv"),
    "dw_v2": SeesawVariant(96, DW_STAGES, shuffle=True, shortcut="pool_conv"),
}


class SeesawBlock(nn.Module):
    """Seesaw inverted residual: uneven 1/4 : 3/4 channel split around a depthwise convolution.

    Args:
        in_channels: Input channels (divisible by 4).
        out_channels: Output channels (divisible by 4).
        hidden: Width of the depthwise convolution (divisible by 4, and by 2 when shuffling).
        stride: 1, or 2 for the first block of a stage.
        shuffle: Interleave the two expanded parts (the "share" variant does not; its projections then read
            overlapping halves of the two expansions instead).
        shortcut: For stride-2 blocks: "none", "conv" or "pool_conv"; stride-1 blocks add their input.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, stride: int, shuffle: bool, shortcut: Shortcut
    ) -> None:
        super().__init__()
        self.in_small = in_channels // 4
        self.shuffle = shuffle
        self.expand_small = hswish_block(self.in_small, hidden // 4)
        self.expand_large = hswish_block(in_channels - self.in_small, hidden - hidden // 4)
        self.depthwise = hswish_block(hidden, hidden, 3, stride=stride, groups=hidden)
        self.excite = SqueezeExcitation(hidden)
        # With the shuffle the quarter-width projection reads the first quarter; the share variant reads the
        # first three quarters with the wide projection, so each projection spans both expansions.
        self.hidden_first = hidden // 4 if shuffle else hidden - hidden // 4
        self.project_small = hswish_block(hidden // 4, out_channels // 4, linear=True)
        self.project_large = hswish_block(hidden - hidden // 4, out_channels - out_channels // 4, linear=True)
        self.identity = stride == 1 and in_channels == out_channels
        self.downsample: nn.Module | None = None
        if not self.identity:
            if shortcut == "conv":
                self.downsample = hswish_block(in_channels, out_channels, 1, stride=stride)
            elif shortcut == "pool_conv":
                self.downsample = nn.Sequential(nn.MaxPool2d(2, 2), hswish_block(in_channels, out_channels))
            elif shortcut != "none":
                raise ValueError(f"unknown seesaw shortcut {shortcut!r}; use 'none', 'conv' or 'pool_conv'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small, large = x[:, : self.in_small], x[:, self.in_small :]
        out = torch.cat((self.expand_small(small), self.expand_large(large)), dim=1)
        if self.shuffle:
            out = channel_shuffle(out, 2)
        out = self.excite(self.depthwise(out))
        first, second = out[:, : self.hidden_first], out[:, self.hidden_first :]
        if self.shuffle:
            out = torch.cat((self.project_small(first), self.project_large(second)), dim=1)
        else:
            out = torch.cat((self.project_large(first), self.project_small(second)), dim=1)
        if self.identity:
            return x + out
        if self.downsample is not None:
            return self.downsample(x) + out
        return out


class SeesawFaceNet(nn.Module):
    """SeesawFaceNet backbone producing an (un-normalised) embedding.

    Args:
        variant: One of `VARIANTS` ("shuffle", "share", "dw_v1", "dw_v2").
        embedding_size: Width of the final linear layer (128 here; the author's code uses 512).
        input_size: Square input side; the GDC kernel covers the whole final feature map.
    """

    def __init__(self, variant: str, embedding_size: int = 128, input_size: int = 112) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SeesawFaceNet variant {variant!r}; known: {', '.join(VARIANTS)}")
        if input_size % 16 != 0:
            raise ValueError(f"SeesawFaceNet needs an input size divisible by 16, got {input_size}")
        spec = VARIANTS[variant]
        layers: list[nn.Module] = [
            hswish_block(3, spec.stem, 3, stride=2),
            hswish_block(spec.stem, spec.stem, 3, groups=spec.stem),
        ]
        channels = spec.stem
        for out_channels, first_hidden, hidden, blocks in spec.stages:
            layers.append(SeesawBlock(channels, out_channels, first_hidden, 2, spec.shuffle, spec.shortcut))
            layers += [SeesawBlock(out_channels, out_channels, hidden, 1, spec.shuffle, spec.shortcut)
                       for _ in range(blocks - 1)]
            channels = out_channels
        layers.append(hswish_block(channels, 512))
        self.features = nn.Sequential(*layers)
        # Global depthwise convolution: one 7x7 (at 112 input) linear filter per channel.
        self.gdc = hswish_block(512, 512, input_size // 16, groups=512, linear=True)
        self.embedding = nn.Sequential(nn.Flatten(1), nn.Linear(512, embedding_size, bias=False),
                                       nn.BatchNorm1d(embedding_size))
        self.embedding_size = embedding_size
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.gdc(self.features(x)))


# The abstract's figures, checked at the author's 512-D embedding: MACs 145.8M and 526.5M (within 0.3%);
# parameters 4.247M for DW (1.1% over "4.2M") but 1.370M for the mobile variants, 5.4% over "1.3M" (1.349M
# counting convolution and linear weights without batch norm and PReLU), so their parameter check allows 6%.
# The registered 128-D builds have 1.173M / 145.6M (mobile) and 4.050M / 526.3M (DW).
_PAPER = "arXiv 1908.09124"
_AT_PAPER_EMBEDDING = {"embedding_size": 512}
# Channels-last tensors slow their training on CPU (measured at batch 128 on 2 threads: shuffle 3.9 s -> 5.5 s
# per step), as the channel splits and shuffles then copy; the other architectures train faster with them.
_MOBILE = {"channels_last_training": False, "paper_numbers": {"params_m": 1.3, "macs_m": 146.0},
           "tolerance": {"params_m": 0.06, "macs_m": 0.03}}
_DW = {"channels_last_training": False, "paper_numbers": {"params_m": 4.2, "macs_m": 526.0},
       "tolerance": {"params_m": 0.03, "macs_m": 0.03}}


@register_model("seesawfacenet_shuffle", paper=_PAPER, paper_kwargs=_AT_PAPER_EMBEDDING, **_MOBILE)
def seesawfacenet_shuffle(embedding_size: int = 128, input_size: int = 112) -> SeesawFaceNet:
    """seesaw_shuffleFaceNet: mobile width, channel shuffle, no shortcut on stride-2 blocks."""
    return SeesawFaceNet("shuffle", embedding_size=embedding_size, input_size=input_size)


@register_model("seesawfacenet_share", paper=_PAPER, paper_kwargs=_AT_PAPER_EMBEDDING, **_MOBILE)
def seesawfacenet_share(embedding_size: int = 128, input_size: int = 112) -> SeesawFaceNet:
    """seesaw_shareFaceNet: mobile width, no shuffle, projections spanning both expansions."""
    return SeesawFaceNet("share", embedding_size=embedding_size, input_size=input_size)


@register_model("seesawfacenet_dw_v1", paper=_PAPER, paper_kwargs=_AT_PAPER_EMBEDDING, **_DW)
def seesawfacenet_dw_v1(embedding_size: int = 128, input_size: int = 112) -> SeesawFaceNet:
    """DW_seesawFaceNetv1: wider and deeper, strided 1x1 convolution shortcut on stride-2 blocks."""
    return SeesawFaceNet("dw_v1", embedding_size=embedding_size, input_size=input_size)


@register_model("seesawfacenet_dw_v2", paper=_PAPER, paper_kwargs=_AT_PAPER_EMBEDDING, **_DW)
def seesawfacenet_dw_v2(embedding_size: int = 128, input_size: int = 112) -> SeesawFaceNet:
    """DW_seesawFaceNetv2: as v1, with a max-pool then 1x1 convolution shortcut on stride-2 blocks."""
    return SeesawFaceNet("dw_v2", embedding_size=embedding_size, input_size=input_size)
