"""Shared-trunk specialists: a classifier's ``features`` split at a block boundary into a trunk and a tail.

``specialists.branch=k`` gives each specialist only the last ``k`` blocks of the generalist's
feature extractor (its *tail*) and its own head; everything before (the *trunk*) stays the
generalist's, frozen and shared. At inference the trunk then runs once per batch, and a
specialist costs its tail and head on its routed rows only. ``k = 0`` is head only.

:func:`split` returns ``(trunk, tail)`` with ``tail(trunk(x)) == model.features(x)`` (the
trunk's output ``h`` is a tensor, or a tuple of tensors that :func:`tail_input` unpacks; its
first dimension is always the batch). Both reuse ``model``'s own modules (no copy), so a
trunk built from the generalist *is* the generalist's trunk. Where a model's blocks are:

===================================  ======================================================
``mlp``                              each hidden layer (Linear, BatchNorm, ReLU, Dropout)
``cnn``                              each convolution with its BatchNorm, ReLU and pooling
CIFAR ResNets                        each residual block (resnet18: 8, resnet8: 4)
``textcnn``                          one: the convolutions (the trunk is the embedding)
``bilstm``                           one: the whole LSTM stack
``transformer``                      each encoder layer
``timm:`` / ``torchvision:`` /       the blocks of ``layer1..layerN`` (ResNet families), or of
``python:``                          ``stages`` / ``blocks`` / ``features`` / ``layers``,
                                     when the model's forward is a chain of them (checked on
                                     an example input; a model whose forward is not, a ViT
                                     adding position embeddings say, refuses in one line)
===================================  ======================================================
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import SpecialistsError
from .builtin import _ResNetFeatures
from .classifier import Classifier
from .text import PAD_ID, BiLSTMFeatures, TextCNNFeatures, TransformerFeatures, conv_pool, masked_pool, run_lstm

ALL = "all"  # specialists.branch: the whole network
CONTAINERS = ("stages", "blocks", "features", "layers")  # where external models keep their blocks


def parse_branch(value) -> int | None:
    """``specialists.branch`` -> None (``all``: the whole network) or k >= 0; a ValueError otherwise."""
    if str(value) == ALL:
        return None
    try:
        k = int(str(value))
    except ValueError:
        raise ValueError(f"'{value}' is neither 'all' nor a whole number of blocks") from None
    if k < 0:
        raise ValueError(f"{k} blocks: must be >= 0")
    return k


def tail_input(tail: nn.Module, h):
    """``tail(h)`` for a trunk output that is a tensor or a tuple of tensors."""
    return tail(*h) if isinstance(h, tuple) else tail(h)


def rows_of(h, rows: torch.Tensor):
    """Rows ``rows`` of a trunk output (a tensor, or a tuple of tensors batched on dim 0)."""
    return tuple(t[rows] for t in h) if isinstance(h, tuple) else h[rows]


class _TransformerTrunk(nn.Module):
    """Embeddings and the first encoder layers: (B, L') ids -> ((B, L', d) states, (B, L') mask)."""

    def __init__(self, f: TransformerFeatures, layers: list[nn.Module]):
        super().__init__()
        self.embed, self.pos, self.layers = f.embed, f.pos, nn.ModuleList(layers)

    def forward(self, x):
        if x.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"{x.shape[1]} tokens per row, more than max_length={self.pos.num_embeddings}")
        mask = x != PAD_ID
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        return h, mask


class _TransformerTail(nn.Module):
    """The last encoder layers, the final LayerNorm and the masked pooling: (h, mask) -> (B, d)."""

    def __init__(self, f: TransformerFeatures, layers: list[nn.Module]):
        super().__init__()
        self.layers, self.norm, self.pooling = nn.ModuleList(layers), f.encoder.norm, f.pooling

    def forward(self, h, mask):
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        return masked_pool(self.norm(h), mask, self.pooling)


class _TextCNNTrunk(nn.Module):
    def __init__(self, f: TextCNNFeatures):
        super().__init__()
        self.f = f  # embed_tokens reads the embedding and the kernel widths; only the embedding has weights

    def forward(self, x):
        return self.f.embed_tokens(x)


