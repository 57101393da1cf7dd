"""``RUN_DIR/manifest.json``: which stages are done, with what inputs, and where their artifacts are.

Each stage depends on a list of config keys (``STAGE_KEYS``, cumulative down the pipeline).
When a stage starts, the values of those keys are recorded; before any stage runs, every
recorded stage is compared with the current config. A difference stops the run with one line
naming the stage and the key, unless ``--force`` is given, in which case that stage and every
stage after it are wiped and rerun. Keys no recorded stage depends on change nothing.

Several processes may update the manifest at once (specialists fanned out with ``--only``), so
every read-modify-write holds an exclusive ``flock`` on ``manifest.lock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from .errors import SpecialistsError
from .io import read_json, write_json

STAGES = ("generalist", "subsets", "specialists", "evaluate", "ablate", "student")
_OWN_KEYS = {
    "generalist": ["seed", "data", "model", "generalist"],
    "subsets": ["subsets"],
    "specialists": ["specialists", "distill.temperature"],
    "evaluate": ["combine", "evaluate"],
    "ablate": ["ablate"],
    "student": ["student", "distill"],
}
# the folder each stage owns inside the run directory (wiped by --force)
STAGE_DIRS = {"generalist": "generalist", "subsets": "subsets", "specialists": "specialists",
              "evaluate": "evaluation", "ablate": "ablation", "student": "student"}
# a stage also depends on everything its upstream depends on
STAGE_KEYS = {}
_acc: list[str] = []
for _s in STAGES:
    if _s in ("ablate", "student"):  # both follow evaluate, not each other
        STAGE_KEYS[_s] = STAGE_KEYS["evaluate"] + _OWN_KEYS[_s]
    else:
        _acc = _acc + _OWN_KEYS[_s]
        STAGE_KEYS[_s] = list(_acc)
UPSTREAM = {"generalist": None, "subsets": "generalist", "specialists": "subsets", "evaluate": "specialists",
            "ablate": "evaluate", "student": "evaluate"}
COMMAND = {"generalist": "train-generalist", "subsets": "find-subsets", "specialists": "train-specialists",
           "evaluate": "evaluate", "ablate": "ablate", "student": "distill"}


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def stage_inputs(stage: str, cfg) -> dict:
    """The flat ``{dotted key: value}`` of everything ``stage`` depends on."""
    out: dict = {}
    for key in STAGE_KEYS[stage]:
        node = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        _flatten(key, value, out)
    return out


def _hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that consumes its artifacts, in pipeline order."""
    out = [stage]
    for s in STAGES:
        if UPSTREAM[s] in out and s not in out:
            out.append(s)
    return out


class Manifest:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"

    @contextmanager
    def _locked(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = read_json(self.path) if self.path.exists() else {"stages": {}}
                yield data
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        return read_json(self.path) if self.path.exists() else {"stages": {}}

    def record(self, stage: str):
        return self.read()["stages"].get(stage)

    def is_done(self, stage: str) -> bool:
        rec = self.record(stage)
        return bool(rec and rec.get("status") == "done")

    def guard(self, cfg, force: bool = False) -> None:
        """Refuse (or with ``force`` wipe and reopen) every recorded stage whose inputs changed."""
        for stage in STAGES:
            rec = self.record(stage)
            if not rec:
                continue
            now = stage_inputs(stage, cfg)
            then = rec.get("inputs", {})
            changed = [k for k in sorted(set(now) | set(then)) if now.get(k, "<unset>") != then.get(k, "<unset>")]
            if not changed:
                continue
            k = changed[0]
            if not force:
                raise SpecialistsError(
                    f"stage '{stage}' in {self.run_dir} was run with {k}={then.get(k, '<unset>')!r} but the config now "
                    f"says {k}={now.get(k, '<unset>')!r}: rerun with --force to redo '{stage}' and the stages after it, "
                    f"or choose another run_dir")
            self.invalidate(stage)

    def invalidate(self, stage: str) -> None:
        """Delete ``stage`` and everything downstream: records and their folders."""
        with self._locked() as data:
            for s in downstream(stage):
                data["stages"].pop(s, None)
                shutil.rmtree(self.run_dir / STAGE_DIRS[s], ignore_errors=True)

    def require(self, stage: str) -> None:
        """Stop with the command to run when ``stage``'s upstream is not done."""
        up = UPSTREAM[stage]
        if up and not self.is_done(up):
            raise SpecialistsError(
                f"stage '{stage}' needs stage '{up}', which is not complete in {self.run_dir}: "
                f"run `specialists {COMMAND[up]} CONFIG` (or `specialists run CONFIG`) first")

    def start(self, stage: str, cfg) -> None:
        with self._locked() as data:
            rec = data["stages"].get(stage)
            inputs = stage_inputs(stage, cfg)
            if rec is None:
                data["stages"][stage] = {"status": "running", "inputs": inputs, "hash": _hash(inputs),
                                         "started": time.time()}

    def finish(self, stage: str, artifacts: list[str], **extra) -> None:
        with self._locked() as data:
            rec = data["stages"].setdefault(stage, {})
            rec.update(status="done", finished=time.time(), artifacts=sorted(artifacts), **extra)
