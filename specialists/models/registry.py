"""The model registry and its one factory, ``build_model(model_cfg, num_classes, input_shape)``.

Every model is a :class:`Classifier`: ``features`` (input -> (B, F) embedding) followed by
``head`` (an ``nn.Linear`` F -> classes). Specialists replace ``head`` with one of
``|S| + 1`` outputs; nothing else in the code needs to know the architecture.

``model.name`` is a registered name (``MODELS``: the built-in models) or one of:

- ``timm:<architecture>``: any timm model (built without downloading anything);
- ``torchvision:<architecture>``: any torchvision classification builder;
- ``python:package.module:function``: a user's factory, ``function(num_classes, input_shape)``
  returning an ``nn.Module``.

Each is split into ``features`` + ``head`` (see :mod:`specialists.models.external`).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from ..errors import ModelError, SpecialistsError, one_line
from . import external
from .classifier import Classifier

MODELS: Dict[str, Callable] = {}
TEXT_MODELS: set = set()  # the registered names that read token ids (see specialists.models.text)
PREFIXES = ("timm", "torchvision", "python")


def register(name: str, text: bool = False):
    """Decorator adding a factory to ``MODELS``: ``fn(model_cfg, num_classes, input_shape)``, or
    with ``text=True`` ``fn(model_cfg, num_classes, input_shape, vocab_size)`` for a model of
    token ids (``input_shape`` = (max_length,))."""

    def wrap(fn):
        MODELS[name] = fn
        if text:
            TEXT_MODELS.add(name)
        return fn

    return wrap


def build_model(model_cfg, num_classes: int, input_shape: tuple, vocab_size: int | None = None) -> Classifier:
    """The one factory. ``input_shape``: (C, H, W) for images, (D,) for vectors, or (L,) for
    token ids of text (then ``vocab_size`` is the tokenizer's and the model must be a text model)."""
    name = model_cfg.name
    prefix = name.split(":", 1)[0] if ":" in name else None
    text = vocab_size is not None
    if text and name not in TEXT_MODELS:
        raise SpecialistsError(f"model '{name}' does not read text: use one of {', '.join(sorted(TEXT_MODELS))}")
    if prefix in PREFIXES:
        return external.build(prefix, name.split(":", 1)[1], num_classes, tuple(input_shape))
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))}, or timm:, torchvision:, python:)")
    if name in TEXT_MODELS:
        if not text:
            raise SpecialistsError(f"model '{name}' reads text (token ids): the data set must be text "
                                   "(data.name=text or synthetic_text)")
        return MODELS[name](model_cfg, num_classes, tuple(input_shape), int(vocab_size))
    return MODELS[name](model_cfg, num_classes, tuple(input_shape))


def check_model(model_cfg, num_classes: int, input_shape: tuple, vocab_size: int | None = None,
                key: str = "model.name") -> None:
    """Build the model once, on the CPU, and run it in eval mode on a dummy batch of two inputs of
    ``input_shape`` (zeros; token ids 1 for text): a model that cannot be built (a factory that
    raises, a built-in that needs images) or whose layers do not fit the data's inputs is one
    :class:`ModelError` line naming the config ``key``, the model and the cause, before any
    work. The global RNG is left as it was (building draws initial weights)."""
    name = model_cfg.name
    text = vocab_size is not None
    what = "token ids" if text else "images" if len(input_shape) == 3 else "vectors"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model = build_model(model_cfg, num_classes, input_shape, vocab_size)
            why = None
        except SpecialistsError as exc:
            why = str(exc)
        except Exception as exc:  # a registered factory's own check (a soft tree's depth, say)
            why = f"model '{name}' cannot be built ({one_line(exc)})"
        if why is None:
            x = torch.ones(2, *input_shape, dtype=torch.int64) if text else torch.zeros(2, *input_shape)
            try:
                out = model.eval()(x)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    why = f"model '{name}' returns {got} for 2 {what}, not (2, {num_classes}) class scores"
            except Exception as exc:
                why = f"model '{name}' does not fit the data's {what} of shape {tuple(input_shape)} ({one_line(exc)})"
    if why:
        raise ModelError(f"config key '{key}': {why}")


def check_model_name(name: str) -> str | None:
    """Why ``name`` names no model (None when it does): for the config's one-line error."""
    if ":" not in name:
        return None if name in MODELS else (f"'{name}' is not one of {', '.join(sorted(MODELS))} (or timm:ARCH, "
                                            "torchvision:ARCH, python:module:function)")
    prefix, rest = name.split(":", 1)
    if prefix not in PREFIXES:
        return f"'{name}': the prefix must be one of {', '.join(p + ':' for p in PREFIXES)}"
    try:
        external.resolve(prefix, rest)
    except SpecialistsError as exc:
        return str(exc)
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
