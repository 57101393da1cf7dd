"""A black-box teacher behind HTTP, with an append-only on-disk cache of its answers.

Protocol. Request: ``POST <url>``, ``Content-Type: application/json``, the inputs of one batch,
each a JSON value (a string for a text, nested lists of numbers for a raw array)::

    {"inputs": ["a first text", "a second text"]}

Response: HTTP 200 with one row of C class probabilities per input, in the inputs' order, each
row C finite non-negative numbers summing to 1 within 1e-3 (the client renormalizes them)::

    {"probs": [[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]]}

Connection errors, timeouts, 429 and 5xx are retried with exponential back-off; any other status
and any malformed response is one :class:`SpecialistsError` line at once.

Cache (the student stage's is ``RUN_DIR/teacher_api.jsonl``, :attr:`Run.teacher_api_cache`:
outside ``student/``, so ``--force`` keeps the answers already paid for): the header line
``{"format": "specialists-teacher-api", "version": 1, "num_classes": C}``, then one line per
answered request, ``{"keys": [sha256, ...], "probs": [[...], ...]}``, appended and fsynced as
soon as the answer arrives, so a killed process loses at most the request in flight. A key is
the sha256 of the input's canonical JSON. Probabilities are stored as float32 values, so a cached
answer equals the first one bit for bit. Only one process may write a cache: the caller ensures
it (e.g. rank 0 alone under torchrun, the others waiting at a barrier).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import SpecialistsError, one_line

log = logging.getLogger("specialists")

FORMAT, VERSION = "specialists-teacher-api", 1
MAX_WAIT = 60.0  # seconds: no back-off, and no server's Retry-After, waits longer
SUM_TOLERANCE = 1e-3


@dataclass
class Answers:
    """The teacher's answers to one :meth:`TeacherAPI.query`, row ``i`` for ``inputs[i]``."""

    probs: np.ndarray  # (N, C) float32; rows of inputs without an answer are NaN
    answered: np.ndarray  # (N,) bool
    requests: int  # HTTP requests that got an answer in this call
    from_cache: int  # inputs answered from the cache without a request
    requests_total: int  # answered requests recorded in the cache, over all runs (the budget counts these)


def canonical(x: Any) -> str:
    """The JSON text that identifies an input and is sent for it (numpy values as their ``.tolist()``)."""
    def plain(o: Any) -> Any:
        if isinstance(o, (np.ndarray, np.generic)):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    return json.dumps(x, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=plain)


def input_key(x: Any) -> str:
    """The cache key of an input: the hex sha256 of its canonical JSON."""
    return hashlib.sha256(canonical(x).encode("utf-8")).hexdigest()


def _said(exc: urllib.error.HTTPError) -> str:
    """What the server said with an error status, as `` (TEXT)``, or nothing."""
    try:
        text = exc.read().decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        text = ""
    return f" ({one_line(Exception(text), 120)})" if text else ""


