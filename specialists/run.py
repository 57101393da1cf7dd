"""A run directory and what every stage needs from it: config, device, data, manifest, models.

Layout (DESIGN.md section 5)::

    RUN_DIR/config.yaml  manifest.json  data.json
    RUN_DIR/generalist/   model.safetensors, state.pt, metrics.json, curves.png
    RUN_DIR/subsets/      probs.npy, covariance.npy, subsets.json, metrics.json, covariance.png
    RUN_DIR/specialists/NNN/  model.safetensors, state.pt, metrics.json
    RUN_DIR/evaluation/   evaluation.json, evaluation.md, plots
    RUN_DIR/ablation/     ablation.json, ablation.md, ablation.png
    RUN_DIR/student/      model.safetensors, metrics.json, student.md

Paths inside the run directory are relative, so it can be moved or copied elsewhere.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch

from .config import Config, config_from_yaml_text, to_yaml
from .data import Dataset, build_dataset
from .errors import SpecialistsError
from .io import load_weights, read_json, resolve_device, save_weights, write_json, write_text
from .manifest import Manifest
from .models import Classifier, build_model

log = logging.getLogger("specialists")


class Run:
    """One run directory opened with one config."""

    def __init__(self, cfg: Config, device: str | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.device = resolve_device(device or cfg.device)
        self.manifest = Manifest(self.dir)

    @classmethod
    def open(cls, run_dir, device: str | None = None, **overrides) -> "Run":
        """Reopen a run from its saved ``config.yaml`` (for inference and reports)."""
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise SpecialistsError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = config_from_yaml_text(path.read_text())
        cfg.run_dir = str(run_dir)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cls(cfg, device=device or "auto")

    def save_config(self) -> None:
        write_text(self.dir / "config.yaml", to_yaml(self.cfg))

    @cached_property
    def data(self) -> Dataset:
        ds = build_dataset(self.cfg.data)
        info = ds.preprocessing()
        path = self.dir / "data.json"
        if not path.exists() or read_json(path) != info:
            write_json(path, info)
        return ds

    # --- paths -------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def specialist_dir(self, i: int) -> Path:
        return self.dir / "specialists" / f"{i:03d}"

    # --- models ------------------------------------------------------------------------
    def data_info(self) -> dict:
        """Input shape, class names, normalization: from data.json, without loading data."""
        path = self.dir / "data.json"
        return read_json(path) if path.exists() else self.data.preprocessing()

    def new_model(self, num_classes: int | None = None, model_cfg=None) -> Classifier:
        info = self.data_info()
        return build_model(model_cfg or self.cfg.model, num_classes or info["num_classes"], tuple(info["input_shape"]))

    def load_generalist(self) -> Classifier:
        path = self.dir / "generalist" / "model.safetensors"
        if not path.exists():
            raise SpecialistsError(f"no trained generalist in {self.dir}: run `specialists train-generalist CONFIG` first")
        model = load_weights(path, self.new_model())
        return model.to(self.device).eval()

    def save_model(self, path: Path, net: torch.nn.Module, **metadata) -> None:
        save_weights(path, net, metadata)
