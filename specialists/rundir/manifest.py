"""``RUN_DIR/manifest.json``: which stages are done, with what inputs, and what they wrote.

One record per stage: ``status`` (``running`` | ``done``), ``inputs`` (the flat values of the
config keys the stage depends on) and their ``hash``, ``started`` / ``finished`` timestamps,
``seconds`` and ``artifacts`` (paths relative to the run directory). This module only stores
records; what a stage depends on and what a changed input means is the pipeline's
(``specialists.stages``).

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

from .io import read_json, write_json


def inputs_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name("manifest.lock")

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = read_json(self.path) if self.path.exists() else {"stages": {}}
                yield data
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        return read_json(self.path) if self.path.exists() else {"stages": {}}

    def record(self, stage: str) -> dict | None:
        return self.read()["stages"].get(stage)

    def is_done(self, stage: str) -> bool:
        rec = self.record(stage)
        return bool(rec and rec.get("status") == "done")

    def start(self, stage: str, inputs: dict) -> None:
        """Record that ``stage`` started with ``inputs`` (kept if it was recorded before)."""
        with self._locked() as data:
            if stage not in data["stages"]:
                data["stages"][stage] = {"status": "running", "inputs": inputs, "hash": inputs_hash(inputs),
                                         "started": time.time()}

    def finish(self, stage: str, artifacts: list[str], **extra) -> None:
        with self._locked() as data:
            rec = data["stages"].setdefault(stage, {})
            rec.update(status="done", finished=time.time(), artifacts=sorted(artifacts), **extra)

    def drop(self, stages: list[str], folders: list[Path]) -> None:
        """Forget ``stages`` and delete ``folders`` (their artifacts), under one lock."""
        with self._locked() as data:
            for s in stages:
                data["stages"].pop(s, None)
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
