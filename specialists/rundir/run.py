"""A run directory: the one place that spells its layout, and what every stage needs from it.

Layout::

    RUN_DIR/config.yaml  manifest.json  data.json  tokenizer.json (text)  teacher_api.jsonl (student.teacher=api)
    RUN_DIR/report.html       the run on one page (written by `specialists run` and `specialists report`)
    RUN_DIR/generalist/       model.safetensors, state.pt, metrics.json, curves.png
    RUN_DIR/subsets/          probs.npy, covariance.npy, subsets.json, metrics.json, covariance.png
    RUN_DIR/specialists/NNN/  model.safetensors, state.pt, metrics.json
    RUN_DIR/evaluation/       evaluation.json, evaluation.md, by_coverage.png, specialists.png,
                              test_labels.npy, generalist_predictions.npy, ensemble_predictions.npy,
                              frontier.json, frontier.png (a report, re-rendered by ablate and distill)
    RUN_DIR/ablation/         ablation.json, ablation.md, ablation.png, control/, recluster/MNNN/
    RUN_DIR/student/          model.safetensors, state.pt, history.json, metrics.json, student.md,
                              born_again/, second_generalist/, two_generalists_predictions.npy,
                              cascade_predictions.npy
    (every model folder above also holds test_predictions.npy: its test argmax class ids)

No other module spells a file name of the run directory: they ask a :class:`Run` (or a
:class:`ModelFiles` it hands out). Paths inside the run directory are relative, so it can be
moved or copied elsewhere. A run opened for inference (``Run.open``) checks every file it
loads against the size and sha256 the manifest recorded when the file was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..core.checks import first_non_finite
from ..core.tokens import PAD_ID
from ..data import TEXT_LAYOUT, Dataset, build_dataset
from ..device import resolve_device
from ..errors import SpecialistsError, one_line
from ..models import Classifier, build_model, check_model, declared_preprocessing
from ..models.branch import parse_branch, split, tail_classifier
from .config import Config, check_class_counts, config_from_yaml_text, student_model_config, to_dict, to_yaml
from .io import file_sha256, load_weights, read_json, save_weights, weights_metadata, write_json, write_text
from .locks import FileLock
from .manifest import Manifest
from .track import tracker_for

# One folder per stage (the stage table in specialists.stages names each stage's folder).
GENERALIST, SUBSETS, SPECIALISTS, EVALUATION, ABLATION, STUDENT = (
    "generalist", "subsets", "specialists", "evaluation", "ablation", "student")


@dataclass(frozen=True)
class ModelFiles:
    """The folder of one trained model: final weights, resumable state, metrics."""

    dir: Path

    @property
    def weights(self) -> Path:  # safetensors; the completion marker of students and controls
        return self.dir / "model.safetensors"

    @property
    def state(self) -> Path:  # optimizer, scheduler, epoch: resumes a killed training
        return self.dir / "state.pt"

    @property
    def metrics(self) -> Path:  # the completion marker of the generalist and the specialists
        return self.dir / "metrics.json"

    @property
    def history(self) -> Path:  # per-epoch records of a student or control
        return self.dir / "history.json"

    @property
    def curves(self) -> Path:  # training curves plot
        return self.dir / "curves.png"

    @property
    def predictions(self) -> Path:  # (N,) int64: its argmax class per test example, for paired intervals
        return self.dir / "test_predictions.npy"


class Run:
    """One run directory opened with one config."""

    def __init__(self, cfg: Config, device: str | None = None, verify: bool = False):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.device = resolve_device(device or cfg.device)
        self.manifest = Manifest(self.dir / "manifest.json")
        self.verify = verify  # check files against the manifest as they are loaded
        # registered now, opened on first use: training finds its model's tracker by its folder
        self.tracker = tracker_for(self.dir, cfg.track, lambda: to_dict(cfg))

    @classmethod
    def open(cls, run_dir, device: str | None = None, verify: bool = True) -> "Run":
        """Reopen a run from its saved ``config.yaml`` (for inference and reports). ``verify``:
        check each file loaded against the manifest (a changed one is refused in one line)."""
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise SpecialistsError(f"{run_dir} is not a run directory (no config.yaml)")
        try:
            cfg = config_from_yaml_text(path.read_text())
        except SpecialistsError as exc:
            raise SpecialistsError(f"{path}: not a valid run config ({exc})") from None
        except Exception as exc:  # YAML syntax, undecodable bytes
            raise SpecialistsError(f"{path}: not a valid run config ({one_line(exc)})") from None
        cfg.run_dir = str(run_dir)
        return cls(cfg, device=device or "auto", verify=verify)

    def checked(self, path: Path) -> Path:
        """``path``, checked (when ``verify``) against the size and sha256 recorded when it was
        written; a changed or missing file is one line. Files the manifest does not list (an
        older run directory) are not checked."""
        if self.verify:
            want = self.manifest.entry(path)
            why = want and Manifest.check_file(Path(path), want)
            if why:
                raise SpecialistsError(f"{path} {why}: `specialists run CONFIG` rebuilds it (or load with verify=False)")
        return path

    def lock(self, name: str, what: str) -> FileLock:
        """The lock of one writer (a stage, a specialist job): ``RUN_DIR/.locks/NAME.lock``."""
        return FileLock(self.dir / ".locks" / f"{name}.lock", what)

    @property
    def config_yaml(self) -> Path:  # the resolved config the stages ran with
        return self.dir / "config.yaml"

    @property
    def summary_csv(self) -> Path:  # one row per model (a report)
        return self.dir / "summary.csv"

    def save_config(self) -> None:
        write_text(self.config_yaml, to_yaml(self.cfg))

    def rel(self, path: Path) -> str:
        """``path`` relative to the run directory (how reports and the manifest name files)."""
        return str(Path(path).relative_to(self.dir))

    # --- data --------------------------------------------------------------------------
    @cached_property
    def data(self) -> Dataset:
        """The data set, loaded and checked (bad data, and class counts or models the config cannot
        fit, are refused here, before any training), and ``data.json`` written or repaired."""
        declared = declared_preprocessing(self.cfg.model)  # a pretrained model's input size and normalization
        ds = build_dataset(self.cfg.data, resolution_hint=declared["input_size"][-1] if declared else None,
                           saved_tokenizer=self._saved_tokenizer())
        if declared and ds.is_image and len(declared["mean"]) == ds.input_shape[0]:
            ds.mean, ds.std = declared["mean"], declared["std"]
        check_class_counts(self.cfg, ds.num_classes)
        vocab = ds.encoder.vocab_size if ds.is_text else None
        check_model(self.cfg.model, ds.num_classes, ds.input_shape, vocab)
        if self.cfg.student.enabled:
            check_model(student_model_config(self.cfg), ds.num_classes, ds.input_shape, vocab, "student.model.name")
        info = ds.preprocessing()
        if ds.is_text:  # the tokenizer is its own file (a standard tokenizer.json); data.json names it
            text = info.pop("tokenizer")
            if not self.tokenizer_json.exists() or self.tokenizer_json.read_text() != text:
                write_text(self.tokenizer_json, text)
            self.manifest.record_file(self.tokenizer_json)
            info["tokenizer"] = self.rel(self.tokenizer_json)
        try:
            same = read_json(self.data_json) == info
        except SpecialistsError:  # missing or damaged: written anew from the data
            same = False
        if not same:
            write_json(self.data_json, info)
        self.manifest.record_file(self.data_json)
        return ds

    def load_data(self) -> Dataset:
        """Load and check the data now, not on first use of :attr:`data` (which keeps it): bad
        data, and class counts or models the config cannot fit, are refused before any work, and
        ``data.json`` is written or repaired. Returns the data set."""
        return self.data

    def _saved_tokenizer(self) -> tuple | None:
        """``(tokenizer_source, tokenizer JSON)`` of the tokenizer this run saved, if any: the data
        set reuses it while it would be made from the same (a retrained WordPiece can differ)."""
        try:
            source = read_json(self.data_json).get("tokenizer_source")
            return (source, self.tokenizer_json.read_text()) if source and self.tokenizer_json.exists() else None
        except (SpecialistsError, OSError, AttributeError):
            return None

    @property
    def data_json(self) -> Path:
        return self.dir / "data.json"

    @property
    def tokenizer_json(self) -> Path:
        return self.dir / "tokenizer.json"

    def data_info(self) -> dict:
        """Input shape, class names, normalization (a text run's ``tokenizer``: its JSON): from
        data.json and tokenizer.json, without loading data."""
        if not self.data_json.exists():
            return self.data.preprocessing()
        info = read_json(self.checked(self.data_json))
        if info.get("layout") == TEXT_LAYOUT:
            try:
                info["tokenizer"] = self.checked(self.tokenizer_json).read_text()
            except OSError as exc:
                raise SpecialistsError(f"{self.tokenizer_json}: cannot read the run's tokenizer "
                                       f"({exc.strerror or one_line(exc)})") from None
        return info

    # --- generalist/ ---------------------------------------------------------------------
    @property
    def generalist(self) -> ModelFiles:
        return ModelFiles(self.dir / GENERALIST)

    # --- subsets/ ------------------------------------------------------------------------
    @property
    def probs_npy(self) -> Path:  # (N, C) float32: the generalist on the held-in split
        return self.dir / SUBSETS / "probs.npy"

    @property
    def covariance_npy(self) -> Path:  # (C, C) float32
        return self.dir / SUBSETS / "covariance.npy"

    @property
    def subsets_json(self) -> Path:
        return self.dir / SUBSETS / "subsets.json"

    @property
    def subsets_metrics(self) -> Path:
        return self.dir / SUBSETS / "metrics.json"

    @property
    def covariance_png(self) -> Path:
        return self.dir / SUBSETS / "covariance.png"

    # --- specialists/NNN/ ----------------------------------------------------------------
    def specialist(self, i: int) -> ModelFiles:
        return ModelFiles(self.dir / SPECIALISTS / f"{i:03d}")

    @property
    def specialist_metrics_files(self) -> list[Path]:
        """Every finished specialist's ``metrics.json``, in id order."""
        return sorted((self.dir / SPECIALISTS).glob("*/metrics.json"))

    # --- evaluation/ ---------------------------------------------------------------------
    @property
    def evaluation_json(self) -> Path:
        return self.dir / EVALUATION / "evaluation.json"

    @property
    def evaluation_md(self) -> Path:
        return self.dir / EVALUATION / "evaluation.md"

    @property
    def evaluation_plots(self) -> tuple[Path, Path]:  # Table 4 by coverage, per specialist
        return self.dir / EVALUATION / "by_coverage.png", self.dir / EVALUATION / "specialists.png"

    @property
    def test_labels_npy(self) -> Path:  # (N,) int64: the test labels, so reports pair predictions without the data
        return self.dir / EVALUATION / "test_labels.npy"

    @property
    def frontier_json(self) -> Path:  # every model's accuracy and cost, the Pareto front (a report)
        return self.dir / EVALUATION / "frontier.json"

    @property
    def frontier_png(self) -> Path:
        return self.dir / EVALUATION / "frontier.png"

    @property
    def report_json_files(self) -> tuple[Path, ...]:  # JSON written by reports: views, listed but not verified
        return (self.frontier_json,)

    def predictions(self, model: str) -> Path:
        """The test predictions (``(N,) int64`` argmax class ids, written where the model is
        evaluated) of ``model``: ``generalist``, ``ensemble`` (evaluation/), ``longer_generalist``
        (ablation/control/), ``student``, ``born_again``, ``hard_labels``, ``second_generalist``,
        ``two_generalists``, ``cascade`` (student/)."""
        folders = {"longer_generalist": self.control, "student": self.student, "born_again": self.born_again,
                   "hard_labels": self.hard_labels, "second_generalist": self.second_generalist}
        if model in folders:
            return folders[model].predictions
        if model in ("generalist", "ensemble"):
            return self.dir / EVALUATION / f"{model}_predictions.npy"
        if model in ("two_generalists", "cascade"):
            return self.dir / STUDENT / f"{model}_predictions.npy"
        raise SpecialistsError(f"no test predictions are kept for a model called {model!r}")

    # --- ablation/ -----------------------------------------------------------------------
    @property
    def ablation_json(self) -> Path:
        return self.dir / ABLATION / "ablation.json"

    @property
    def ablation_md(self) -> Path:
        return self.dir / ABLATION / "ablation.md"

    @property
    def ablation_png(self) -> Path:
        return self.dir / ABLATION / "ablation.png"

    @property
    def control(self) -> ModelFiles:  # the compute-matched generalist trained longer
        return ModelFiles(self.dir / ABLATION / "control")

    def recluster_dir(self, m: int) -> Path:  # the re-clustering sub-run with m specialists
        return self.dir / ABLATION / "recluster" / f"M{m:03d}"

    # --- student/ ------------------------------------------------------------------------
    @property
    def student(self) -> ModelFiles:
        return ModelFiles(self.dir / STUDENT)

    @property
    def export_dir(self) -> Path:  # `specialists export`'s default --out
        return self.dir / "export"

    @property
    def report_html(self) -> Path:  # the run on one page (specialists.reports.page), `specialists report`'s default --out
        return self.dir / "report.html"

    @property
    def teacher_api_cache(self) -> Path:  # an API teacher's answers (outside student/: --force keeps them)
        return self.dir / "teacher_api.jsonl"

    @property
    def student_md(self) -> Path:
        return self.dir / STUDENT / "student.md"

    @property
    def born_again(self) -> ModelFiles:
        return ModelFiles(self.dir / STUDENT / "born_again")

    @property
    def second_generalist(self) -> ModelFiles:
        return ModelFiles(self.dir / STUDENT / "second_generalist")

    @property
    def hard_labels(self) -> ModelFiles:  # a soft tree student's control: the same tree on the labels alone
        return ModelFiles(self.dir / STUDENT / "hard_labels")

    @property
    def tree_png(self) -> Path:  # a soft tree student's filters and leaves
        return self.dir / STUDENT / "tree.png"

    @property
    def tree_path_png(self) -> Path:  # one test example's path through the soft tree
        return self.dir / STUDENT / "tree_path.png"

    # --- models --------------------------------------------------------------------------
    def new_model(self, num_classes: int | None = None, model_cfg=None) -> Classifier:
        info = self.data_info()
        return build_model(model_cfg or self.cfg.model, num_classes or info["num_classes"], tuple(info["input_shape"]),
                           info.get("vocab_size"))

    def load_model(self, files: ModelFiles, num_classes: int | None = None, model_cfg=None) -> Classifier:
        """A trained model of this run on the run's device, in eval mode."""
        return load_weights(self.checked(files.weights), self.new_model(num_classes, model_cfg)).to(self.device).eval()

    def load_generalist(self) -> Classifier:
        if not self.generalist.weights.exists():
            raise SpecialistsError(f"no trained generalist in {self.dir}: run `specialists train-generalist CONFIG` first")
        return self.load_model(self.generalist)

    # --- shared-trunk specialists (specialists.branch) -------------------------------------
    @property
    def branch(self) -> int | None:
        """``specialists.branch``: None for whole-network specialists, else the blocks they own."""
        return parse_branch(self.cfg.specialists.branch)

    def example_input(self, n: int = 2) -> torch.Tensor:
        """A seeded batch of ``n`` inputs of the run's shape (normalized images or vectors, or
        token ids), on the device: what a model split is checked on."""
        info = self.data_info()
        g = torch.Generator().manual_seed(0)
        shape = (n, *info["input_shape"])
        if info.get("vocab_size"):
            x = torch.randint(1, int(info["vocab_size"]), shape, generator=g)
            x[0, shape[1] // 2:] = PAD_ID  # one padded row: the mask travels through the split
        else:
            x = torch.randn(shape, generator=g)
        return x.to(self.device)

    def split_generalist(self, generalist: Classifier):
        """``(trunk, part)``: the generalist's shared trunk and the rest of it (its tail and
        head, a classifier of trunk outputs), split at ``specialists.branch``; a model that
        cannot be split there is one line."""
        trunk, tail = split(generalist, self.branch, self.example_input(), str(self.cfg.model.name))
        return trunk.eval(), tail_classifier(generalist, tail)

    def generalist_sha256(self) -> str:
        return file_sha256(self.generalist.weights)

    def load_specialist(self, sid: int, num_classes: int) -> Classifier:
        """Specialist ``sid`` (``num_classes`` = |S| + 1) on the device, in eval mode: a whole
        network, or with ``specialists.branch`` its tail and head (a classifier of the shared
        trunk's outputs), refused in one line when it was branched from another generalist."""
        files = self.specialist(sid)
        if self.branch is None:
            return self.load_model(files, num_classes)
        path = self.checked(files.weights)
        meta = weights_metadata(path)
        want, have = meta.get("generalist_sha256"), self.generalist_sha256()
        if want != have:
            raise SpecialistsError(f"{path}: this shared-trunk specialist was branched from generalist "
                                   f"{str(want)[:12]}, but {self.generalist.weights} is {have[:12]}: retrain the "
                                   "specialists (`specialists train-specialists CONFIG --force`)")
        if meta.get("branch") != self.branch:
            raise SpecialistsError(f"{path}: this specialist owns {meta.get('branch', 'all')} blocks, but the config "
                                   f"says specialists.branch={self.branch}")
        fresh = self.new_model(num_classes)
        part = tail_classifier(fresh, split(fresh, self.branch)[1])
        return load_weights(path, part).to(self.device).eval()

    def save_model(self, path: Path, net: torch.nn.Module, **metadata) -> None:
        """Save a trained model (every stage's completion step); one holding NaN or infinity is
        refused in one line, so no stage records a non-finite model as done."""
        bad = first_non_finite(net.state_dict())
        if bad is not None:
            raise SpecialistsError(f"{self.rel(path)}: not saved, its tensor '{bad}' holds NaN or infinity")
        save_weights(path, net, metadata)

    def load_subsets(self) -> list[dict]:
        """``subsets.json``'s entries: ``{"id", "classes", "names", "size", ...}``."""
        if not self.subsets_json.exists():
            raise SpecialistsError(f"no subsets in {self.dir}: run `specialists find-subsets CONFIG` first")
        return read_json(self.checked(self.subsets_json))["subsets"]
