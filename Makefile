# deflow-synth recipes. `make install` sets up .venv; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-all lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install opencv-python-headless scipy tqdm pyyaml
	$(PIP) install --no-build-isolation --no-deps "basicsr==1.4.2"
	$(PIP) install -e ".[test]"
	touch $@

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"
