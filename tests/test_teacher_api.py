"""The black-box HTTP teacher client against a teacher served by the test itself, on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from specialists.engine.teacher_api import TeacherAPI, input_key
from specialists.errors import SpecialistsError

C = 5


def reference(x) -> np.ndarray:
    """The teacher's answer for input ``x`` (float64): a softmax of hash-derived numbers of its JSON."""
    text = x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))
    z = np.frombuffer(hashlib.sha256(text.encode()).digest()[:C], dtype=np.uint8) / 40.0
    e = np.exp(z - z.max())
    return e / e.sum()


def expected(inputs) -> np.ndarray:
    """What the client must return: each reference row renormalized, as float32."""
    return np.stack([(p / p.sum()).astype(np.float32) for p in map(reference, inputs)])


class Teacher:
    """The served teacher's state: what it saw, and how it is told to fail."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.attempts = 0  # every POST
        self.answered = 0  # POSTs answered with probabilities
        self.seen: list[list] = []  # the inputs of each answered POST
        self.status = 500  # the status of a failure
        self.fail_from: int | None = None  # fail from this attempt on (1-based)
        self.fail_first = 0  # fail the first n attempts only
        self.retry_after: str | None = None
        self.bad: str | None = None  # a kind of malformed answer
        self.slow_first = 0.0  # seconds the first attempt takes


class Handler(BaseHTTPRequestHandler):
    teacher: Teacher

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        t = self.teacher
        inputs = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"]
        t.attempts += 1
        if t.attempts == 1 and t.slow_first:
            time.sleep(t.slow_first)  # past the client's timeout: it has gone, and so does this answer
            return
        if (t.fail_from is not None and t.attempts >= t.fail_from) or t.attempts <= t.fail_first:
            self._send(t.status, b"bad input format" if t.status == 400 else b"",
                       {"Retry-After": t.retry_after} if t.retry_after else None)
            return
        t.answered += 1
        t.seen.append(inputs)
        probs = [reference(x).tolist() for x in inputs]
        if t.bad == "rows":
            probs = probs[:-1]
        elif t.bad == "columns":
            probs[1] = probs[1][:-1]
        elif t.bad == "sum":
            probs[1] = [2 * v for v in probs[1]]
        elif t.bad == "negative":
            probs[2][0] = -probs[2][0]
        elif t.bad == "strings":
            probs[0] = [str(v) for v in probs[0]]
        elif t.bad == "nan":
            probs[0][0] = math.nan
        body = {"probs": probs} if t.bad != "noprobs" else {"answers": probs}
        self._send(200, b"<html>oops</html>" if t.bad == "notjson" else json.dumps(body).encode())


@pytest.fixture(scope="module")
def server():
    Handler.teacher = Teacher()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield Handler.teacher, f"http://127.0.0.1:{httpd.server_address[1]}/predict"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def teacher(server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # loopback directly, whatever the environment says
    server[0].reset()
    return server


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def client(url: str, cache: Path, **kw) -> TeacherAPI:
    kw.setdefault("sleep", FakeSleep())
    return TeacherAPI(url, cache, C, **kw)


def texts(n: int) -> list[str]:
    return [f"text number {i} ✓" for i in range(n)]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def entries(cache: Path) -> list[dict]:
    lines = cache.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "specialists-teacher-api", "version": 1, "num_classes": C}
    return [json.loads(line) for line in lines[1:]]


def test_answers_batches_duplicates_and_cache(teacher, tmp_path):
    t, url = teacher
    inputs = texts(10) + ["text number 0 ✓", "text number 3 ✓"]
    cache = tmp_path / "student" / "teacher_api.jsonl"  # its folder is created
    calls = []
    a = client(url, cache, batch_size=4).query(inputs, progress=lambda d, n: calls.append((d, n)))
    assert a.probs.dtype == np.float32 and a.probs.shape == (12, C) and a.answered.all()
    np.testing.assert_array_equal(a.probs, expected(inputs))
    assert t.answered == t.attempts == 3 == a.requests == a.requests_total == math.ceil(10 / 4) and a.from_cache == 0
    assert sum(t.seen, []) == texts(10)  # in input order, duplicates sent once
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert [len(e["keys"]) for e in entries(cache)] == [4, 4, 2]

    again = client(url, cache, batch_size=4).query(inputs[::-1])  # a new client: everything from the cache
    assert t.attempts == 3 and again.requests == 0 and again.from_cache == 12 and again.requests_total == 3
    assert again.probs.view(np.uint32).tobytes() == a.probs[::-1].view(np.uint32).tobytes()  # bit for bit


def test_numpy_inputs_are_keyed_as_their_lists(teacher, tmp_path):
    t, url = teacher
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)]
    a = client(url, tmp_path / "c.jsonl").query(arrays + [arrays[1].tolist(), np.float32(0.5)])
    assert input_key(arrays[0]) == input_key(arrays[0].tolist())
    assert t.seen == [[x.tolist() for x in arrays] + [0.5]]
    np.testing.assert_array_equal(a.probs, expected([x.tolist() for x in arrays] + [arrays[1].tolist(), 0.5]))


def test_budget_over_all_runs(teacher, tmp_path, caplog):
    t, url = teacher
    inputs, cache = texts(20), tmp_path / "c.jsonl"
    with caplog.at_level(logging.WARNING, logger="specialists"):
        a = client(url, cache, batch_size=4, budget=2).query(inputs)
    assert t.answered == a.requests == a.requests_total == 2 and a.answered.sum() == 8
    assert a.answered[:8].all() and np.isnan(a.probs[8:]).all() and not a.answered[8:].any()
    np.testing.assert_array_equal(a.probs[:8], expected(inputs[:8]))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "student.query_budget" in warning and "12 of 20 inputs stay unanswered" in warning

    b = client(url, cache, batch_size=4, budget=3).query(inputs)  # a rerun cannot overspend
    assert t.answered == 3 and b.requests == 1 and b.requests_total == 3 and b.answered.sum() == 12
    assert b.from_cache == 8 and t.seen[-1] == inputs[8:12]


def test_persistent_failure_keeps_answers_and_a_rerun_asks_for_the_rest(teacher, tmp_path):
    t, url = teacher
    t.fail_from = 3
    inputs, cache, sleep = texts(20), tmp_path / "c.jsonl", FakeSleep()
    with pytest.raises(SpecialistsError) as excinfo:
        client(url, cache, batch_size=4, retries=2, sleep=sleep).query(inputs)
    message = one_line_error(excinfo)
    assert message.startswith(f"student.teacher_url {url}: HTTP 500 Internal Server Error after 3 attempts")
    assert "8 of the 20 distinct inputs' answers are kept" in message and "only for the 12 others" in message
    assert sleep.delays == [0.5, 1.0] and t.attempts == 5
    assert [e["keys"] for e in entries(cache)] == [[input_key(x) for x in inputs[i:i + 4]] for i in (0, 4)]

    t.reset()
    a = client(url, cache, batch_size=4).query(inputs)
    assert t.answered == 3 and sum(t.seen, []) == inputs[8:] and a.from_cache == 8
    np.testing.assert_array_equal(a.probs, expected(inputs))


def test_connection_refused_is_retried_then_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleep = FakeSleep()
    with pytest.raises(SpecialistsError) as excinfo:
        client(f"http://127.0.0.1:{port}/", tmp_path / "c.jsonl", retries=1, backoff=0.25, sleep=sleep).query(["x"])
    assert "after 2 attempts" in one_line_error(excinfo) and sleep.delays == [0.25]


def test_a_timeout_is_retried(teacher, tmp_path):
    t, url = teacher
    t.slow_first = 0.2
    sleep = FakeSleep()
    a = client(url, tmp_path / "c.jsonl", timeout=0.05, sleep=sleep).query(texts(2))
    assert sleep.delays == [0.5] and t.attempts == 2 and a.requests == 1 and a.answered.all()


@pytest.mark.parametrize("status,retry_after,delays", [
    (503, None, [0.5, 1.0]),  # backoff * 2**attempt
    (429, "7", [7.0, 7.0]),  # a longer Retry-After is honoured
    (503, "0.1", [0.5, 1.0]),  # a shorter one is not
    (429, "1000", [60.0, 60.0]),  # capped
    (503, "Wed, 21 Oct 2015 07:28:00 GMT", [0.5, 1.0]),  # a date: our own back-off
])
def test_transient_failures_are_retried(teacher, tmp_path, status, retry_after, delays):
    t, url = teacher
    t.status, t.fail_first, t.retry_after = status, 2, retry_after
    sleep = FakeSleep()
    a = client(url, tmp_path / "c.jsonl", sleep=sleep).query(texts(3))
    assert sleep.delays == delays and t.attempts == 3 and a.requests == 1
    np.testing.assert_array_equal(a.probs, expected(texts(3)))


def test_a_client_error_is_not_retried(teacher, tmp_path):
    t, url = teacher
    t.status, t.fail_from = 400, 1
    sleep = FakeSleep()
    with pytest.raises(SpecialistsError) as excinfo:
        client(url, tmp_path / "c.jsonl", sleep=sleep).query(texts(3))
    message = one_line_error(excinfo)
    assert "HTTP 400 Bad Request (bad input format), not retried" in message and url in message
    assert t.attempts == 1 and sleep.delays == []


@pytest.mark.parametrize("bad,says", [
    ("rows", "2 rows of probabilities for 3 inputs"),
    ("columns", "row 1 (input 1) is not a list of 5 numbers"),
    ("strings", "row 0 (input 0) is not a list of 5 numbers"),
    ("sum", "row 1 (input 1) holds numbers summing to 2, not 1 within 0.001"),
    ("negative", "row 2 (input 2) holds a negative number"),
    ("nan", "row 0 (input 0) holds NaN or infinity"),
    ("noprobs", 'no "probs" list'),
    ("notjson", "not JSON"),
])
def test_malformed_answers_are_one_line_and_not_cached(teacher, tmp_path, bad, says):
    t, url = teacher
    t.bad = bad
    cache = tmp_path / "c.jsonl"
    with pytest.raises(SpecialistsError) as excinfo:
        client(url, cache).query(texts(3))
    message = one_line_error(excinfo)
    assert "malformed response" in message and says in message and url in message
    assert t.attempts == 1 and entries(cache) == []


def test_torn_last_line_is_dropped_and_asked_again(teacher, tmp_path):
    t, url = teacher
    inputs, cache = texts(8), tmp_path / "c.jsonl"
    client(url, cache, batch_size=4).query(inputs)
    whole = cache.read_bytes()
    cache.write_bytes(whole[:-15])  # killed in the middle of writing the second answer
    t.reset()
    api = client(url, cache, batch_size=4)
    assert api.requests_total == 1 and cache.read_bytes() == whole[:whole.index(b"\n", whole.index(b"\n") + 1) + 1]
    a = api.query(inputs)
    assert t.seen == [inputs[4:]] and a.requests_total == 2 and len(entries(cache)) == 2
    np.testing.assert_array_equal(a.probs, expected(inputs))

    cache.write_bytes(cache.read_bytes() + b'{"keys": ["ab')  # no newline
    assert client(url, cache).requests_total == 2


def test_foreign_or_mismatched_caches_are_refused(teacher, tmp_path):
    _, url = teacher
    cache = tmp_path / "c.jsonl"
    client(url, cache)
    with pytest.raises(SpecialistsError) as excinfo:
        TeacherAPI(url, cache, C + 1)
    assert str(cache) in one_line_error(excinfo) and f"of {C} classes, not {C + 1}" in str(excinfo.value)

    other = tmp_path / "notes.txt"
    other.write_text("some notes\nof mine\n")
    with pytest.raises(SpecialistsError) as excinfo:
        TeacherAPI(url, other, C)
    assert str(other) in one_line_error(excinfo) and "not a teacher-API cache" in str(excinfo.value)
    assert other.read_text() == "some notes\nof mine\n"  # left alone

    lines = cache.read_text().splitlines(keepends=True)
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(lines[0] + '{"keys": ["a"], "probs": [[1, 0]]}\n' + '{"keys": [], "probs": []}\n')
    with pytest.raises(SpecialistsError) as excinfo:
        TeacherAPI(url, damaged, C)
    assert f"{damaged}: line 2 is not an entry of {C} classes" in one_line_error(excinfo)

    with pytest.raises(SpecialistsError) as excinfo:
        TeacherAPI("127.0.0.1:8000/predict", tmp_path / "x.jsonl", C)
    assert "not an http:// or https:// URL" in one_line_error(excinfo)

    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"format": "specialists-tea')  # killed while writing the header: started afresh
    assert TeacherAPI(url, torn, C).requests_total == 0 and entries(torn) == []
