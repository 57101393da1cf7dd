"""The model registry: every model on every input kind it supports, heads, the CIFAR stem."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from specialists.errors import ModelError
from specialists.models import MODELS, TEXT_MODELS, Classifier, build_model
from specialists.rundir.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
VECTOR_SHAPES = [(64,)]
CLASSES = 7
# narrow widths keep the deep ResNets fast on a 2-core CPU; the architecture is the same
SMALL_WIDTH = {"resnet10": 16, "resnet18": 16, "resnet34": 8}


def model_cfg(name: str, width=None):
    return OmegaConf.structured(ModelConfig(name=name, width=width))


def supports_vectors(name: str) -> bool:
    return name in ("linear", "mlp")


def forward_backward(model: nn.Module, shape: tuple, batch: int = 3):
    model.train()
    x = torch.randn(batch, *shape)
    out = model(x)
    assert out.shape == (batch, CLASSES)
    out.square().mean().backward()  # a loss that reaches every output
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0
    return out


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"soft_tree"} - TEXT_MODELS))  # a student: test_trees.py; text: test_text_models.py
def test_every_model_runs_forward_and_backward_on_every_input_kind(name):
    torch.manual_seed(0)
    shapes = IMAGE_SHAPES + (VECTOR_SHAPES if supports_vectors(name) else [])
    for shape in shapes:
        model = build_model(model_cfg(name, SMALL_WIDTH.get(name)), CLASSES, shape)
        assert isinstance(model, Classifier)
        assert isinstance(model.head, nn.Linear)
        assert model.head.out_features == CLASSES == model.num_classes
        assert model.head.in_features == model.feature_dim
        forward_backward(model, shape)
        with torch.no_grad():
            model.eval()
            feats = model.features(torch.randn(2, *shape))
            assert feats.shape == (2, model.feature_dim)
            # logits are exactly head(features): a specialist may swap the head and nothing else
            assert torch.allclose(model(torch.zeros(2, *shape)), model.head(model.features(torch.zeros(2, *shape))))
    if not supports_vectors(name):
        with pytest.raises(ModelError, match=f"model '{name}' needs image inputs"):  # one line, no traceback
            build_model(model_cfg(name), CLASSES, (64,))


def test_default_width_resnet18_on_cifar_shapes():
    model = build_model(model_cfg("resnet18"), 100, (3, 32, 32))
    assert model.feature_dim == 512 and model.head.in_features == 512
    assert model.features.net.conv1.out_channels == 64
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()


def test_mlp_flattens_images_and_respects_width_and_depth():
    cfg = OmegaConf.structured(ModelConfig(name="mlp", width=32, depth=3))
    model = build_model(cfg, CLASSES, (1, 8, 8))
    linears = [m for m in model.features.modules() if isinstance(m, nn.Linear)]
    assert [l.in_features for l in linears] == [64, 32, 32] and model.feature_dim == 32
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, CLASSES)


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if n.startswith("resnet")])
def test_resnet_has_a_cifar_stem(name):
    """3x3 stride-1 stem conv, no max-pool: a 32x32 input is still 32x32 after the stem."""
    model = build_model(model_cfg(name, SMALL_WIDTH.get(name)), CLASSES, (3, 32, 32))
    net = model.features.net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    assert stem.shape[-2:] == (32, 32)
    assert net.layer1(stem).shape[-2:] == (32, 32)  # the first stage keeps full resolution
    # one-channel images get a one-channel stem
    gray = build_model(model_cfg(name, SMALL_WIDTH.get(name)), CLASSES, (1, 28, 28))
    assert gray.features.net.conv1.in_channels == 1


def test_cnn_keeps_a_spatial_map_on_tiny_images():
    model = build_model(model_cfg("cnn", 8), CLASSES, (1, 8, 8))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1  # 8 -> 4, then no further pooling below 8 pixels
    big = build_model(model_cfg("cnn", 8), CLASSES, (3, 32, 32))
    assert len([m for m in big.modules() if isinstance(m, nn.MaxPool2d)]) == 3


def test_unknown_model_name_raises():
    with pytest.raises(ModelError, match="nosuchnet"):
        build_model(model_cfg("nosuchnet"), CLASSES, (3, 32, 32))


def test_same_seed_same_init():
    torch.manual_seed(5)
    a = build_model(model_cfg("cnn", 8), CLASSES, (3, 16, 16))
    torch.manual_seed(5)
    b = build_model(model_cfg("cnn", 8), CLASSES, (3, 16, 16))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_a_model_that_cannot_read_the_data_is_one_cli_line(tmp_path, capsys):
    """``model.name=cnn`` on vector data, through the command line: one ``error:`` line naming
    the model and the cause, exit status 2, no traceback, before any run directory exists."""
    from pathlib import Path

    from conftest import error_line_within

    from specialists.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    run_dir = tmp_path / "run"
    argv = ["train-generalist", str(config), f"run_dir={run_dir}", "device=cpu", "data.name=synthetic",
            "data.variant=vector", "model.name=cnn"]
    capsys.readouterr()
    assert error_line_within(lambda: main(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "'cnn' needs image inputs" in err[0] and "mlp" in err[0]
    assert not run_dir.exists()


def test_impossible_model_settings_are_model_errors():
    """The factories' own checks are :class:`ModelError` (one line at the command line), not a
    bare ``ValueError``, whoever calls them."""
    from specialists.models.soft_tree import SoftDecisionTree

    with pytest.raises(ModelError, match="depth >= 1, got 0"):
        SoftDecisionTree((4,), 3, depth=0)
