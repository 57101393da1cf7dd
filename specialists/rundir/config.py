"""Typed configuration: omegaconf structured configs, YAML files and ``key=value`` overrides.

``load_config(path, overrides)`` merges, in order: the dataclass defaults, the YAML file (which
may name a ``base:`` YAML of its own, resolved relative to it), then the command-line
overrides. Every entry point calls it, so the whole config (all sections, used or not) is
validated before any work starts: unknown keys, wrong types and impossible values stop with
one :class:`ConfigError` line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

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
from ..models import TEXT_MODELS, check_model_name
from ..models.branch import builtin_block_count, parse_branch

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


@dataclass
class ModelConfig:
    name: str = "cnn"  # a key of specialists.models.MODELS, or timm:ARCH, torchvision:ARCH, python:module:function
    width: Optional[int] = None  # base channels (cnn 32, resnet 64, resnet8 32) or hidden units (mlp 256); None = the model's default
    depth: Optional[int] = None  # hidden layers (mlp, default 2); levels of decisions (soft_tree student, default 8)
    dropout: float = 0.0
    pooling: Optional[str] = None  # text models: mean | max over the unpadded tokens (bilstm, transformer; default mean)
    pretrained: Optional[str] = None  # a local weights file (safetensors, or a .pt/.pth/.bin state dict)


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


@dataclass
class GeneralistConfig(TrainConfig):
    init: Optional[str] = None  # a trained classifier's weights to start from (epochs=0: used as they are)


@dataclass
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the soft loss; (1 - alpha) on the hard labels
    loss: str = "kl"  # kl | mse_logits | mse_probs


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


@dataclass
class CombineConfig:
    solver: str = "em"  # em | closed_form | gradient
    top_n: int = 1  # route to specialists holding any of the generalist's top-n classes
    routing: str = "routed"  # routed | all
    max_iter: int = 200
    tol: float = 1e-6


@dataclass
class EvaluateConfig:
    bootstrap: int = 2000  # paired-bootstrap resamples for the 95% interval
    ece_bins: int = 15
    timing_batches: int = 5


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


@dataclass
class StudentModelConfig:
    name: Optional[str] = None  # default: the generalist's architecture
    width: Optional[int] = None
    depth: Optional[int] = None
    dropout: Optional[float] = None
    pooling: Optional[str] = None
    pretrained: Optional[str] = None  # a .safetensors file the student (and its born-again twin) starts from


@dataclass
class SoftTreeConfig:
    """Training a ``soft_tree`` student (its targets: ``distill.alpha`` of the teacher's soft
    targets at ``distill.temperature``, the rest one-hot labels; ``distill.loss`` is for neural
    students)."""

    loss: str = "expected"  # expected (each leaf's cross-entropy, path-weighted) | mixture (the mixture's)
    penalty: float = 0.1  # lambda of the balance penalty, times 2^-depth at each level
    window: float = 1.0  # the root's running-average window in steps, doubling per level


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


@dataclass
class DistributedTrainConfig:
    """Training under torchrun (several processes, one model)."""

    sync_bn: bool = False  # BatchNorm statistics over all ranks (SyncBatchNorm) instead of per rank


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


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


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


def _section_path(type_name: str, cls=None, prefix: str = "") -> Optional[str]:
    """The dotted key of the config section whose dataclass is named ``type_name``."""
    for f in dataclasses.fields(cls or Config):
        sub = f.default_factory
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            if sub.__name__ == type_name:
                return prefix + f.name
            found = _section_path(type_name, sub, f"{prefix}{f.name}.")
            if found:
                return found
    return None


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


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Merge defaults, YAML and ``key=value`` overrides; validate; return a typed ``Config``.

    The returned object is an omegaconf ``DictConfig`` backed by the ``Config`` schema (typed
    attribute access, ``OmegaConf.to_yaml`` for saving). A ``soft_tree`` student takes
    :data:`TREE_OPTIMIZER` for each of ``student.optimizer``, ``lr`` and ``weight_decay`` the
    user leaves unset (in the YAML and the overrides); the saved config holds what was used.
    """
    cfg = _schema()
    given = []  # what the user wrote (the YAML, each override): which defaults they kept
    try:
        if path is not None:
            given.append(_read_yaml(Path(path)))
            cfg = OmegaConf.merge(cfg, given[-1])
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            given.append(OmegaConf.from_dotlist([item]))
            cfg = OmegaConf.merge(cfg, given[-1])
        OmegaConf.resolve(cfg)
        if cfg.student.model.name == TREE:
            for key, value in TREE_OPTIMIZER.items():
                if all(OmegaConf.select(node, f"student.{key}", default=None) is None for node in given):
                    cfg.student[key] = value
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a validated config from the YAML saved in a run directory."""
    try:
        cfg = OmegaConf.merge(_schema(), OmegaConf.create(text))
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


def _choice(cfg, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in choices, key, f"'{value}' is not one of {', '.join(map(str, choices))}")


def _validate_train(cfg, section: str) -> None:
    s = OmegaConf.select(cfg, section)
    _check(s.epochs >= 0, f"{section}.epochs", "must be >= 0")
    _check(s.batch_size >= 1, f"{section}.batch_size", "must be >= 1")
    _check(s.eval_batch_size >= 1, f"{section}.eval_batch_size", "must be >= 1")
    _check(0 < s.lr <= 100, f"{section}.lr", f"{s.lr} is not in (0, 100]")
    _check(0 <= s.momentum < 1, f"{section}.momentum", "must be in [0, 1)")
    _check(0 <= s.weight_decay <= 1, f"{section}.weight_decay", f"{s.weight_decay} is not in [0, 1]")
    _check(0 <= s.label_smoothing < 1, f"{section}.label_smoothing", "must be in [0, 1)")
    _check(s.warmup_epochs >= 0, f"{section}.warmup_epochs", "must be >= 0")
    _choice(cfg, f"{section}.optimizer", OPTIMIZERS)
    _choice(cfg, f"{section}.schedule", SCHEDULES)


def _leaves(node, prefix: str = ""):
    """``(dotted key, value)`` of every setting below ``node``, sections walked into."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


