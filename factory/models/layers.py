"""Building blocks shared by the seed systems' networks."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Makes the activation of a block from its channel count (PReLU learns one slope per channel).
Activation = Callable[[int], nn.Module]


class ConvBNAct(nn.Sequential):
    """Convolution (no bias) + batch norm, then `activation` unless it is None (a linear block).

    3x3 and 1x1 kernels keep the spatial size (at stride 1); larger kernels, such as a global
    depthwise convolution over the whole final map, are unpadded.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: Activation | None = None,
    ) -> None:
        padding = kernel_size // 2 if kernel_size in (1, 3) else 0
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(out_channels))
        super().__init__(*layers)


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation of convolutions; batch norms start as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
