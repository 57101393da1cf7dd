"""Experiment trackers (``track.backends``): what a run logs while it runs, and where.

- ``csv`` (the default, no extra package): ``history.csv`` beside each model's files (one row
  per epoch: epoch, global step, learning rate, samples/s and every scalar of the epoch's
  record), rewritten whole after each epoch, so a resumed training continues it.
- ``tensorboard``: ``RUN_DIR/tensorboard/<namespace>/``, one TensorBoard run per model (so the
  same tag, e.g. ``val/top1``, compares models in one chart), written by
  ``torch.utils.tensorboard.SummaryWriter``; the config as text, each stage's final figures
  and plots under ``RUN_DIR/tensorboard/run/``.
- ``mlflow``: one MLflow run per run directory (``track.mlflow_uri``; default a SQLite store
  ``RUN_DIR/mlflow.db`` with artifacts in ``RUN_DIR/mlflow-artifacts/``), metrics named
  ``<namespace>/<tag>``, the resolved config as parameters, plots as artifacts.
- ``wandb``: one W&B run per run directory (``track.wandb_project``, ``track.wandb_mode``:
  ``offline`` by default, so nothing leaves the machine unless asked), files in
  ``RUN_DIR/wandb/``; each model's metrics on its own step axis ``<namespace>/step``.

A model's namespace is its folder in the run directory: ``generalist``, ``specialist/003``,
``student``, ``student/born_again``, ``control`` (the ablation's compute-matched control) and,
for an ablation sub-run, ``control/<sub-run>/...``.

**One tracker run per run directory**: the MLflow and W&B run ids are kept in
``RUN_DIR/track.json``, so a resumed stage (another process, a Ray worker) continues the same
run on the same step axis (a TensorBoard writer reopened at a resumed epoch purges the
steps logged after it by the killed attempt); a ``--force`` rerun starts a new one
(:meth:`Tracker.restart`). Only rank 0 of a torchrun job logs; under Ray the job that trains a
model logs it. A tracker failing mid-run is one warning: it is dropped for the rest of the
process, and the run (and the CSV) go on.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import socket
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..device import world
from ..errors import ConfigError
from .io import read_json, write_json, write_text

log = logging.getLogger("specialists")

BACKENDS = ("csv", "tensorboard", "mlflow", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> module it needs
EXTRA = "pip install 'specialists[track]'"
CONNECT_TIMEOUT_S = 5.0


def namespace(rel: Path) -> str:
    """A model's tracker namespace from its folder relative to the run directory:
    ``specialists/003`` -> ``specialist/003``, ``ablation/control`` -> ``control``, an ablation
    sub-run's ``ablation/k_2/specialists/000`` -> ``control/k_2/specialist/000``."""
    parts = list(rel.parts)
    if parts and parts[0] == "ablation":
        parts = ["control"] + [p for p in parts[1:] if p != "control"]
    return "/".join("specialist" if p == "specialists" else p for p in parts) or "run"


def flatten(obj, prefix: str = "", max_depth: int = 4) -> dict:
    """The finite numbers (and booleans as 0/1) of a JSON object, keyed by their dotted path;
    lists of records (histories, examples) are left out."""
    out = {}
    if isinstance(obj, dict) and max_depth > 0:
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}.", max_depth - 1))
    elif isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    elif isinstance(obj, (int, float)) and math.isfinite(obj):
        out[prefix[:-1]] = float(obj)
    return out


def params(config: dict, prefix: str = "") -> dict:
    """A config as flat ``section.key -> value`` hyper-parameters (lists and None as text)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def check_environment(track) -> None:
    """Refuse, before any work, a backend whose package is missing, an MLflow server nothing
    answers at, and W&B online without credentials (``track``: the config's section)."""
    for b in track.backends:
        module = PACKAGES.get(b)
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"track.backends lists {b}, which needs the {module} package: {EXTRA}") from None
    if "mlflow" in track.backends and track.mlflow_uri:
        url = urlparse(track.mlflow_uri)
        if url.scheme in ("http", "https"):
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
            except OSError as exc:
                raise ConfigError(f"track.mlflow_uri={track.mlflow_uri}: no MLflow server answers at "
                                  f"{url.hostname}:{port} ({exc.strerror or exc})") from None
    if "wandb" in track.backends and track.wandb_mode == "online" and not _wandb_credentials():
        raise ConfigError("track.wandb_mode=online but no W&B credentials were found (set WANDB_API_KEY or run "
                          "`wandb login`); or use track.wandb_mode=offline, which needs none")


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="replace")


