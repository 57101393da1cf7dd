"""Typed configuration: omegaconf structured configs, YAML files and ``key=value`` overrides.

``load_config(path, overrides)`` merges, in order: the dataclass defaults, the YAML file (which
may name a ``base:`` YAML of its own, resolved relative to it), then the command-line
overrides. Every entry point calls it, so the whole config (all sections, used or not) is
validated before any work starts: unknown keys, wrong types and impossible values stop with
one :class:`ConfigError` line that names the key.

Each section's dataclass declares the values each of its settings takes beside its fields
(``_constraints``, :mod:`specialists.rundir.constraints`); one checker walks them all, then
:func:`_cross_rules` checks the rules between settings. Checks that touch this machine (files
exist, the user's modules import, timm and torchvision names resolve) are
:func:`check_environment`'s: ``load_config`` runs them once, in the process that starts the
work; a Ray worker, another torchrun rank or a reopened run (:func:`config_from_yaml_text`)
checks only the config itself. Adding a section is one dataclass (fields and constraints) and
one field of :class:`Config`.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..core.combine import ROUTINGS, SOLVERS
from ..core.covariance import NORMALIZATIONS
from ..core.heads import DUSTBIN_CORRECTIONS, PHASE_UNITS, PHASES
from ..core.kmeans import METHODS
from ..core.losses import LOSS_KINDS
from ..core.optim import OPTIMIZERS, SCHEDULES
from ..core.scoring import ABLATION_ORDERS
from ..core.subsets import MODES
from ..core.trees import TREE_LOSSES
from ..data import AUGMENTATIONS, DATASETS, HELD_IN_SPLITS, STORAGES, TOKENIZERS
from ..data.synthetic import VARIANTS
from ..data.user import python_entry
from ..device import DEVICES
from ..errors import ConfigError, one_line
from ..models import MODELS, PREFIXES, TEXT_MODELS, check_model_name
from ..models.branch import builtin_block_count, parse_branch
from .constraints import Each, File, Interval, NonEmpty, Options, Parsed, Prefix, check_constraints, sections
from .track import BACKENDS as TRACK_BACKENDS
from .track import WANDB_MODES
from .track import check_environment as check_trackers

# The config choices implemented above this layer: the student stage's teachers, the executors
# of independent jobs (engine/executors.py).
TEACHERS = ("ensemble", "generalist", "probs", "api")
# distill.temperature's bound: Hinton et al. use 1 to 20; far above, soft targets are uniform and the
# T^2-scaled loss overflows float32 (T = 1e30 gave NaN)
MAX_TEMPERATURE = 1e3
TREE = "soft_tree"  # the student model trained with its own loss (specialists/models/soft_tree.py)
EXECUTORS = ("local", "ray")
# A soft-tree student's optimizer settings, each unless the user sets it (the student section's
# defaults are a network's): its leaves see gradients scaled by path probabilities of about
# 2^-depth, which AdamW follows and SGD at a network's learning rate barely moves. Depth 6 on
# hard labels, test top-1 over 3 seeds: digits, 60 epochs, 95.8% against SGD lr 0.05's 76.0%
# (AdamW lr 0.003: 95.1%, 0.03: 94.4%); synthetic images (quickstart), 5 epochs, 27.4% against
# 16.4% (lr 0.003: 35.4%, 0.03: 28.4%).
TREE_OPTIMIZER = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0}


def _importable_data(name: str) -> Optional[str]:
    """Why ``data.name=python:module:function`` names no data set here (None when it does)."""
    try:
        python_entry(name)
    except Exception as exc:  # SpecialistsError: cannot import it; or the module's own error
        return one_line(exc)
    return None


# Constraints several sections share (see the ``_constraints`` of each section below)
# seeds are 32-bit unsigned: numpy's legacy range (faiss gets them reduced to its C int); torch,
# numpy and faiss each refuse another range, some only after earlier stages finished
SEED = Interval(int, 0, 2**32 - 1, note="a 32-bit seed")
WHOLE_1 = Interval(int, 1)  # a count of at least one
WHOLE_0 = Interval(int, 0)
SHARE = Interval(float, 0, 1)  # a share or weight in [0, 1]
MODEL_NAME = [Options(MODELS), Prefix(tuple(f"{p}:" for p in PREFIXES), "timm:ARCH, torchvision:ARCH or "
                                      "python:module:function", resolve=check_model_name)]
POOLINGS = ("mean", "max")


@dataclass
class DataConfig:
    name: str = "synthetic"  # a key of specialists.data.DATASETS
    path: Optional[str] = None  # file or folder for npz / imagefolder / torchvision data
    download: bool = False  # torchvision data sets only, and only when asked
    val_fraction: float = 0.1  # share of each class's training examples held out (seeded)
    split_seed: int = 0
    augment: str = "auto"  # auto | none | crop | flip | crop_flip
    crop_padding: int = 4  # pixels of padding for random crops
    max_train: Optional[int] = None  # keep at most this many training examples (quick runs)
    remap_labels: bool = False  # labels without class names: renumber the distinct ones 0..K-1
    # synthetic hierarchy
    num_super: int = 5
    classes_per_super: int = 4
    train_per_class: int = 200
    test_per_class: int = 100
    image_size: int = 16  # synthetic images are 3 x image_size x image_size
    variant: str = "image"  # image | vector (synthetic)
    difficulty: float = 1.0  # >1 makes classes inside a superclass harder to tell apart
    # torchvision / imagefolder specifics
    emnist_split: str = "balanced"
    resize: Optional[int] = None  # imagefolder, stream: resize images to resize x resize
    storage: str = "auto"  # auto | memory | stream (decoded in memory, or read lazily by DataLoader workers)
    workers: int = 4  # stream: DataLoader worker processes
    memory_budget_gb: float = 4.0  # auto: memory when the decoded splits fit in this, else stream
    # text (data.name=text | synthetic_text)
    text_field: str = "text"  # text: the column / JSON field of the text
    label_field: str = "label"  # text: of the label (a class name or an integer id)
    coarse_field: Optional[str] = None  # text: of an optional coarse label (scores the subsets)
    tokenizer: str = "bpe"  # bpe | wordpiece (trained on the training split) | a tokenizer.json path
    vocab_size: int = 8000  # a trained tokenizer's vocabulary
    max_length: int = 128  # tokens kept per text (longer ones are cut)

    _constraints: ClassVar[dict] = {
        "name": [Options(DATASETS), Prefix(("python:",), "python:MODULE:FUNCTION", resolve=_importable_data)],
        "path": [None, str], "download": [bool], "val_fraction": [Interval(float, 0, 1, "neither")],
        "split_seed": [SEED], "augment": [Options(("auto", *AUGMENTATIONS))], "crop_padding": [WHOLE_0],
        "max_train": [None, WHOLE_1], "remap_labels": [bool], "num_super": [WHOLE_1],
        "classes_per_super": [WHOLE_1], "train_per_class": [Interval(int, 2)], "test_per_class": [WHOLE_1],
        "image_size": [Interval(int, 4)], "variant": [Options(VARIANTS)],
        "difficulty": [Interval(float, 0, 100, "right")], "emnist_split": [str], "resize": [None, Interval(int, 4)],
        "storage": [Options(STORAGES)], "workers": [WHOLE_0], "memory_budget_gb": [Interval(float, 0, None, "neither")],
        "text_field": [str], "label_field": [str], "coarse_field": [None, str],
        "tokenizer": [Options(TOKENIZERS), File("a tokenizer.json file")],
        "vocab_size": [Interval(int, 64)],  # bpe: >= 258 (_cross_rules)
        "max_length": [Interval(int, 1, 65536)],
    }


@dataclass
class ModelConfig:
    name: str = "cnn"  # a key of specialists.models.MODELS, or timm:ARCH, torchvision:ARCH, python:module:function
    width: Optional[int] = None  # base channels (cnn 32, resnet 64, resnet8 32) or hidden units (mlp 256); None = the model's default
    depth: Optional[int] = None  # hidden layers (mlp, default 2); levels of decisions (soft_tree student, default 8)
    dropout: float = 0.0
    pooling: Optional[str] = None  # text models: mean | max over the unpadded tokens (bilstm, transformer; default mean)
    pretrained: Optional[str] = None  # a local weights file (safetensors, or a .pt/.pth/.bin state dict)

    _constraints: ClassVar[dict] = {
        "name": MODEL_NAME, "width": [None, WHOLE_1], "depth": [None, WHOLE_0],
        "dropout": [Interval(float, 0, 1, "left")], "pooling": [None, Options(POOLINGS)],
        "pretrained": [None, File()],
    }


@dataclass
class TrainConfig:
    """Optimization settings shared by every trained stage."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    eval_batch_size: int = 1024

    _constraints: ClassVar[dict] = {
        "epochs": [WHOLE_0], "batch_size": [WHOLE_1], "optimizer": [Options(OPTIMIZERS)],
        "lr": [Interval(float, 0, 100, "right")], "momentum": [Interval(float, 0, 1, "left")], "nesterov": [bool],
        "weight_decay": [SHARE], "schedule": [Options(SCHEDULES)], "warmup_epochs": [Interval(float, 0)],
        "label_smoothing": [Interval(float, 0, 1, "left")], "eval_batch_size": [WHOLE_1],
    }


