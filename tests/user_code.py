"""A user's own model factory and data set, as ``python:user_code:...`` names them (tests only)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tiny_net(num_classes: int, input_shape: tuple) -> nn.Module:
    """A plain nn.Sequential ending in its classifier: the split takes its last nn.Linear."""
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, num_classes))


def headless(num_classes: int, input_shape: tuple) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def raises(num_classes: int, input_shape: tuple) -> nn.Module:
    raise RuntimeError("no GPU here")


def wrong_input(num_classes: int, input_shape: tuple) -> nn.Module:
    """A first layer for 100 features, whatever the data's are."""
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 16), nn.ReLU(), nn.Linear(16, num_classes))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.targets = [i % 3 for i in range(n)]
        self.x = [torch.from_numpy(rng.integers(0, 256, (3, 10, 10), dtype=np.uint8)) + 60 * t
                  for t in self.targets]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def three_classes(data_cfg) -> dict:
    return {"train": _Images(60, 0), "test": _Images(30, 1), "class_names": ["a", "b", "c"]}
