"""``RUN_DIR/manifest.json``: which stages are done, with what inputs, and exactly what they wrote.

One record per stage: ``status`` (``running`` | ``done``), ``inputs`` (the flat values of the
config keys the stage depends on) and their ``hash``, ``attempts`` (start time and seconds of
each attempt, a killed one's seconds estimated from the last file it wrote), ``seconds`` (all
attempts together), ``finished``, ``artifacts`` (``{path: {"size", "sha256"}}``, paths relative
to the run directory) and ``reports`` (re-renderable views, not verified); ``files`` holds the
digests of files no stage owns (``data.json``). This module stores
and checks records; what a stage depends on and what a changed input or a damaged artifact
means is the pipeline's (``specialists.stages``).

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

from ..device import is_main
from ..errors import SpecialistsError
from .io import file_sha256, read_json, write_json


def inputs_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(path: Path) -> dict:
    """What the manifest records of one artifact."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


# without the manifest every stage runs again, and finds the models it trained already there
RECOVER = "remove it and rerun with the run's config.yaml: the stages are recorded anew, reusing the models already trained"


def _last_write(folder: Path, since: float) -> float:
    """The newest modification time under ``folder`` after ``since`` (``since`` when none)."""
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max([since] + [t for t in times if t >= since])


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.root = self.path.parent
        self.lock_path = self.path.with_name("manifest.lock")

    @contextmanager
    def _locked(self):
        if not is_main():  # other ranks of a multi-process run: rank 0 holds the lock and writes
            yield self.read()
            write_json(self.path, {})  # (writes nothing here: it is rank 0's write's barrier)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path, "a")
        except OSError as exc:
            raise SpecialistsError(f"{self.lock_path}: cannot write ({exc.strerror})") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.read()
                yield data
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        """The records (none before the first); a damaged file is one line saying how to recover."""
        if not self.path.exists():
            return {"stages": {}}
        data = read_json(self.path, damaged=RECOVER)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise SpecialistsError(f"{self.path}: not a run manifest (no 'stages' object); {RECOVER}")
        return data

    def record(self, stage: str) -> dict | None:
        return self.read()["stages"].get(stage)

    def is_done(self, stage: str) -> bool:
        rec = self.record(stage)
        return bool(rec and rec.get("status") == "done")

    def start(self, stage: str, inputs: dict, folder: Path) -> None:
        """Record an attempt at ``stage`` with ``inputs`` (its first, or the next after one that
        was killed or stopped, whose time is then taken up to the last file it wrote in
        ``folder``)."""
        now = time.time()
        with self._locked() as data:
            rec = data["stages"].get(stage)
            if rec is None:
                data["stages"][stage] = {"status": "running", "inputs": inputs, "hash": inputs_hash(inputs),
                                         "started": now, "attempts": [{"started": now}]}
                return
            attempts = rec.setdefault("attempts", [{"started": rec.get("started", now), "seconds": 0.0}])
            last = attempts[-1]
            if "seconds" not in last:
                last["seconds"] = round(_last_write(folder, last["started"]) - last["started"], 2)
            attempts.append({"started": now})

    def finish(self, stage: str, seconds: float, artifacts: list[Path], reports: list[Path],
               checked: set | None = None, **extra) -> None:
        """Record ``stage`` as done: this attempt's ``seconds``, and the size and sha256 of each
        artifact a later stage or inference may read (``reports`` are listed, not verified).
        ``checked``: see :meth:`problems` (the artifacts just hashed are added)."""
        digests = {str(p.relative_to(self.root)): digest(p) for p in sorted(artifacts)}
        if checked is not None:
            for p in artifacts:
                st = p.stat()
                checked.add((str(p), st.st_size, st.st_mtime_ns))
        with self._locked() as data:
            rec = data["stages"].setdefault(stage, {})
            attempts = rec.setdefault("attempts", [{"started": time.time() - seconds}])
            attempts[-1]["seconds"] = round(seconds, 2)
            rec.update(status="done", finished=time.time(), seconds=round(sum(a.get("seconds", 0) for a in attempts), 2),
                       artifacts=digests, reports=sorted(str(p.relative_to(self.root)) for p in reports), **extra)

    def problems(self, stage: str, checked: set | None = None) -> list[tuple[str, str]]:
        """``(path, why)`` for each recorded artifact of ``stage`` that is missing or changed.

        ``checked``: (path, size, mtime) of files already verified in this process, which are
        not hashed again (updated in place)."""
        rec = self.record(stage)
        out = []
        entries = rec.get("artifacts") if rec else None
        for rel, want in (entries.items() if isinstance(entries, dict) else ()):  # older manifests: no digests
            why = self.check_file(self.root / rel, want, checked)
            if why:
                out.append((rel, why))
        return out

    @staticmethod
    def check_file(path: Path, want: dict, checked: set | None = None) -> str | None:
        """Why ``path`` does not match its record ``want`` (None when it does)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "is missing"
        if st.st_size != want["size"]:
            return f"has changed (size {st.st_size} bytes, {want['size']} when written)"
        key = (str(path), st.st_size, st.st_mtime_ns)
        if checked is not None and key in checked:
            return None
        if file_sha256(path) != want["sha256"]:
            return "has changed (its sha256 differs from the one recorded when it was written)"
        if checked is not None:
            checked.add(key)
        return None

    def record_file(self, path: Path) -> None:
        """Record the digest of a file no stage owns (``data.json``, written by the data load)."""
        rel, want = str(Path(path).relative_to(self.root)), digest(Path(path))
        if self.read().get("files", {}).get(rel) != want:
            with self._locked() as data:
                data.setdefault("files", {})[rel] = want

    def entry(self, path: Path) -> dict | None:
        """The recorded digest of ``path`` (any stage's artifact, or a recorded file), or None."""
        rel = str(Path(path).relative_to(self.root))
        data = self.read()
        for rec in data["stages"].values():
            entries = rec.get("artifacts")
            if isinstance(entries, dict) and rel in entries:
                return entries[rel]
        return data.get("files", {}).get(rel)

    def drop(self, stages: list[str], folders: list[Path], files: list[Path] = ()) -> None:
        """Forget ``stages``, delete ``folders`` and ``files``, under one lock."""
        with self._locked() as data:
            for s in stages:
                data["stages"].pop(s, None)
            if is_main():
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                for f in files:
                    Path(f).unlink(missing_ok=True)
