# Two commands: `make quickstart` (set-up + the whole pipeline on the embedded data) and
# `make test` (set-up + lint + the test suite). Both create .venv and install the project when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: quickstart test lint setup clean-runs cifar100-cpu crash-test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/specialists run configs/quickstart.yaml

lint: $(STAMP)  # pyflakes, import order, bugbear; and the layer contracts in pyproject.toml
	$(VENV)/bin/ruff check specialists pipelines tests benchmarks
	$(VENV)/bin/lint-imports

test: lint  # two worker processes (one per core), a test file's tests on one of them, longest files first (conftest.py)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

crash-test: $(STAMP)  # the quickstart SIGKILLed 24 times at random moments, resumed each time, compared (~5 minutes)
	$(PY) benchmarks/crash_resume.py --kills 24

cifar100-cpu: $(STAMP)  # real CIFAR-100 from ../shared/data (about 40 minutes on 2 CPU cores)
	$(VENV)/bin/specialists run configs/cifar100_cpu.yaml

clean-runs:
	rm -rf runs
