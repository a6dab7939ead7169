"""LEFV light face detector: boxes and five landmarks from one fully convolutional pass.

The detection stage of the LEFV system (ICVIP 2019). What the paper's description fixes, and this module
follows: depthwise separable convolutions, four successive down-sampling stages, a context module of dilated
convolutions, LeakyReLU, and outputs of face boxes with five landmarks.

The paper's layer table was not available to the tools this module was written with; these are choices
made here:

  * stage 1 is a full 3x3 stride-2 convolution (a depthwise filter over 3 colour channels learns little),
    stages 2-4 are stride-2 depthwise separable convolutions, each stage followed by stride-1 ones, so the
    output grid has stride 16 (12x12 cells for the 192x192 input);
  * the context module has three depthwise separable branches with dilation 1, 2 and 3 over the last map,
    concatenated (as SSH and RetinaFace do), so a cell sees the face around it;
  * the head is anchor-free (one prediction per cell, as CenterNet): channel 0 is the face score logit,
    1-2 the box centre's offset from the cell centre, 3-4 the log box width and height, 5-14 the five
    landmarks' offsets from the cell centre. Offsets are in units of `REGRESSION_SCALE` pixels and widths
    and heights in log units of it. `factory.lefv.detection.decode` turns the map into boxes.

Leaky ReLU slope 0.1 everywhere. Input: normalised NCHW, any side divisible by 16.
"""

from __future__ import annotations

import torch
from torch import nn

from factory.models.layers import init_weights

STRIDE = 16
REGRESSION_SCALE = 64.0
OUTPUT_CHANNELS = 15  # score, dx, dy, log w, log h, 5 x (x, y)
STAGE_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
CONTEXT_DILATIONS: tuple[int, ...] = (1, 2, 3)
LEAKY_SLOPE = 0.1


def _leaky() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE)


def conv_bn_leaky(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Full 3x3 convolution + batch norm + leaky ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), _leaky())


def separable(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (optionally strided or dilated) then pointwise 1x1, each with batch norm + leaky ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, dilation, dilation=dilation, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), _leaky(),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), _leaky(),
    )


class ContextModule(nn.Module):
    """Dilated depthwise separable branches over the same map, concatenated back to its width."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = CONTEXT_DILATIONS) -> None:
        super().__init__()
        widths = [channels // 2] + [channels // (2 * (len(dilations) - 1))] * (len(dilations) - 1)
        widths[-1] += channels - sum(widths)
        self.branches = nn.ModuleList(separable(channels, width, dilation=d) for width, d in zip(widths, dilations,
                                                                                                    strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class LEFVDetector(nn.Module):
    """The detector network; returns the raw (N, 15, H/16, W/16) prediction map (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = STAGE_CHANNELS
        self.stages = nn.Sequential(
            nn.Sequential(conv_bn_leaky(3, c1, 2), separable(c1, c1)),
            nn.Sequential(separable(c1, c2, 2), separable(c2, c2)),
            nn.Sequential(separable(c2, c3, 2), separable(c3, c3)),
            nn.Sequential(separable(c3, c4, 2), separable(c4, c4), separable(c4, c4)),
        )
        self.context = ContextModule(c4)
        self.head = nn.Conv2d(c4, OUTPUT_CHANNELS, 1)
        init_weights(self)
        # Start from a low face prior (1%) so the many background cells do not swamp the first steps.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[0] = -4.6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.context(self.stages(x)))
