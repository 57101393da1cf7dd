"""Models: the registry and its one factory, the built-in architectures, the soft decision
tree student, adapters for timm, torchvision and user factories, and weights from the user's
files."""

from ..core.tokens import PAD_ID
from . import (
    builtin,  # noqa: F401  (registers the built-in models)
    text,  # noqa: F401  (registers the text models)
)
from .classifier import Classifier
from .external import declared_preprocessing
from .registry import (
    MODELS,
    PREFIXES,
    TEXT_MODELS,
    build_model,
    check_model,
    check_model_name,
    count_parameters,
    register,
)
from .soft_tree import SoftDecisionTree, is_soft_tree
from .weights import load_classifier, load_pretrained, load_student, read_state_dict

__all__ = ["MODELS", "PAD_ID", "PREFIXES", "TEXT_MODELS", "Classifier", "build_model", "check_model", "check_model_name",
           "count_parameters", "declared_preprocessing", "is_soft_tree", "load_classifier", "load_pretrained", "load_student", "read_state_dict", "register",
           "SoftDecisionTree"]