@dataclass
class GeneralistConfig(TrainConfig):
    init: Optional[str] = None  # a trained classifier's weights to start from (epochs=0: used as they are)

    _constraints: ClassVar[dict] = {"init": [None, File()]}


@dataclass
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the soft loss; (1 - alpha) on the hard labels
    loss: str = "kl"  # kl | mse_logits | mse_probs

    _constraints: ClassVar[dict] = {
        "temperature": [Interval(float, 0, MAX_TEMPERATURE, "right")], "alpha": [SHARE], "loss": [Options(LOSS_KINDS)],
    }


@dataclass
class SubsetsConfig:
    num_specialists: int = 5  # clusters asked for
    mode: str = "partition"  # partition | nearest
    classes_per_specialist: Optional[int] = None  # nearest mode: size of every subset
    split: str = "val"  # val | train: the held-in split the generalist is run on
    normalize: str = "correlation"  # correlation | raw
    method: str = "faiss"  # faiss | minibatch (online k-means)
    niter: int = 50
    min_size: int = 2
    max_size: Optional[int] = None
    leave_unwanted: bool = True  # classes no cluster keeps stay with the generalist
    # partition mode: each class joins its `coverage` nearest centroids (overlapping subsets,
    # every class in about that many); None = the partition (= 1). At most num_specialists.
    coverage: Optional[int] = None

    _constraints: ClassVar[dict] = {  # and between them: _cross_rules
        "num_specialists": [WHOLE_1], "mode": [Options(MODES)], "classes_per_specialist": [None, WHOLE_1],
        "split": [Options(HELD_IN_SPLITS)], "normalize": [Options(NORMALIZATIONS)], "method": [Options(METHODS)],
        "niter": [WHOLE_1], "min_size": [WHOLE_1], "max_size": [None, WHOLE_1], "leave_unwanted": [bool],
        "coverage": [None, WHOLE_1],
    }


