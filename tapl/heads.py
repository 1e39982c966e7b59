"""Task heads: modules that map one pooled feature per sample to a task type's outputs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mlp(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    """A two-layer perceptron with GELU and dropout."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_features)
    )


class ImageDecoder(nn.Module):
    """Decodes a feature into a ``(channels, size, size)`` image with pixels in [0, 1].

    Args:
        in_features: Width of the pooled feature.
        hidden: Hidden width of the decoder's perceptron.
        channels: Colour channels of the image.
        image_size: Side of the (square) image in pixels.
        dropout: Dropout inside the perceptron.
    """

    def __init__(self, in_features: int, hidden: int, channels: int, image_size: int, dropout: float) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.net = mlp(in_features, hidden, math.prod(self.shape), dropout)

    def forward(self, feature: Tensor) -> Tensor:
        return torch.sigmoid(self.net(feature)).view(-1, *self.shape)


class ParallelTextDecoder(nn.Module):
    """Decodes a feature into logits over the vocabulary for ``length`` token positions at once.

    A non-autoregressive decoder: each position is the projected feature plus a learned position embedding,
    refined by a residual perceptron; the output projection is tied to the text encoder's frozen input
    embeddings, so the head trains only ``O(hidden^2)`` parameters whatever the vocabulary size. Positions
    after the target's end are trained to predict nothing (they are ignored by the loss).

    Args:
        in_features: Width of the pooled feature.
        length: Number of token positions decoded.
        embeddings: The text encoder's input embeddings (frozen, shared; not part of this head's component).
        dropout: Dropout inside the perceptron.
    """

    def __init__(self, in_features: int, length: int, embeddings: nn.Embedding, dropout: float) -> None:
        super().__init__()
        width = embeddings.embedding_dim
        self.project = nn.Linear(in_features, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.refine = nn.Sequential(nn.LayerNorm(width), mlp(width, width, width, dropout))
        self.norm = nn.LayerNorm(width)
        # A tuple keeps the shared embedding out of this module's parameters and state.
        self._embeddings = (embeddings,)

    def forward(self, feature: Tensor) -> Tensor:
        hidden = self.project(feature).unsqueeze(1) + self.positions
        hidden = self.norm(hidden + self.refine(hidden))
        weight = self._embeddings[0].weight
        return hidden @ weight.to(hidden.dtype).T
