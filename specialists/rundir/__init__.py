"""The run directory: typed config, :class:`Run` (the layout), the manifest, atomic I/O."""

from .config import Config, config_from_yaml_text, config_values, load_config, to_dict, to_yaml
from .manifest import Manifest
from .run import ModelFiles, Run

__all__ = ["Config", "Manifest", "ModelFiles", "Run", "config_from_yaml_text", "config_values", "load_config",
           "to_dict", "to_yaml"]