@dataclass
class SpecialistsConfig(TrainConfig):
    epochs: int = 4
    lr: float = 0.01
    schedule: str = "cosine"
    phases: str = "alternate"  # alternate | hard | soft
    phase_unit: str = "epoch"  # epoch | steps
    phase_steps: int = 50  # length of one phase when phase_unit=steps
    soft_share: float = 0.5  # share of phases that are soft
    soft_alpha: float = 0.5  # soft phases: alpha * soft + (1 - alpha) * hard
    subset_fraction: float = 0.5  # share of each batch drawn from the subset's classes
    dustbin_correction: str = "calibrated"  # calibrated | analytic | none
    branch: str = "all"  # all (whole network) | k: a specialist owns the last k blocks + head, the trunk is shared
    cache_trunk: Optional[bool] = None  # shared trunk: reuse its outputs per example (None: when not augmenting)

    _constraints: ClassVar[dict] = {
        "phases": [Options(PHASES)], "phase_unit": [Options(PHASE_UNITS)], "phase_steps": [WHOLE_1],
        "soft_share": [SHARE], "soft_alpha": [SHARE], "subset_fraction": [Interval(float, 0, 1, "neither")],
        "dustbin_correction": [Options(DUSTBIN_CORRECTIONS)],
        "branch": [Parsed(parse_branch, "'all' nor a whole number of blocks >= 0")], "cache_trunk": [None, bool],
    }


