# Two entry points, both self-installing on a fresh machine (Python 3.11, pip):
#   make build   - full MobileFaceNet build: six verified artifacts + report in reports/mobilefacenet/
#   make test    - the test suite (fast unit tests + a reduced real-face build; about 10 minutes on 2 cores)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: build test test-slow lint

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# MTCNN's pretrained weights: read from this wheel's files, never installed or imported.
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --dest .cache facenet-pytorch==2.6.0
	touch $@

build: $(VENV)/.installed
	$(PY) -m factory build recipes/mobilefacenet.yaml

test: $(VENV)/.installed
	$(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check factory mobile_harness tests
