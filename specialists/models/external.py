"""Models from timm, from torchvision and from the user, split into ``features`` + ``head``.

- ``timm:<arch>``: ``timm.create_model(arch, pretrained=False, num_classes=C, in_chans=c)``;
  its classifier (``get_classifier()``) becomes the head and ``reset_classifier(0)`` leaves the
  body returning pooled features (``forward_head(..., pre_logits=True)``).
- ``torchvision:<arch>``: ``torchvision.models.get_model(arch, weights=None, num_classes=C)``;
  its last ``nn.Linear`` (``fc``, ``classifier[-1]``, ``heads.head``) becomes the head.
- ``python:package.module:function``: ``function(num_classes, input_shape)`` returns an
  ``nn.Module``: its ``features`` and ``head`` (an ``nn.Linear``) when it has them, else its
  last ``nn.Linear`` becomes the head and the rest, with an identity in its place, the body.

Nothing is downloaded: weights come from files (:mod:`specialists.models.weights`).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..errors import ModelError, SpecialistsError, one_line
from .classifier import Classifier


def resolve(prefix: str, rest: str) -> Callable[[int, tuple], nn.Module]:
    """The builder ``(num_classes, input_shape) -> nn.Module`` a prefixed name stands for, or
    one :class:`SpecialistsError` line saying why there is none."""
    if prefix == "timm":
        import timm

        if not timm.is_model(rest):
            raise SpecialistsError(f"timm has no model '{rest}' (timm.list_models() lists them)")
        return lambda c, shape: timm.create_model(rest, pretrained=False, num_classes=c, in_chans=shape[0])
    if prefix == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models(module=torchvision.models):
            raise SpecialistsError(f"torchvision has no classification model '{rest}' "
                                   "(torchvision.models.list_models() lists them)")
        return lambda c, shape: torchvision.models.get_model(rest, weights=None, num_classes=c)
    module, _, fn = rest.partition(":")
    if not module or not fn:
        raise SpecialistsError(f"'python:{rest}' must be python:package.module:function")
    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # not found, a syntax error, or its own code raising as it is imported
        raise SpecialistsError(f"python:{rest}: cannot import {module} ({type(exc).__name__}: {one_line(exc)})") from None
    factory = getattr(imported, fn, None)
    if factory is None:
        raise SpecialistsError(f"python:{rest}: {module} has no '{fn}'")
    if not callable(factory):
        raise SpecialistsError(f"python:{rest}: {module}.{fn} is not callable")
    return factory


def build(prefix: str, rest: str, num_classes: int, input_shape: tuple) -> Classifier:
    name = f"{prefix}:{rest}"
    if prefix in ("timm", "torchvision") and len(input_shape) != 3:
        raise SpecialistsError(f"model {name} needs image inputs (C, H, W), not vectors")
    if prefix == "torchvision" and input_shape[0] != 3:
        raise SpecialistsError(f"model {name}: torchvision's models take 3-channel images, these have "
                               f"{input_shape[0]}")
    factory = resolve(prefix, rest)
    try:
        module = factory(num_classes, input_shape)
    except Exception as exc:  # the factory's own error: the user's code, or a library refusing these inputs
        raise ModelError(f"model '{name}' raised {type(exc).__name__} when built for {num_classes} classes and "
                         f"inputs {tuple(input_shape)} ({one_line(exc)})") from None
    if not isinstance(module, nn.Module):
        raise SpecialistsError(f"model {name} returned a {type(module).__name__}, not an nn.Module")
    if prefix == "timm":
        head = module.get_classifier()
        head_name = module.pretrained_cfg.get("classifier") if module.pretrained_cfg else None
        if not isinstance(head, nn.Linear) or not head_name:
            raise SpecialistsError(f"model {name}: its classifier is a {type(head).__name__}, not an nn.Linear")
        module.reset_classifier(0)  # the body now returns pooled features
        return Classifier(module, head.in_features, num_classes, head=head, head_name=head_name)
    if isinstance(getattr(module, "head", None), nn.Linear) and isinstance(getattr(module, "features", None), nn.Module):
        return Classifier(module.features, module.head.in_features, num_classes, head=module.head)
    return split_at_last_linear(module, num_classes, name)


def split_at_last_linear(module: nn.Module, num_classes: int, name: str) -> Classifier:
    """The module's last ``nn.Linear`` as the head, the module with an identity in its place as
    the body (which then returns the head's input: the pre-logits features)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SpecialistsError(f"model {name}: found no nn.Linear to be its head; give the module 'features' and "
                               "'head' (an nn.Linear) attributes, or end it in an nn.Linear")
    head_name, head = linears[-1]
    if head.out_features != num_classes:
        raise SpecialistsError(f"model {name}: its last nn.Linear ({head_name}) has {head.out_features} outputs, not "
                               f"the data set's {num_classes} classes")
    parent_name, _, attr = head_name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, nn.Identity())
    return Classifier(module, head.in_features, num_classes, head=head, head_name=head_name)


def declared_preprocessing(model_cfg) -> dict | None:
    """What a pretrained model declares of its input (``{"input_size": (C, H, W), "mean",
    "std"}``): timm's pretrained config, when ``model.pretrained`` gives its weights."""
    name = str(model_cfg.name)
    if not name.startswith("timm:") or not getattr(model_cfg, "pretrained", None):
        return None
    import timm

    cfg = timm.get_pretrained_cfg(name.split(":", 1)[1])
    if cfg is None:
        return None
    return {"input_size": tuple(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std)}