@dataclass
class CombineConfig:
    solver: str = "em"  # em | gradient (the slow reference)
    top_n: int = 1  # route to specialists holding any of the generalist's top-n classes
    routing: str = "routed"  # routed | all
    max_iter: int = 200
    tol: float = 1e-6
    # consult the specialists only where the generalist's top probability is below this (a sure
    # generalist answers alone, at its own cost); None: on every example. evaluation.json's
    # validation "gate" table gives each threshold's top-1 and FLOPs, to choose it there.
    gate: Optional[float] = None

    _constraints: ClassVar[dict] = {
        "solver": [Options(SOLVERS)], "top_n": [WHOLE_1], "routing": [Options(ROUTINGS)], "max_iter": [WHOLE_1],
        "tol": [Interval(float, 0, 1, "neither", note="a change of probability")],
        "gate": [None, Interval(float, 0, 1, "right", note="a top probability")],
    }


@dataclass
class EvaluateConfig:
    bootstrap: int = 2000  # paired-bootstrap resamples for the 95% interval
    ece_bins: int = 15
    timing_batches: int = 5

    _constraints: ClassVar[dict] = {"bootstrap": [WHOLE_0], "ece_bins": [WHOLE_1], "timing_batches": [WHOLE_1]}


@dataclass
class AblateConfig:
    counts: List[int] = field(default_factory=list)  # re-clustering ablation sizes
    order: str = "confusion"  # size | confusion | random
    seed: int = 0
    control: bool = True  # fine-tune the generalist for the specialists' extra steps
    # the cascade control (computed by the student stage, which trains the second generalist it
    # needs: student.controls with the ensemble teacher): the second generalist consulted only
    # where the first is unsure, as many FLOPs per example as the routed ensemble
    cascade: bool = True

    _constraints: ClassVar[dict] = {
        "counts": [Each(WHOLE_1)], "order": [Options(ABLATION_ORDERS)], "seed": [SEED], "control": [bool],
        "cascade": [bool],
    }


@dataclass
class StudentModelConfig:
    name: Optional[str] = None  # default: the generalist's architecture
    width: Optional[int] = None
    depth: Optional[int] = None
    dropout: Optional[float] = None
    pooling: Optional[str] = None
    pretrained: Optional[str] = None  # a .safetensors file the student (and its born-again twin) starts from

    # a soft_tree student's own rules: _cross_rules
    _constraints: ClassVar[dict] = {
        "name": [None, *MODEL_NAME], "width": [None, WHOLE_1], "depth": [None, WHOLE_0],
        "dropout": [None, Interval(float, 0, 1, "left")], "pooling": [None, Options(POOLINGS)],
        "pretrained": [None, File("a .safetensors file", suffix=".safetensors",
                                  note="a student starts only from safetensors weights")],
    }