class TeacherAPI:
    """The teacher at ``url``, answering ``num_classes`` probabilities per input, cached in ``cache_path``.

    ``budget`` caps the answered requests recorded in the cache over all runs; ``sleep`` waits
    between attempts (tests pass a fake).
    """

    def __init__(self, url: str, cache_path: Path, num_classes: int, *, batch_size: int = 64,
                 budget: int | None = None, retries: int = 4, backoff: float = 0.5, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if num_classes < 1 or batch_size < 1 or retries < 0 or (budget is not None and budget < 0):
            raise SpecialistsError(f"teacher API: num_classes ({num_classes}) and batch_size ({batch_size}) must "
                                   f"be >= 1, retries ({retries}) and budget ({budget}) >= 0")
        if not url.startswith(("http://", "https://")):
            raise SpecialistsError(f"student.teacher_url {url!r}: not an http:// or https:// URL")
        self.url, self.path, self.num_classes = url, Path(cache_path), num_classes
        self.batch_size, self.budget, self.retries = batch_size, budget, retries
        self.backoff, self.timeout, self._sleep = backoff, timeout, sleep
        self._cache: dict[str, np.ndarray] = {}  # key -> (C,) float32
        self.requests_total = 0
        self._load()

    def _load(self) -> None:
        """Read the cache (creating it when absent); a torn last line is dropped from the file."""
        header = json.dumps({"format": FORMAT, "version": VERSION, "num_classes": self.num_classes}) + "\n"
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            raise SpecialistsError(f"{self.path}: cannot read ({exc.strerror or one_line(exc)})") from None
        if b"\n" not in data and header.encode().startswith(data):  # absent, empty, or killed mid-header
            return self._write("wb", header)
        lines = data.split(b"\n")[:-1]  # what follows the last newline is empty, or torn
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("version") != VERSION:
            raise SpecialistsError(f"{self.path}: not a teacher-API cache (its first line is no {FORMAT} "
                                   f"version {VERSION} header); delete it or choose another file")
        if head.get("num_classes") != self.num_classes:
            raise SpecialistsError(f"{self.path}: a teacher-API cache of {head.get('num_classes')} classes, "
                                   f"not {self.num_classes}; delete it or choose another file")
        keep = len(lines[0]) + 1  # bytes of the lines kept
        for n, line in enumerate(lines[1:], start=2):
            entry = self._entry(line)
            if entry is None and n == len(lines):  # killed mid-write (a newline came later): asked again
                break
            if entry is None:
                raise SpecialistsError(f"{self.path}: line {n} is not an entry of {self.num_classes} classes "
                                       f"(a damaged cache)")
            self._cache.update(zip(*entry))
            self.requests_total, keep = self.requests_total + 1, keep + len(line) + 1
        if keep < len(data):
            try:
                os.truncate(self.path, keep)  # else the next entry would be glued to the torn line
            except OSError as exc:
                raise SpecialistsError(f"{self.path}: cannot truncate ({exc.strerror or one_line(exc)})") from None

    def _entry(self, line: bytes) -> tuple[list[str], np.ndarray] | None:
        """A cache line's keys and (B, C) float32 probabilities; None when it is not such a line."""
        try:
            entry = json.loads(line)
            keys = entry["keys"]
            rows = np.array(entry["probs"], dtype=np.float32).reshape(len(keys), self.num_classes)
        except (ValueError, TypeError, KeyError):
            return None
        return (keys, rows) if isinstance(keys, list) and all(isinstance(k, str) for k in keys) else None

    def _write(self, mode: str, text: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode) as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())  # durable before the next request: a crash loses at most one answer
        except OSError as exc:
            raise SpecialistsError(f"{self.path}: cannot write ({exc.strerror or one_line(exc)})") from None

    def query(self, inputs: Sequence, progress: Callable[[int, int], None] | None = None, ask: bool = True) -> Answers:
        """Answers for the N ``inputs``, asking the teacher only for those not cached, in input order.

        ``progress(done, total)`` is called after each answered request (distinct inputs sent, to send).
        ``ask=False`` answers from the cache alone (asks nothing, warns of nothing).
        """
        texts = []
        for i, x in enumerate(inputs):
            try:
                texts.append(canonical(x))
            except (TypeError, ValueError) as exc:
                raise SpecialistsError(f"teacher API: input {i} is not JSON-serializable ({one_line(exc)})") from None
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        cached = [k in self._cache for k in keys]
        missing: dict[str, int] = {}  # key -> its first input, in input order: duplicates are sent once
        for i, k in enumerate(keys):
            if not cached[i]:
                missing.setdefault(k, i)
        todo, requests = list(missing.items()) if ask else [], 0
        for start in range(0, len(todo), self.batch_size):
            if self.budget is not None and self.requests_total >= self.budget:
                log.warning("teacher API: the budget of %d requests is spent (%d recorded in %s); %d of %d inputs "
                            "stay unanswered: raise student.query_budget to answer them", self.budget,
                            self.requests_total, self.path, sum(k not in self._cache for k in keys), len(keys))
                break
            batch = todo[start:start + self.batch_size]
            probs = self._ask([texts[i] for _, i in batch], [i for _, i in batch], keys)
            self._write("ab", json.dumps({"keys": [k for k, _ in batch], "probs": probs.tolist()}) + "\n")
            self._cache.update(zip((k for k, _ in batch), probs))
            self.requests_total, requests = self.requests_total + 1, requests + 1
            if progress is not None:
                progress(min(start + self.batch_size, len(todo)), len(todo))
        out = np.full((len(keys), self.num_classes), np.nan, dtype=np.float32)
        answered = np.array([k in self._cache for k in keys], dtype=bool)
        for i in np.flatnonzero(answered):
            out[i] = self._cache[keys[i]]
        return Answers(out, answered, requests, sum(cached), self.requests_total)

    def _fail(self, what: str, keys: list[str]) -> SpecialistsError:
        distinct = set(keys)
        kept = sum(k in self._cache for k in distinct)
        return SpecialistsError(f"student.teacher_url {self.url}: {what}; {kept} of the {len(distinct)} distinct "
                                f"inputs' answers are kept in {self.path}, a rerun asks only for the "
                                f"{len(distinct) - kept} others")

    def _ask(self, texts: list[str], index: list[int], keys: list[str]) -> np.ndarray:
        """POST one batch (canonical JSON texts, at input positions ``index``); its (B, C) float32 answer."""
        body = ('{"inputs":[' + ",".join(texts) + "]}").encode("utf-8")  # the very texts the keys hash
        reason = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._parse(raw, index, keys)
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code} {exc.reason}"
                if exc.code != 429 and exc.code < 500:  # the request itself is wrong: asking again cannot help
                    raise self._fail(f"{reason}{_said(exc)}, not retried", keys) from None
                try:
                    wait = max(wait, float(exc.headers.get("Retry-After", "")))
                except ValueError:  # absent, or an HTTP date: our own back-off
                    pass
                exc.close()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                reason = one_line(cause if isinstance(cause, BaseException) else Exception(cause))
            if attempt < self.retries:
                self._sleep(min(wait, MAX_WAIT))
        raise self._fail(f"{reason} after {self.retries + 1} attempts", keys)

    def _parse(self, raw: bytes, index: list[int], keys: list[str]) -> np.ndarray:
        """Check a response body for the inputs at ``index``; its rows renormalized, as (B, C) float32."""
        def bad(what: str) -> SpecialistsError:
            return self._fail(f"malformed response ({what})", keys)
        try:
            obj = json.loads(raw)
        except ValueError:
            raise bad(f"not JSON: {raw[:60]!r}") from None
        rows = obj.get("probs") if isinstance(obj, dict) else None
        if not isinstance(rows, list):
            raise bad('no "probs" list')
        if len(rows) != len(index):
            raise bad(f"{len(rows)} rows of probabilities for {len(index)} inputs")
        for r, row in enumerate(rows):  # shapes and types first: numpy would take "0.5" or a ragged row
            if not isinstance(row, list) or len(row) != self.num_classes or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
                raise bad(f"row {r} (input {index[r]}) is not a list of {self.num_classes} numbers")
        try:
            probs = np.array(rows, dtype=np.float64).reshape(len(rows), self.num_classes)  # (B, C)
        except OverflowError:  # an integer beyond float64
            raise bad("a number out of range") from None
        with np.errstate(all="ignore"):
            finite, sums = np.isfinite(probs).all(axis=1), probs.sum(axis=1)
            wrong = ~finite | (probs < 0).any(axis=1) | ~(np.abs(sums - 1.0) <= SUM_TOLERANCE)
        if wrong.any():
            r = int(np.flatnonzero(wrong)[0])
            what = ("NaN or infinity" if not finite[r] else "a negative number" if (probs[r] < 0).any()
                    else f"numbers summing to {sums[r]:.6g}, not 1 within {SUM_TOLERANCE:g}")
            raise bad(f"row {r} (input {index[r]}) holds {what}")
        return (probs / sums[:, None]).astype(np.float32)  # renormalized in float64, then rounded once
