"""The deployed graph: what every artifact computes, and what the PyTorch reference computes.

Apps feed raw pixel values and get a unit-length embedding back, so they need neither
normalisation nor quantisation maths: (pixel - mean) / std runs inside the model, and the output is
L2-normalised (a dot product of two embeddings is their cosine similarity). Both ends are float
ops, which also keeps float32 I/O on int8 artifacts: a quantised graph's converters otherwise fold
the first quantise and last dequantise into int8 inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Embedder(nn.Module):
    """Preprocessing + backbone + L2 normalisation, taking NCHW float pixels in [0, 255].

    Args:
        backbone: Maps normalised NCHW images to raw embeddings.
        mean: Per-channel mean subtracted from pixel values.
        std: Per-channel divisor applied after the mean.
        embedding_size: Width of the backbone's output.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], embedding_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Sum of squares as a linear layer with a ones row: every runtime delegates a linear layer,
        # while a reduction such as aten.sum is left off XNNPACK.
        self.register_buffer("ones", torch.ones(1, embedding_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embedding = self.backbone((pixels - self.mean) * self.inv_std)
        squared_norm = F.linear(embedding * embedding, self.ones)
        return embedding * torch.rsqrt(torch.clamp(squared_norm, min=1e-6))
