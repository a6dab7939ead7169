# Two entry points, both self-installing on a fresh machine (Python 3.11, pip):
#   make build   - full MobileFaceNet build: six verified artifacts + report in reports/mobilefacenet/
#   make test    - the test suite (fast unit tests + a reduced real-face build; about 15 minutes on 2 cores)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: build test test-slow lint adb arm64 bench

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# MTCNN's pretrained weights: read from this wheel's files, never installed or imported.
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --dest .cache facenet-pytorch==2.6.0
	# dlib's face models (CC0; the dlib_resnet_v1 teacher): read from this sdist, never installed.
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --dest .cache face_recognition_models==0.3.0
	touch $@

# The device lab's tests drive the real adb client (against simulated phones); Debian ships it.
adb:
	@command -v adb >/dev/null 2>&1 || { \
	  echo "installing the adb client (Debian package adb) for the device lab tests"; \
	  { apt-get install -y adb || { apt-get update && apt-get install -y adb; }; } >/dev/null || { \
	    echo "error: could not install adb; as root run 'apt-get install -y adb' (or put Android SDK" \
	         "platform-tools' adb on PATH), then rerun make" >&2; exit 1; }; }

# The simulated arm64 phone's tests (pytest -m arm64) run aarch64 code under qemu-user: Debian's qemu-user and
# g++-aarch64-linux-gnu, Debian's arm64 Python and the runtimes' aarch64 wheels, in .cache/arm64 (about 210 MB).
arm64: $(VENV)/.installed
	PYTHON=$(PY) tests/adb_sim/arm64/build.sh .cache/arm64

build: $(VENV)/.installed
	$(PY) -m factory build recipes/mobilefacenet.yaml

# MOBILE_HARNESS_REQUIRE_ARM64: the arm64 tests fail, rather than skip, when their tools are missing.
test: $(VENV)/.installed adb arm64
	MOBILE_HARNESS_REQUIRE_ARM64=1 $(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

# Host latency benchmarks (pytest-benchmark) of the MobileFaceNet build's artifacts and peers; needs `make build`
# first. Each run is saved under benchmarks/results/; BENCH_ARGS=--benchmark-compare compares with the last one.
bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-autosave \
	  --benchmark-storage=file://benchmarks/results --benchmark-columns=min,median,iqr,max,rounds $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check factory mobile_harness tests benchmarks
