"""The one model interface, :class:`Classifier`: ``features`` (input -> (B, F) embedding)
followed by ``head`` (an ``nn.Linear`` F -> classes). Every model the registry builds
(:mod:`specialists.models.registry`), adapts (:mod:`specialists.models.external`) or loads
(:mod:`specialists.models.weights`) is one; this module imports no other model module."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(features(x))``. ``x``: (B, C, H, W) or (B, D) float; returns logits (B, classes).

    ``head_name``: for a model from a library, the name its own state dict gives the head
    (``fc``, ``classifier.1``, ...), so a checkpoint written by that library loads as it is.
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, head: nn.Linear | None = None,
                 head_name: str | None = None):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head = head if head is not None else nn.Linear(feature_dim, num_classes)
        self.head_name = head_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_classes(self) -> int:
        return self.head.out_features
