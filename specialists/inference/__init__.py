"""Inference on a trained run: the routed ensemble, the student, the generalist, ``predict``."""

from .ensemble import SpecialistEnsemble
from .predictor import Predictor, SingleModel, Student

__all__ = ["Predictor", "SingleModel", "SpecialistEnsemble", "Student"]
