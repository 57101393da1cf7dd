"""Shared fixtures: small threads, and one tiny trained run reused by many tests."""

from __future__ import annotations

import logging

import pytest
import torch

# One intra-op thread for the whole session. `make test` runs 2 workers on 2 cores: two threads
# each oversubscribe the cores, and spinning OpenMP threads then made the tiny run below 4x
# slower (5 s alone, 19-20 s beside a second worker; 158 s once beside other people's jobs),
# while on these tiny models a second thread gains nothing even alone (5.2 s either way,
# measured on the 2-core AMD EPYC CPU machine). One count also gives every test the same
# weights whether it runs alone, under xdist or in another order.
SESSION_THREADS = 1
torch.set_num_threads(SESSION_THREADS)

# A run small enough to train in seconds on 2 CPU cores: 3 superclasses x 3 classes of 8x8
# images, a narrow CNN, 3 specialists.
TINY = [
    "device=cpu", "seed=0",
    "data.name=synthetic", "data.num_super=3", "data.classes_per_super=3", "data.train_per_class=60",
    "data.test_per_class=30", "data.image_size=8",
    "model.name=cnn", "model.width=8",
    "generalist.epochs=8", "generalist.batch_size=32", "generalist.lr=0.05",
    "subsets.num_specialists=3",
    "specialists.epochs=2", "specialists.batch_size=32",
    "student.epochs=2", "student.batch_size=64",
    "evaluate.bootstrap=200", "evaluate.timing_batches=1",
]


# The test files that take longest (seconds in `make test`, on the 2-core AMD EPYC CPU machine:
# 62, 55, 47), run first. `make test` hands each worker a whole file (--dist loadfile) in the
# collection order (--no-loadscope-reorder): xdist's own order, by number of tests, put
# test_quickstart.py, with one, last, and its minute ran on one worker after the other had
# finished (simulated from measured durations: 213 s on one worker against 153 s; longest
# first, 183 s and 182 s).
LONGEST_FIRST = ("test_quickstart.py", "test_reliability.py", "test_launch.py")


def pytest_collection_modifyitems(items):
    """The files of ``LONGEST_FIRST`` first, in that order; the others as collected (the sort is
    stable: each file's tests keep their order)."""
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def error_line_within(fn, seconds: float = 30.0):
    """Run ``fn()`` in a daemon thread: the one-line ``SpecialistsError`` it raised, its result,
    or None while it still runs after ``seconds`` (a hang fails the caller's assertion instead
    of the whole suite)."""
    import threading

    from specialists.errors import SpecialistsError

    outcome: list = []

    def call():
        try:
            outcome.append(fn())
        except SpecialistsError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return None if thread.is_alive() else outcome[0]


def tiny_config(run_dir, *extra: str):
    from specialists.rundir.config import load_config

    return load_config(None, [f"run_dir={run_dir}", *TINY, *extra])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with the generalist, subsets and specialists trained (read-only for tests:
    copy it with ``shutil.copytree`` before changing anything)."""
    from specialists.stages.pipeline import run_stage

    cfg = tiny_config(tmp_path_factory.mktemp("tiny") / "run")
    before = torch.get_num_threads()
    torch.set_num_threads(SESSION_THREADS)  # the same weights whichever test (and its threads) asks first
    try:
        for stage in ("generalist", "subsets", "specialists"):
            run_stage(cfg, stage)
    finally:
        torch.set_num_threads(before)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems: a second thread only adds
    synchronization, and on a shared 2-core machine spinning OpenMP threads can be tens of
    times slower. (The session's count is one as well: this pins it for the module whatever
    ``SESSION_THREADS`` says. The session's ``tiny_run``, when used, is built before this takes
    effect: session fixtures come first, so its weights do not depend on which tests run.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread_here():
    """``one_thread`` for a single test, in a module whose other tests must train with the
    session's threads (to rebuild the tiny run's artifacts bit for bit): for a test whose models
    are compared only with models trained under it, or not at all."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI re-points the root logger at the (captured) stderr; put it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