SEED_LIMIT = 2**32  # seeds are 32-bit unsigned (numpy's legacy range; faiss gets them reduced to its C int)


def _check_finite_and_seeds(cfg) -> None:
    """No ``inf`` or ``nan`` anywhere (no setting of this project means one), and every seed (a
    key named ``seed`` or ``*_seed``, in any section) in 0..2**32-1, before any work: torch,
    numpy and faiss each refuse another range, some only after earlier stages finished."""
    for name, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{name}': must be a finite number, got {value}")
        if name.rsplit(".", 1)[-1] == "seed" or name.endswith("_seed"):
            _check(isinstance(value, int) and 0 <= value < SEED_LIMIT, name,
                   f"{value} is not a seed in 0..{SEED_LIMIT - 1}")


def validate(cfg) -> None:
    """Check every value a typed schema cannot: ranges, names, paths, cross-field rules."""
    _check_finite_and_seeds(cfg)
    _choice(cfg, "device", DEVICES)
    _check(bool(cfg.run_dir), "run_dir", "must not be empty")

    d = cfg.data
    if str(d.name).startswith("python:"):
        try:
            python_entry(str(d.name))
        except ConfigError:
            raise
        except Exception as exc:  # SpecialistsError: cannot import it
            raise ConfigError(f"config key 'data.name': {exc}") from None
    else:
        _choice(cfg, "data.name", sorted(DATASETS))
    _check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _choice(cfg, "data.augment", ("auto", *AUGMENTATIONS))
    _check(d.crop_padding >= 0, "data.crop_padding", "must be >= 0")
    _check(d.max_train is None or d.max_train >= 1, "data.max_train", "must be >= 1")
    _check(d.num_super >= 1, "data.num_super", "must be >= 1")
    _check(d.classes_per_super >= 1, "data.classes_per_super", "must be >= 1")
    _check(d.num_super * d.classes_per_super >= 2, "data.classes_per_super", "synthetic data needs >= 2 classes")
    _check(d.train_per_class >= 2, "data.train_per_class", "must be >= 2")
    _check(d.test_per_class >= 1, "data.test_per_class", "must be >= 1")
    _check(d.image_size >= 4, "data.image_size", "must be >= 4")
    _choice(cfg, "data.variant", VARIANTS)
    _check(0 < d.difficulty <= 100, "data.difficulty", f"{d.difficulty} is not in (0, 100]")
    _check(d.resize is None or d.resize >= 4, "data.resize", "must be >= 4")
    _choice(cfg, "data.storage", STORAGES)
    _check(d.workers >= 0, "data.workers", "must be >= 0")
    _check(d.memory_budget_gb > 0, "data.memory_budget_gb", "must be > 0")
    _check(d.tokenizer in TOKENIZERS or Path(d.tokenizer).expanduser().is_file(), "data.tokenizer",
           f"'{d.tokenizer}' is not one of {', '.join(TOKENIZERS)} nor a tokenizer.json file")
    _check(d.vocab_size >= (258 if d.tokenizer == "bpe" else 64), "data.vocab_size",
           "must be >= 258 for bpe (its 256 bytes and 2 special tokens), >= 64 for wordpiece")
    _check(1 <= d.max_length <= 65536, "data.max_length", "must be in 1..65536")
    text = d.name in DATASETS and DATASETS[d.name].text
    for key in ("model", "student.model"):
        name = OmegaConf.select(cfg, f"{key}.name")
        if name is None:
            continue
        _check(not (text and name == TREE), f"{key}.name", f"a {TREE} splits on input features, and token ids are "
               "not features; a text student is textcnn, bilstm or transformer")
        if name == TREE:
            continue
        if text:
            _check(name in TEXT_MODELS, f"{key}.name", f"'{name}' does not read text; data set '{d.name}' needs "
                   f"one of {', '.join(sorted(TEXT_MODELS))}")
        else:
            _check(name not in TEXT_MODELS, f"{key}.name", f"'{name}' reads text; data set '{d.name}' is not text "
                   "(data.name=text or synthetic_text)")
        pooling = OmegaConf.select(cfg, f"{key}.pooling")
        _check(pooling in (None, "mean", "max"), f"{key}.pooling", f"'{pooling}' is not one of mean, max")
        _check(not (name == "textcnn" and pooling == "mean"), f"{key}.pooling", "textcnn always max-pools over time")
    init = cfg.generalist.init
    _check(init is None or Path(init).expanduser().is_file(), "generalist.init", f"'{init}' is not a file")
    if d.name in DATASETS and DATASETS[d.name].needs_path:
        _check(d.path is not None, "data.path", f"data set '{d.name}' needs data.path")
        _check(d.download or Path(d.path).exists(), "data.path", f"'{d.path}' does not exist")

    _check(cfg.model.name != TREE, "model.name", f"'{TREE}' is a student (student.model.name={TREE}); the "
           "generalist and the specialists need a network with a classifier head")
    for key in ("model", "student.model"):
        name = OmegaConf.select(cfg, f"{key}.name")
        if name is not None:
            why = check_model_name(str(name))
            _check(why is None, f"{key}.name", why or "")
        pretrained = OmegaConf.select(cfg, f"{key}.pretrained")
        _check(pretrained is None or Path(pretrained).expanduser().is_file(), f"{key}.pretrained",
               f"'{pretrained}' is not a file")
        width = OmegaConf.select(cfg, f"{key}.width")
        _check(width is None or width >= 1, f"{key}.width", "must be >= 1")
        depth = OmegaConf.select(cfg, f"{key}.depth")
        _check(depth is None or depth >= 0, f"{key}.depth", "must be >= 0")
        dropout = OmegaConf.select(cfg, f"{key}.dropout")
        _check(dropout is None or 0 <= dropout < 1, f"{key}.dropout", "must be in [0, 1)")

    pretrained = cfg.student.model.pretrained
    _check(pretrained is None or Path(pretrained).suffix == ".safetensors", "student.model.pretrained",
           f"'{pretrained}' is not a .safetensors file (a student starts only from safetensors weights)")

    for section in ("generalist", "specialists", "student"):
        _validate_train(cfg, section)

    _check(0 < cfg.distill.temperature <= MAX_TEMPERATURE, "distill.temperature",
           f"{cfg.distill.temperature} is not in (0, {MAX_TEMPERATURE:g}]")
    _check(0 <= cfg.distill.alpha <= 1, "distill.alpha", "must be in [0, 1]")
    _choice(cfg, "distill.loss", LOSS_KINDS)

    s = cfg.subsets
    _check(s.num_specialists >= 1, "subsets.num_specialists", "must be >= 1")
    _choice(cfg, "subsets.mode", MODES)
    _choice(cfg, "subsets.split", HELD_IN_SPLITS)
    _choice(cfg, "subsets.normalize", NORMALIZATIONS)
    _choice(cfg, "subsets.method", METHODS)
    _check(s.niter >= 1, "subsets.niter", "must be >= 1")
    _check(s.min_size >= 1, "subsets.min_size", "must be >= 1")
    _check(s.max_size is None or s.max_size >= s.min_size, "subsets.max_size", "must be >= subsets.min_size")
    if s.mode == "nearest":
        _check(s.classes_per_specialist is not None, "subsets.classes_per_specialist", "required when subsets.mode=nearest")
    _check(s.classes_per_specialist is None or s.classes_per_specialist >= 1,
           "subsets.classes_per_specialist", "must be >= 1")
    _check(s.coverage is None or 1 <= s.coverage <= s.num_specialists, "subsets.coverage",
           f"{s.coverage} is not in 1..{s.num_specialists} (subsets.num_specialists: a class joins each "
           "cluster at most once)")
    _check(s.coverage is None or s.mode == "partition", "subsets.coverage", "does not apply to subsets.mode=nearest "
           "(there each centroid takes its classes_per_specialist nearest classes; coverage makes each class join "
           "its nearest centroids: two different ways to overlap)")
    if d.name in ("synthetic", "synthetic_text"):  # the data sets whose class count is known without loading them
        check_class_counts(cfg, d.num_super * d.classes_per_super)

    sp = cfg.specialists
    _choice(cfg, "specialists.phases", PHASES)
    _choice(cfg, "specialists.phase_unit", PHASE_UNITS)
    _check(sp.phase_steps >= 1, "specialists.phase_steps", "must be >= 1")
    _check(0 <= sp.soft_share <= 1, "specialists.soft_share", "must be in [0, 1]")
    _check(0 <= sp.soft_alpha <= 1, "specialists.soft_alpha", "must be in [0, 1]")
    _check(0 < sp.subset_fraction < 1, "specialists.subset_fraction", "must be in (0, 1)")
    _choice(cfg, "specialists.dustbin_correction", DUSTBIN_CORRECTIONS)
    try:
        k = parse_branch(sp.branch)
    except ValueError as exc:
        raise ConfigError(f"config key 'specialists.branch': {exc}") from None
    _check(not (k is None and sp.cache_trunk), "specialists.cache_trunk",
           "caches a shared trunk's outputs: it needs specialists.branch=k (not all)")
    blocks = builtin_block_count(cfg.model)
    _check(k is None or blocks is None or k <= blocks, "specialists.branch",
           f"{k} blocks, but model '{cfg.model.name}' has {blocks} (0..{blocks}, or all)")

    _choice(cfg, "combine.solver", SOLVERS)
    _check(cfg.combine.top_n >= 1, "combine.top_n", "must be >= 1")
    _choice(cfg, "combine.routing", ROUTINGS)
    _check(cfg.combine.max_iter >= 1, "combine.max_iter", "must be >= 1")
    _check(0 < cfg.combine.tol < 1, "combine.tol", f"{cfg.combine.tol} is not in (0, 1) (a change of probability)")

    _check(cfg.evaluate.bootstrap >= 0, "evaluate.bootstrap", "must be >= 0")
    _check(cfg.evaluate.ece_bins >= 1, "evaluate.ece_bins", "must be >= 1")
    _check(cfg.evaluate.timing_batches >= 1, "evaluate.timing_batches", "must be >= 1")

    _check(all(c >= 1 for c in cfg.ablate.counts), "ablate.counts", "every count must be >= 1")
    _choice(cfg, "ablate.order", ABLATION_ORDERS)

    la = cfg.launch
    _choice(cfg, "launch.executor", EXECUTORS)
    _check(la.gpus_per_job >= 0, "launch.gpus_per_job", "must be >= 0")
    _check(la.cpus_per_job > 0, "launch.cpus_per_job", "must be > 0")
    _check(la.max_retries >= 0, "launch.max_retries", "must be >= 0")
    _check(0 < la.dist_timeout <= 24 * 60, "launch.dist_timeout", "must be in (0, 1440] (minutes)")

    st = cfg.student
    _choice(cfg, "student.teacher", TEACHERS)
    _choice(cfg, "student.tree.loss", TREE_LOSSES)
    _check(0 <= st.tree.penalty <= 100, "student.tree.penalty", f"{st.tree.penalty} is not in [0, 100]")
    _check(st.tree.window >= 1, "student.tree.window", "must be >= 1 (steps)")
    if st.model.name == TREE:
        _check(st.model.depth is None or 1 <= st.model.depth <= 16, "student.model.depth",
               f"a {TREE} needs 1 to 16 levels of decisions")
        for key in ("width", "dropout", "pretrained"):
            _check(st.model[key] is None, f"student.model.{key}", f"does not apply to a {TREE} (only depth does)")
    if st.teacher == "probs":
        _check(st.teacher_probs is not None, "student.teacher_probs", "required when student.teacher=probs")
    if st.teacher_probs is not None:
        _check(Path(st.teacher_probs).is_file(), "student.teacher_probs", f"'{st.teacher_probs}' does not exist")
    if st.teacher == "api":
        _check(st.teacher_url is not None, "student.teacher_url", "required when student.teacher=api")
        _check(str(st.teacher_url).startswith(("http://", "https://")), "student.teacher_url",
               f"'{st.teacher_url}' is not an http:// or https:// URL")
        _check(cfg.distill.loss in ("kl", "mse_probs"), "distill.loss", "an API teacher gives probabilities: "
               "use kl or mse_probs")
        _check(st.model.name != TREE, "student.model.name", f"a {TREE} student takes the ensemble, generalist or "
               "probs teacher")
    _check(st.query_budget is None or st.query_budget >= 1, "student.query_budget", "must be >= 1")
    _check(st.query_batch_size >= 1, "student.query_batch_size", "must be >= 1")
    _check(st.query_retries >= 0, "student.query_retries", "must be >= 0")
    if st.unlabelled is not None:
        _check(st.teacher == "api", "student.unlabelled", "texts without labels need a teacher that can be asked "
               "about them: student.teacher=api")
        _check(text, "student.unlabelled", "is a file of texts, for a text data set")
        _check(Path(st.unlabelled).expanduser().is_file(), "student.unlabelled", f"'{st.unlabelled}' is not a file")


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
    "load_config", "config_from_yaml_text", "to_yaml", "to_dict", "validate", "check_class_counts",
    "config_values", "student_model_config", "MISSING", "TEACHERS", "EXECUTORS", "LaunchConfig",
    "DistributedTrainConfig", "SoftTreeConfig", "TREE", "TREE_OPTIMIZER",
]