# --- the backends ------------------------------------------------------------------------------

class _Backend:
    """What a tracker does; each method a no-op unless the backend records it."""

    def params(self, flat: dict) -> None: ...

    def scalars(self, ns: str, values: dict, step: int) -> None: ...

    def start_model(self, ns: str, first_step: int) -> None: ...

    def image(self, tag: str, png: Path) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _TensorBoard(_Backend):
    def __init__(self, root: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._cls, self.root, self.writers = SummaryWriter, root, {}

    def _writer(self, ns: str, purge_step: int | None = None):
        if ns not in self.writers or purge_step is not None:
            if ns in self.writers:
                self.writers[ns].close()
            self.writers[ns] = self._cls(log_dir=str(self.root / ns), purge_step=purge_step)
        return self.writers[ns]

    def start_model(self, ns, first_step):
        # a resumed training replays from ``first_step``: TensorBoard drops what the killed
        # attempt logged at or after it, so the step axis stays one continuous line
        self._writer(ns, purge_step=first_step if first_step > 0 else None)

    def params(self, flat):
        text = "\n".join(f"    {k} = {v}" for k, v in flat.items())
        self._writer("run").add_text("config", text, 0)

    def scalars(self, ns, values, step):
        w = self._writer(ns)
        for k, v in values.items():
            w.add_scalar(k, v, step)

    def image(self, tag, png):
        import matplotlib.image

        self._writer("run").add_image(tag, matplotlib.image.imread(png)[..., :3], 0, dataformats="HWC")

    def flush(self):
        for w in self.writers.values():
            w.flush()

    def close(self):
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class _MLflow(_Backend):
    def __init__(self, uri: str, run_id: str | None, artifacts: Path, name: str):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        for name in ("mlflow", "alembic"):  # their INFO lines (creating the store's tables) are not the run's
            logging.getLogger(name).setLevel(logging.WARNING)
        self.Metric, self.Param = Metric, Param
        self.client = MlflowClient(uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name("specialists")
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                "specialists", artifact_location=artifacts.as_uri())
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.run_id = run_id

    def params(self, flat):
        items = [self.Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, ns, values, step):
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(f"{ns}/{k}", float(v), now, step)
                                                    for k, v in values.items()])

    def image(self, tag, png):
        self.client.log_artifact(self.run_id, str(png), artifact_path=str(Path("plots") / Path(tag).parent))


class _WandB(_Backend):
    def __init__(self, project: str, mode: str, run_id: str, root: Path, name: str):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        root.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(root), id=run_id, resume="allow", name=name,
                              reinit="create_new")
        self.axes: set = set()

    def params(self, flat):
        self.run.config.update(flat, allow_val_change=True)

    def scalars(self, ns, values, step):
        if ns not in self.axes:  # each model on its own step axis
            self.run.define_metric(f"{ns}/*", step_metric=f"{ns}/step")
            self.axes.add(ns)
        self.run.log({f"{ns}/step": step, **{f"{ns}/{k}": v for k, v in values.items()}})

    def image(self, tag, png):
        self.run.log({tag: self.wandb.Image(str(png))})

    def close(self):
        self.run.finish()


# --- the run's tracker -------------------------------------------------------------------------