@dataclass
class SoftTreeConfig:
    """Training a ``soft_tree`` student (its targets: ``distill.alpha`` of the teacher's soft
    targets at ``distill.temperature``, the rest one-hot labels; ``distill.loss`` is for neural
    students)."""

    loss: str = "expected"  # expected (each leaf's cross-entropy, path-weighted) | mixture (the mixture's)
    penalty: float = 0.1  # lambda of the balance penalty, times 2^-depth at each level
    window: float = 1.0  # the root's running-average window in steps, doubling per level

    _constraints: ClassVar[dict] = {
        "loss": [Options(TREE_LOSSES)], "penalty": [Interval(float, 0, 100)], "window": [Interval(float, 1, note="steps")],
    }


@dataclass
class StudentConfig(TrainConfig):
    enabled: bool = True
    teacher: str = "ensemble"  # ensemble | generalist | probs | api
    teacher_probs: Optional[str] = None  # .npy (N_train, C), for teacher=probs
    teacher_url: Optional[str] = None  # teacher=api: the endpoint (POST {"inputs": [...]} -> {"probs": [[...]]})
    query_budget: Optional[int] = None  # teacher=api: at most this many answered requests, over all runs
    query_batch_size: int = 64  # teacher=api: inputs per request
    query_retries: int = 4  # teacher=api: retries of a failed request (exponential back-off)
    unlabelled: Optional[str] = None  # teacher=api, text: more texts to ask about (.txt lines, .jsonl, .csv, .tsv)
    controls: bool = True  # also train the born-again student and a second generalist
    model: StudentModelConfig = field(default_factory=StudentModelConfig)
    tree: SoftTreeConfig = field(default_factory=SoftTreeConfig)

    _constraints: ClassVar[dict] = {  # which teacher needs which of them: _cross_rules
        "enabled": [bool], "teacher": [Options(TEACHERS)], "teacher_probs": [None, File(expand=False)],
        "teacher_url": [None, Prefix(("http://", "https://"), "an http:// or https:// URL")],
        "query_budget": [None, WHOLE_1], "query_batch_size": [WHOLE_1], "query_retries": [WHOLE_0],
        "unlabelled": [None, File()], "controls": [bool],
    }


@dataclass
class DistributedTrainConfig:
    """Training under torchrun (several processes, one model)."""

    sync_bn: bool = False  # BatchNorm statistics over all ranks (SyncBatchNorm) instead of per rank

    _constraints: ClassVar[dict] = {"sync_bn": [bool]}


@dataclass
class LaunchConfig:
    """Where independent jobs run: the specialists, the re-clustering sub-runs, the controls."""

    executor: str = "local"  # local (in this process, one after another) | ray (tasks)
    address: str = ""  # ray: "" starts a local instance sized to the machine; "auto" or ray://host:port joins one
    gpus_per_job: float = 0.0  # ray: fractions pack small jobs on one GPU
    cpus_per_job: float = 1.0
    max_retries: int = 3  # ray: a job whose process dies is retried, resuming from its checkpoint
    # torchrun: minutes a rank waits for its peers (to join, then at each collective) before it
    # gives up in one line; torch's own default is 30 minutes of silence
    dist_timeout: float = 10.0

    _constraints: ClassVar[dict] = {
        "executor": [Options(EXECUTORS)], "address": [str], "gpus_per_job": [Interval(float, 0)],
        "cpus_per_job": [Interval(float, 0, None, "neither")], "max_retries": [WHOLE_0],
        "dist_timeout": [Interval(float, 0, 24 * 60, "right", note="minutes")],
    }