class _TextCNNTail(nn.Module):
    def __init__(self, f: TextCNNFeatures):
        super().__init__()
        self.convs, self.dropout = f.convs, f.dropout

    def forward(self, e, lengths):
        return conv_pool(self.convs, self.dropout, e, lengths)


class _Embed(nn.Module):
    """Token embeddings and the mask of real tokens: (B, L') ids -> ((B, L', dim), (B, L'))."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, x):
        return self.embed(x), x != PAD_ID


class _LSTMTail(nn.Module):
    def __init__(self, f: BiLSTMFeatures):
        super().__init__()
        self.lstm, self.dropout, self.pooling = f.lstm, f.dropout, f.pooling

    def forward(self, e, mask):
        return self.dropout(masked_pool(run_lstm(self.lstm, e, mask), mask, self.pooling))


def _sequential_split(seq: nn.Sequential, starts: list[int], k: int):
    cut = starts[len(starts) - k]
    return nn.Sequential(*seq[:cut]), nn.Sequential(*seq[cut:])


def _resnet_blocks(net) -> list[nn.Module]:
    return [b for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(net, name) for b in getattr(net, name)]


def _builtin(features: nn.Module, k: int):
    """(trunk, tail, blocks) for the project's own models, or None for another module."""
    if isinstance(features, nn.Sequential):  # linear, mlp, cnn: a block starts at each Linear / Conv2d
        starts = [i for i, m in enumerate(features) if isinstance(m, (nn.Linear, nn.Conv2d))]
        _check(k, len(starts))
        return _sequential_split(features, starts, k)
    if isinstance(features, _ResNetFeatures):
        net = features.net
        blocks = _resnet_blocks(net)
        _check(k, len(blocks))
        cut = len(blocks) - k
        return (nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *blocks[:cut]),
                nn.Sequential(*blocks[cut:], net.avgpool, nn.Flatten(1)))
    if isinstance(features, TransformerFeatures):
        layers = list(features.encoder.layers)
        _check(k, len(layers))
        cut = len(layers) - k
        return _TransformerTrunk(features, layers[:cut]), _TransformerTail(features, layers[cut:])
    if isinstance(features, (TextCNNFeatures, BiLSTMFeatures)):  # one block: the convolutions, the LSTM stack
        _check(k, 1)
        if isinstance(features, TextCNNFeatures):
            return _TextCNNTrunk(features), _TextCNNTail(features)
        return _Embed(features.embed), _LSTMTail(features)
    return None


class TooFewBlocks(SpecialistsError):
    """``specialists.branch`` above the model's block count (``blocks``)."""

    def __init__(self, k: int, blocks: int):
        super().__init__(f"specialists.branch={k}: the model has only {blocks} blocks (0..{blocks} are possible)")
        self.blocks = blocks


def _check(k: int, n: int) -> None:
    if k > n:
        raise TooFewBlocks(k, n)


def _external(features: nn.Module, k: int, name: str):
    """A library's or user's module whose forward runs a stem, a container of blocks, then a neck:
    the trunk is the stem and the first blocks, the tail a shallow copy of the module with the
    stem and those blocks replaced by identities (so its own forward runs the rest)."""
    children = list(features.named_children())
    names = [n for n, _ in children]
    if "layer1" in names:  # ResNet families: layer1..layerN of residual blocks
        layers = [n for n in names if n.startswith("layer") and n[5:].isdigit()]
        first = names.index(layers[0])
        blocks = [(lay, i, b) for lay in layers for i, b in enumerate(getattr(features, lay))]
    else:
        container = next((c for c in CONTAINERS if isinstance(getattr(features, c, None), nn.Sequential)), None)
        if container is None:
            raise SpecialistsError(f"model {name} cannot be split into a shared trunk and a tail: it has no "
                                   f"layer1..layerN nor a {' / '.join(CONTAINERS)} sequence of blocks; use "
                                   "specialists.branch=all")
        first = names.index(container)
        blocks = [(container, i, b) for i, b in enumerate(getattr(features, container))]
    _check(k, len(blocks))
    cut = len(blocks) - k
    stem = [m for _, m in children[:first]]
    trunk = nn.Sequential(*stem, *[b for _, _, b in blocks[:cut]])
    tail = copy.copy(features)
    tail._modules = dict(features._modules)
    for n in names[:first]:
        tail._modules[n] = nn.Identity()
    for lay in dict.fromkeys(lay for lay, _, _ in blocks):
        kept = [b for l2, _, b in blocks[cut:] if l2 == lay]
        tail._modules[lay] = nn.Sequential(*kept) if kept else nn.Identity()
    return trunk, tail


