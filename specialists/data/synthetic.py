"""``synthetic``: a generated hierarchy with planted groups of confusable classes.

``num_super`` superclasses x ``classes_per_super`` classes. Each superclass has a smooth random
template; each class adds a smaller class-specific part; each example adds per-example noise
(a smooth field plus pixel noise) and a small random shift. Classes inside a superclass share
most of their pattern, so a generalist confuses them in exactly the planted groups, which the
coarse labels expose for scoring the clustering. Deterministic in ``data.split_seed``; 20
classes x 300 examples of 3x16x16 take well under a second.

``variant=vector`` gives the same structure as flat float32 vectors (dimension 64).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .registry import register
from .types import RawData

VARIANTS = ("image", "vector")  # data.variant
CLASS_SCALE = 0.5  # size of the class-specific part relative to the superclass template
NOISE_SCALE = 0.9  # per-example smooth noise (x difficulty)
PIXEL_NOISE = 0.3


def _smooth(g: torch.Generator, n: int, channels: int, size: int, base: int = 4) -> torch.Tensor:
    """Low-frequency random fields (n, channels, size, size), unit variance per field."""
    z = torch.randn(n, channels, base, base, generator=g)
    z = F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)
    return z / z.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)


def _generate(cfg, n_per_class: int, g_proto: torch.Generator, g_ex: torch.Generator):
    ns, nc = cfg.num_super, cfg.classes_per_super
    k = ns * nc
    if cfg.variant == "vector":
        d = 64
        supers = torch.randn(ns, d, generator=g_proto) * 1.0
        deltas = torch.randn(k, d, generator=g_proto) * CLASS_SCALE
        protos = supers.repeat_interleave(nc, 0) + deltas
        y = torch.arange(k).repeat_interleave(n_per_class)
        x = protos[y] + torch.randn(len(y), d, generator=g_ex) * NOISE_SCALE * cfg.difficulty * 0.6
        return x.numpy().astype(np.float32), y.numpy()
    s = cfg.image_size
    supers = _smooth(g_proto, ns, 3, s)
    deltas = _smooth(g_proto, k, 3, s, base=6) * CLASS_SCALE
    protos = supers.repeat_interleave(nc, 0) + deltas  # (K, 3, s, s)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = protos[y] + NOISE_SCALE * cfg.difficulty * _smooth(g_ex, len(y), 3, s, base=5)
    x = x + PIXEL_NOISE * torch.randn(x.shape, generator=g_ex)
    # a random shift of up to 2 pixels, so crop augmentation has something to undo
    shifts = torch.randint(-2, 3, (len(y), 2), generator=g_ex)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if m.any():
                x[m] = torch.roll(x[m], shifts=(dy, dx), dims=(2, 3))
    img = (128 + 42 * x).round().clamp(0, 255).to(torch.uint8)
    return img.numpy(), y.numpy()


@register("synthetic", default_augment="crop", description="generated hierarchy with planted confusable groups")
def load_synthetic(cfg) -> RawData:
    g_proto = torch.Generator().manual_seed(1000 + cfg.split_seed)
    x_tr, y_tr = _generate(cfg, cfg.train_per_class, g_proto, torch.Generator().manual_seed(2000 + cfg.split_seed))
    g_proto = torch.Generator().manual_seed(1000 + cfg.split_seed)  # same prototypes for test
    x_te, y_te = _generate(cfg, cfg.test_per_class, g_proto, torch.Generator().manual_seed(3000 + cfg.split_seed))
    nc = cfg.classes_per_super
    names = [f"s{c // nc}_c{c % nc}" for c in range(cfg.num_super * nc)]
    return RawData(
        x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        class_names=names,
        y_train_coarse=y_tr // nc, y_test_coarse=y_te // nc,
        coarse_names=[f"super{i}" for i in range(cfg.num_super)],
        num_classes=cfg.num_super * nc,
    )