@dataclass
class TrackConfig:
    """Experiment trackers (:mod:`specialists.rundir.track`): what a run logs while it runs."""

    backends: List[str] = field(default_factory=lambda: ["csv"])  # csv | tensorboard | mlflow | wandb
    log_every: int = 50  # steps between per-step logs (loss, learning rate) of a backend beyond csv
    mlflow_uri: str = ""  # "": a SQLite store RUN_DIR/mlflow.db; or sqlite:///..., http(s)://server
    wandb_project: str = "specialists"
    wandb_mode: str = "offline"  # offline (nothing leaves the machine) | online | disabled

    _constraints: ClassVar[dict] = {
        "backends": [Each(Options(TRACK_BACKENDS))], "log_every": [WHOLE_1], "mlflow_uri": [str],
        "wandb_project": [NonEmpty("a W&B project name")], "wandb_mode": [Options(WANDB_MODES)],
    }


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generalist: GeneralistConfig = field(default_factory=GeneralistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    subsets: SubsetsConfig = field(default_factory=SubsetsConfig)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: DistributedTrainConfig = field(default_factory=DistributedTrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    _constraints: ClassVar[dict] = {"run_dir": [NonEmpty("a non-empty path")], "seed": [SEED],
                                    "device": [Options(DEVICES)]}


@functools.cache
def _template() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _schema() -> DictConfig:
    """Every key at its default, typed and closed to unknown keys: a fresh copy of one template
    (copying is several times faster than building it from the dataclasses)."""
    return copy.deepcopy(_template())


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Read a YAML config, following ``base:`` (a path relative to the file) recursively."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' loops back to itself")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"config {path}: not valid YAML ({one_line(exc)})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: expected a mapping of keys at the top level")
    base = node.pop("base", None)
    if base is None:
        return node
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    return OmegaConf.merge(parent, node)


def _section_path(type_name: str) -> Optional[str]:
    """The dotted key of the config section whose dataclass is named ``type_name``."""
    return next((prefix[:-1] for prefix, cls in sections(Config) if prefix and cls.__name__ == type_name), None)


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'"
    if key:
        return f"config key '{key}': {msg}"
    # a whole section given a plain value (`data=3`): omegaconf names only the section's class
    m = re.search(r"is not a subclass of (\w+)", msg)
    section = _section_path(m.group(1)) if m else None
    if section:
        return f"config key '{section}': expected a section of keys, not a value ({msg})"
    return f"config: {msg}"


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None, *,
                environment: Optional[bool] = None) -> Config:
    """Merge defaults, YAML and ``key=value`` overrides; validate; return a typed ``Config``.

    The returned object is an omegaconf ``DictConfig`` backed by the ``Config`` schema (typed
    attribute access, ``OmegaConf.to_yaml`` for saving). A ``soft_tree`` student takes
    :data:`TREE_OPTIMIZER` for each of ``student.optimizer``, ``lr`` and ``weight_decay`` the
    user leaves unset (in the YAML and the overrides); the saved config holds what was used.

    ``environment``: also run :func:`check_environment` (files, imports); default: in the
    process that starts the work, not in a torchrun rank other than 0 (rank 0 checks for all).
    """
    cfg = _schema()
    given = []  # what the user wrote (the YAML, each override): which defaults they kept
    try:
        if path is not None:
            given.append(_read_yaml(Path(path)))
            cfg.merge_with(given[-1])
        given += apply_overrides(cfg, overrides or [])
        OmegaConf.resolve(cfg)
        if cfg.student.model.name == TREE:
            for key, value in TREE_OPTIMIZER.items():
                if all(OmegaConf.select(node, f"student.{key}", default=None) is None for node in given):
                    cfg.student[key] = value
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    validate(cfg)
    if environment if environment is not None else _starts_the_work():
        check_environment(cfg)
    return cfg  # type: ignore[return-value]


def apply_overrides(cfg, overrides: list[str]) -> list[DictConfig]:
    """Merge ``key=value`` items into ``cfg`` (in place, in order); returns each as parsed. A
    malformed item, an unknown key or a value of the wrong type is one ConfigError line."""
    given = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            given.append(OmegaConf.from_dotlist([item]))
            cfg.merge_with(given[-1])
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc)) from None
    return given