def split(model: Classifier, k: int, example: torch.Tensor | None = None, name: str = "the model"):
    """``model.features`` -> ``(trunk, tail)`` at ``k`` blocks from the end (``k = 0``: the tail is
    an identity, the trunk all of ``features``). ``example``: an input batch on which the split is
    checked to compute exactly what ``features`` does (eval mode); a model whose forward is not a
    chain of its blocks, or ``k`` above its block count, is one :class:`SpecialistsError` line."""
    features = model.features
    if k == 0:
        parts = (features, nn.Identity())
    else:
        parts = _builtin(features, k) or _external(features, k, name)
    trunk, tail = parts
    if example is not None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = features(example).float()
                got = tail_input(tail, trunk(example)).float()
        finally:
            model.train(was)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise SpecialistsError(f"model {name} cannot be split at specialists.branch={k}: its forward is not a "
                                   "chain of its blocks (the trunk and tail do not give its features); use "
                                   "specialists.branch=all")
    return trunk, tail


# blocks of the registered models, known from the config alone (the config edge checks branch against it)
_BUILTIN_BLOCKS = {"linear": 0, "cnn": 5, "resnet8": 4, "resnet10": 4, "resnet18": 8, "resnet34": 16,
                   "textcnn": 1, "bilstm": 1}
_DEPTH_BLOCKS = {"mlp": 2, "transformer": 2}  # model.depth blocks, this many by default


def builtin_block_count(model_cfg) -> int | None:
    """The block count of a registered model from its config (None for timm:, torchvision:,
    python: models, which are counted once built)."""
    name = str(model_cfg.name)
    if name in _DEPTH_BLOCKS:
        return model_cfg.depth if model_cfg.depth is not None else _DEPTH_BLOCKS[name]
    return _BUILTIN_BLOCKS.get(name)


def block_count(model: Classifier) -> int:
    """How many blocks ``model``'s features have (the largest ``specialists.branch``)."""
    try:
        split(model, 1 << 30)
    except TooFewBlocks as exc:
        return exc.blocks
    raise AssertionError("unreachable: no model has that many blocks")


class TailClassifier(Classifier):
    """``head(tail(h))`` for a trunk output ``h`` (a tensor, or a tuple given as several arguments):
    what a shared-trunk specialist owns and saves (``features`` is its tail)."""

    def forward(self, *h):
        return self.head(tail_input(self.features, h if len(h) > 1 else h[0]))


def tail_classifier(model: Classifier, tail: nn.Module) -> TailClassifier:
    """The part of ``model`` after the trunk, sharing ``model``'s modules."""
    return TailClassifier(tail, model.feature_dim, model.num_classes, head=model.head)


class Branched(nn.Module):
    """``part(trunk(x))``: a shared-trunk model on raw inputs. The trunk is not a submodule: it
    is not trained, saved, or switched to training mode with it, and runs without gradients
    (the generalist's, frozen)."""

    def __init__(self, trunk: nn.Module, part: nn.Module):
        super().__init__()
        self.part = part
        self.__dict__["trunk"] = trunk.eval()  # hidden from nn.Module: no parameters, no state_dict

    def forward(self, x):
        with torch.no_grad():
            h = self.trunk(x)
        return tail_input(self.part, h)

    @property
    def head(self) -> nn.Linear:
        return self.part.head

    @property
    def num_classes(self) -> int:
        return self.part.num_classes


__all__ = ["ALL", "Branched", "TailClassifier", "block_count", "builtin_block_count", "parse_branch", "rows_of", "split", "tail_classifier", "tail_input"]