class Tracker:
    """The trackers of one run directory, opened on first use in each process (rank 0 only)."""

    def __init__(self, run_dir: Path, track, config: Callable[[], dict] | None = None):
        # ``config``: the resolved config as a dict, asked for only when a new tracker run opens
        self.dir, self.cfg, self.config = Path(run_dir), track, config
        self.backends: dict[str, _Backend] | None = None
        self.csv = "csv" in track.backends

    @property
    def ids_json(self) -> Path:  # the tracker runs' ids: one tracker run per run directory
        return self.dir / "track.json"

    @property
    def active(self) -> bool:
        """Whether any backend beyond the CSV files records (per-step logging costs a sync)."""
        return any(b != "csv" for b in self.cfg.backends) and world()[0] == 0

    def _open(self) -> dict:
        if self.backends is not None:
            return self.backends
        self.backends = {}
        if not self.active:
            return self.backends
        ids = read_json(self.ids_json) if self.ids_json.exists() else {}
        new = not ids
        if new:
            ids = {"id": uuid.uuid4().hex[:16]}
        name = self.dir.name
        makers = {
            "tensorboard": lambda: _TensorBoard(self.dir / "tensorboard"),
            "mlflow": lambda: _MLflow(self.cfg.mlflow_uri or f"sqlite:///{self.dir.resolve() / 'mlflow.db'}",
                                      ids.get("mlflow"), self.dir.resolve() / "mlflow-artifacts", name),
            "wandb": lambda: _WandB(self.cfg.wandb_project, self.cfg.wandb_mode, ids["id"], self.dir, name),
        }
        for b in self.cfg.backends:
            if b in makers:
                self._call(b, lambda b=b: self.backends.__setitem__(b, makers[b]()))
        if "mlflow" in self.backends:
            ids["mlflow"] = self.backends["mlflow"].run_id
        if new or ids != read_json(self.ids_json):
            write_json(self.ids_json, ids)
        if new and self.config is not None:
            self._each("params", params(self.config()))
        return self.backends

    def _call(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (a tracker never stops the run)
            log.warning("tracker %s failed (%s: %s); it is off for the rest of this process, the run and its CSV "
                        "files go on", name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            if self.backends is not None:
                self.backends.pop(name, None)

    def _each(self, method: str, *args) -> None:
        for name, b in list(self._open().items()):
            self._call(name, lambda b=b: getattr(b, method)(*args))

    def restart(self) -> None:
        """A ``--force`` rerun: the next use opens new tracker runs."""
        self.close()
        self.ids_json.unlink(missing_ok=True)

    def start_model(self, ns: str, first_step: int) -> None:
        self._each("start_model", ns, first_step)

    def scalars(self, ns: str, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if values:
            self._each("scalars", ns, values, step)

    def figures(self, stage: str, result: dict) -> None:
        """A stage's final figures (its result), flattened, as ``report/<stage>/...`` scalars."""
        if self.active:
            self.scalars(f"report/{stage}", flatten(result), 0)

    def images(self, paths) -> None:
        """Plots, tagged by their path in the run directory."""
        if self.active:
            for p in paths:
                if p.exists():
                    self._each("image", str(p.relative_to(self.dir).with_suffix("")), p)

    def flush(self) -> None:
        if self.backends:
            self._each("flush")

    def close(self) -> None:
        if self.backends:
            self._each("close")
        self.backends = None


def write_history_csv(path: Path, rows: list[dict]) -> None:
    """``history.csv``: one row per epoch, the union of the records' scalar keys as columns."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and isinstance(v, (int, float, str))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


# The open trackers of this process, by run directory (a sub-run logs to its outermost run's)
_OPEN: dict[Path, Tracker] = {}


def _enclosing(path: Path) -> Path | None:
    """The outermost open run directory at or above ``path``."""
    hits = [d for d in _OPEN if d == path or d in path.parents]
    return min(hits, key=lambda d: len(d.parts)) if hits else None


def tracker_for(run_dir: Path, track, config: Callable[[], dict] | None = None) -> Tracker:
    """The tracker of ``run_dir``: the open one of an enclosing run directory (an ablation
    sub-run logs into its parent's tracker run), else this directory's, opened once per
    process (and again when its ``track`` settings change)."""
    run_dir = Path(run_dir).resolve()
    d = _enclosing(run_dir)
    if d is not None and (d != run_dir or _OPEN[d].cfg == track):
        return _OPEN[d]
    if d is not None:
        _OPEN[d].close()
    _OPEN[run_dir] = Tracker(run_dir, track, config)
    return _OPEN[run_dir]


def model_tracker(state_path: Path | None) -> tuple[Tracker, str] | tuple[None, None]:
    """The tracker and namespace of the model whose training state is ``state_path`` (None when
    no open run directory holds it)."""
    if state_path is None:
        return None, None
    folder = Path(state_path).resolve().parent
    d = _enclosing(folder)
    return (_OPEN[d], namespace(folder.relative_to(d))) if d is not None else (None, None)