def _starts_the_work() -> bool:
    """Whether this process is the driver: not a torchrun rank other than 0. Read from
    torchrun's variables, since configs are loaded before the process group is joined; a
    malformed value counts as the driver (joining refuses it in one line)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) <= 1 or int(os.environ.get("RANK") or 0) == 0
    except ValueError:
        return True


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a validated config from the YAML saved in a run directory (or sent to a Ray
    worker): the config itself is checked, not this machine (see :func:`check_environment`)."""
    try:
        cfg = OmegaConf.merge(_template(), OmegaConf.create(text))  # (merge copies the template)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg) -> None:
    """Check every value a typed schema cannot: each setting against the constraints its
    section declares, then the rules between settings. Touches neither disk nor imports."""
    check_constraints(cfg)
    _cross_rules(cfg)


def _cross_rules(cfg) -> None:
    """The rules between settings (each setting's own values are declared beside its field)."""
    d, s, sp, st = cfg.data, cfg.subsets, cfg.specialists, cfg.student
    _check(d.num_super * d.classes_per_super >= 2, "data.classes_per_super", "synthetic data needs >= 2 classes")
    _check(d.tokenizer != "bpe" or d.vocab_size >= 258, "data.vocab_size",
           "must be >= 258 for bpe (its 256 bytes and 2 special tokens), >= 64 for wordpiece")
    entry = DATASETS.get(d.name)
    _check(entry is None or not entry.needs_path or d.path is not None, "data.path",
           f"data set '{d.name}' needs data.path")
    text = entry is not None and entry.text
    _check(cfg.model.name != TREE, "model.name", f"'{TREE}' is a student (student.model.name={TREE}); the "
           "generalist and the specialists need a network with a classifier head")
    for key, m in (("model", cfg.model), ("student.model", st.model)):
        if m.name is None:
            continue
        _check(not (text and m.name == TREE), f"{key}.name", f"a {TREE} splits on input features, and token ids are "
               "not features; a text student is textcnn, bilstm or transformer")
        if m.name != TREE and text:
            _check(m.name in TEXT_MODELS, f"{key}.name", f"'{m.name}' does not read text; data set '{d.name}' needs "
                   f"one of {', '.join(sorted(TEXT_MODELS))}")
        elif m.name != TREE:
            _check(m.name not in TEXT_MODELS, f"{key}.name", f"'{m.name}' reads text; data set '{d.name}' is not "
                   "text (data.name=text or synthetic_text)")
        _check(not (m.name == "textcnn" and m.pooling == "mean"), f"{key}.pooling", "textcnn always max-pools over time")

    _check(s.max_size is None or s.max_size >= s.min_size, "subsets.max_size", "must be >= subsets.min_size")
    _check(s.mode != "nearest" or s.classes_per_specialist is not None, "subsets.classes_per_specialist",
           "required when subsets.mode=nearest")
    _check(s.coverage is None or s.coverage <= s.num_specialists, "subsets.coverage",
           f"{s.coverage} is not in 1..{s.num_specialists} (subsets.num_specialists: a class joins each "
           "cluster at most once)")
    _check(s.coverage is None or s.mode == "partition", "subsets.coverage", "does not apply to subsets.mode=nearest "
           "(there each centroid takes its classes_per_specialist nearest classes; coverage makes each class join "
           "its nearest centroids: two different ways to overlap)")
    if d.name in ("synthetic", "synthetic_text"):  # the data sets whose class count is known without loading them
        check_class_counts(cfg, d.num_super * d.classes_per_super)

    k, blocks = parse_branch(sp.branch), builtin_block_count(cfg.model)
    _check(not (k is None and sp.cache_trunk), "specialists.cache_trunk",
           "caches a shared trunk's outputs: it needs specialists.branch=k (not all)")
    _check(k is None or blocks is None or k <= blocks, "specialists.branch",
           f"{k} blocks, but model '{cfg.model.name}' has {blocks} (0..{blocks}, or all)")

    if st.model.name == TREE:
        _check(st.model.depth is None or 1 <= st.model.depth <= 16, "student.model.depth",
               f"a {TREE} needs 1 to 16 levels of decisions")
        for key in ("width", "dropout", "pretrained"):
            _check(st.model[key] is None, f"student.model.{key}", f"does not apply to a {TREE} (only depth does)")
    _check(st.teacher != "probs" or st.teacher_probs is not None, "student.teacher_probs",
           "required when student.teacher=probs")
    if st.teacher == "api":
        _check(st.teacher_url is not None, "student.teacher_url", "required when student.teacher=api")
        _check(cfg.distill.loss in ("kl", "mse_probs"), "distill.loss", "an API teacher gives probabilities: "
               "use kl or mse_probs")
        _check(st.model.name != TREE, "student.model.name", f"a {TREE} student takes the ensemble, generalist or "
               "probs teacher")
    if st.unlabelled is not None:
        _check(st.teacher == "api", "student.unlabelled", "texts without labels need a teacher that can be asked "
               "about them: student.teacher=api")
        _check(text, "student.unlabelled", "is a file of texts, for a text data set")


