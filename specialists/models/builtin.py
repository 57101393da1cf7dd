"""The built-in models: ``linear`` and ``mlp`` (flatten any input; ``depth`` hidden layers, 2
by default), ``cnn`` (small, CPU-friendly), and CIFAR-style ResNets built from torchvision's ``ResNet`` with a 3x3 stride-1
stem and no max-pool: ``resnet8`` (one basic block per stage, half width), ``resnet10``,
``resnet18``, ``resnet34``."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .classifier import Classifier
from .registry import register


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@register("linear")
def linear(cfg, num_classes: int, input_shape: tuple) -> Classifier:
    """A linear classifier on the flattened input (no hidden layer, no BatchNorm)."""
    return Classifier(nn.Flatten(), _numel(input_shape), num_classes)


@register("mlp")
def mlp(cfg, num_classes: int, input_shape: tuple) -> Classifier:
    width = cfg.width or 256
    layers: list[nn.Module] = [nn.Flatten()]
    d = _numel(input_shape)
    for _ in range(cfg.depth if cfg.depth is not None else 2):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        d = width
    return Classifier(nn.Sequential(*layers), d, num_classes)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("cnn")
def cnn(cfg, num_classes: int, input_shape: tuple) -> Classifier:
    """Three conv stages (w, 2w, 4w channels), pooling only while the map is >= 4 pixels, so
    8x8 digits, 28x28 characters and 32x32 colour images all work."""
    if len(input_shape) != 3:
        raise ModelError(f"model 'cnn' needs image inputs (C, H, W), but these are vectors of shape {tuple(input_shape)}; "
                         "use 'mlp' for vectors")
    c, h, _ = input_shape
    w = cfg.width or 32
    layers: list[nn.Module] = []
    cin, size = c, h
    for i, cout in enumerate((w, 2 * w, 4 * w)):
        layers += _conv_bn(cin, cout)
        if i > 0:
            layers += _conv_bn(cout, cout)
        if size >= 8:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    return Classifier(nn.Sequential(*layers), cin, num_classes)


class _ResNetFeatures(nn.Module):
    """torchvision's ResNet body with a CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, layers: list[int], in_channels: int, width: int):
        # imported here: torchvision takes seconds to import, and only ResNets need it
        from torchvision.models.resnet import BasicBlock, ResNet

        super().__init__()
        net = ResNet(BasicBlock, layers, num_classes=1)
        if width != 64:  # rebuild the stages at another width (torchvision fixes 64..512)
            net.inplanes = width
            net.layer1 = net._make_layer(BasicBlock, width, layers[0])
            net.layer2 = net._make_layer(BasicBlock, width * 2, layers[1], stride=2)
            net.layer3 = net._make_layer(BasicBlock, width * 4, layers[2], stride=2)
            net.layer4 = net._make_layer(BasicBlock, width * 8, layers[3], stride=2)
        net.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = width * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet(name: str, layers: list[int], default_width: int):
    def build(cfg, num_classes: int, input_shape: tuple) -> Classifier:
        if len(input_shape) != 3:
            raise ModelError(f"model '{name}' needs image inputs (C, H, W), but these are vectors of shape "
                             f"{tuple(input_shape)}; use 'mlp' for vectors")
        width = cfg.width or default_width
        body = _ResNetFeatures(layers, input_shape[0], width)
        return Classifier(body, body.out_dim, num_classes)

    return build


for _name, _layers, _width in (("resnet8", [1, 1, 1, 1], 32), ("resnet10", [1, 1, 1, 1], 64),
                               ("resnet18", [2, 2, 2, 2], 64), ("resnet34", [3, 4, 6, 3], 64)):
    register(_name)(_resnet(_name, _layers, _width))
