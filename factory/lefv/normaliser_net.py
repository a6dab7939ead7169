"""LEFV face-normalisation generator and its discriminator.

The normalisation stage of the LEFV system (ICVIP 2019): an encoder-decoder generator maps an aligned face
(any pose, expression, lighting) to a normalised, frontal-looking one before the recogniser embeds it. It is
trained with adversarial, identity-preserving, pixel and symmetry losses (the paper's Eq. 5-9; see
`factory.lefv.normalisation`). What the paper fixes, and this module follows: the encoder is a frozen
MobileFaceNet (here the project's own, `pipeline.normaliser.encoder` of `recipes/lefv.yaml`).

Choices made here (the paper's layer table was not available to the tools this module was written with):

  * the decoder mirrors the encoder's four scales (7 -> 14 -> 28 -> 56 -> 112) and, as a U-Net, concatenates
    the frozen encoder's maps at 14, 28 and 56 pixels, so detail that the 7x7 code cannot carry survives;
  * each up-sampling step is a 2x2 stride-2 transposed convolution (one op in every mobile runtime) followed
    by a depthwise-separable 3x3 convolution with batch norm and ReLU, keeping the decoder light (about 40M
    multiply-adds beside the encoder's 221M); the output is tanh, in the recogniser's normalised pixel range;
  * the discriminator is a PatchGAN of four stride-2 convolutions with leaky ReLU (training only).
"""

from __future__ import annotations

import torch
from torch import nn

from factory.models.mobilefacenet import MobileFaceNet

# Where the decoder taps the encoder: MobileFaceNet `features` indices whose outputs are the 56x56x64,
# 28x28x64, 14x14x128 and 7x7x512 maps (stem depthwise conv, last 64-channel bottleneck, last 14x14 bottleneck,
# final 1x1 convolution).
ENCODER_TAPS: tuple[int, ...] = (1, 6, 13, 17)
ENCODER_CHANNELS: tuple[int, ...] = (64, 64, 128, 512)
DECODER_CHANNELS: tuple[int, ...] = (128, 96, 64, 32, 16)
# Normalised pixels span (0 - 127.5) / 128 .. (255 - 127.5) / 128; tanh is scaled to that range.
PIXEL_RANGE = 127.5 / 128.0


def _separable(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 depthwise then 1x1 pointwise convolution, each with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False), nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class UpBlock(nn.Module):
    """x2 up-sampling by a transposed convolution, optional skip concatenation, then a separable convolution."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.conv = _separable(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class Normaliser(nn.Module):
    """Generator: frozen MobileFaceNet encoder + U-Net decoder. A normalised NCHW 112x112 face in, one out.

    Input and output use the recogniser's normalisation, (pixel - 127.5) / 128, so the output can be fed to
    a recogniser directly; `factory.lefv.normalisation.DeployedNormaliser` takes and returns pixels.
    """

    def __init__(self, encoder: MobileFaceNet | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else MobileFaceNet()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        c56, c28, c14, c7 = ENCODER_CHANNELS
        d0, d1, d2, d3, d4 = DECODER_CHANNELS
        self.bottleneck = nn.Sequential(nn.Conv2d(c7, d0, 1, bias=False), nn.BatchNorm2d(d0), nn.ReLU())
        self.up14 = UpBlock(d0, c14, d1)
        self.up28 = UpBlock(d1, c28, d2)
        self.up56 = UpBlock(d2, c56, d3)
        self.up112 = UpBlock(d3, 0, d4)
        self.to_pixels = nn.Conv2d(d4, 3, 3, 1, 1)

    def train(self, mode: bool = True) -> Normaliser:
        """Train the decoder; the frozen encoder always stays in eval mode (its batch-norm statistics fixed)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (everything but the frozen encoder)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.encoder.features):
            x = layer(x)
            if index in ENCODER_TAPS:
                taps.append(x)
            if index == ENCODER_TAPS[-1]:
                break
        return taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e56, e28, e14, e7 = self.encode(x)
        y = self.bottleneck(e7)
        y = self.up14(y, e14)
        y = self.up28(y, e28)
        y = self.up56(y, e56)
        y = self.up112(y)
        return torch.tanh(self.to_pixels(y)) * PIXEL_RANGE


class PatchDiscriminator(nn.Module):
    """Real/normalised score per image patch (a 7x7 grid of overlapping patches) of a normalised 112x112 face."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for index, out_channels in enumerate((width, width * 2, width * 4, width * 8)):
            layers.append(nn.Conv2d(channels, out_channels, 4, 2, 1, bias=index == 0))
            if index:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.LeakyReLU(0.2))
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