def check_environment(cfg) -> None:
    """The checks that touch this machine, of a validated config: every file the config names
    exists, the user's ``python:`` modules import, timm and torchvision names resolve. Run once
    by the process that starts the work (:func:`load_config`); a Ray worker checks what it must
    see itself (``engine.executors.as_run``), and every process finds the rest as it loads it."""
    check_constraints(cfg, environment=True)
    check_trackers(cfg.track)
    d = cfg.data
    if d.name in DATASETS and DATASETS[d.name].needs_path:
        _check(d.download or Path(d.path).exists(), "data.path", f"'{d.path}' does not exist")


def check_class_counts(cfg, num_classes: int) -> None:
    """The subset sizes against the data set's class count: at the config edge where the count
    is known from the config (synthetic), else by find-subsets once the data is loaded."""
    s = cfg.subsets
    _check(s.num_specialists <= num_classes, "subsets.num_specialists",
           f"{s.num_specialists} specialists but the data set has only {num_classes} classes")
    _check(s.classes_per_specialist is None or s.classes_per_specialist <= num_classes,
           "subsets.classes_per_specialist", f"{s.classes_per_specialist} is larger than the {num_classes} "
           "classes of the data set")
    # k-means makes min(M, C) clusters (M <= C is checked above, so this only restates it for
    # whoever loosens that rule): a class joins each cluster at most once.
    clusters = min(s.num_specialists, num_classes)
    _check(s.coverage is None or s.coverage <= clusters, "subsets.coverage",
           f"{s.coverage} is more than the {clusters} clusters k-means makes here")


def student_model_config(cfg: Config) -> DictConfig:
    """The student's model section: the generalist's, with the student's non-null fields over it
    (its weights start from ``student.model.pretrained`` only, never from the generalist's).
    A student of another architecture keeps none of the generalist's settings: a width or
    depth means something else in another model."""
    own = {k: v for k, v in to_dict(cfg.student.model).items() if v is not None}
    base = cfg.model if own.get("name", cfg.model.name) == cfg.model.name else OmegaConf.structured(ModelConfig)
    return OmegaConf.merge(base, {"pretrained": None}, own)


def config_values(cfg, keys) -> dict:
    """The flat ``{dotted key: value}`` of the named keys and sections (what a stage depends on)."""
    out: dict = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for key in keys:
        node = OmegaConf.select(cfg, key)
        flatten(key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    return out


__all__ = [
    "Config", "DataConfig", "ModelConfig", "TrainConfig", "DistillConfig", "SubsetsConfig",
    "SpecialistsConfig", "CombineConfig", "EvaluateConfig", "AblateConfig", "StudentConfig",
    "load_config", "apply_overrides", "config_from_yaml_text", "to_yaml", "to_dict", "validate", "check_environment", "check_class_counts",
    "config_values", "student_model_config", "MISSING", "TEACHERS", "EXECUTORS", "LaunchConfig",
    "DistributedTrainConfig", "SoftTreeConfig", "TREE", "TREE_OPTIMIZER",
]
