"""Host latency benchmarks of a build's artifacts and of its peer runtimes, with pytest-benchmark.

`make bench` runs them for the MobileFaceNet build in `reports/mobilefacenet/` (`--bench-recipe NAME` for
another) and saves the JSON under `benchmarks/results/`; `make bench BENCH_ARGS=--benchmark-compare` compares
the new run with the last saved one (`--benchmark-compare-fail=median:10%` fails on a slower median). They read
built artifacts, so build the recipe first; `make test` never runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-recipe", default="mobilefacenet",
                     help="recipe whose build (reports/<name>/) is benchmarked (default: mobilefacenet)")
    parser.addoption("--bench-reports", default=str(REPO / "reports"), help="folder holding reports/<name>/")


def build_folder(config: pytest.Config) -> Path:
    return Path(config.getoption("--bench-reports")) / config.getoption("--bench-recipe")


def read_manifest(config: pytest.Config) -> dict:
    """The build's manifest; a usage error naming the command to build it when there is none."""
    folder = build_folder(config)
    path = folder / "manifest.json"
    if not path.is_file():
        recipe = config.getoption("--bench-recipe")
        raise pytest.UsageError(
            f"no build to benchmark: {path} is missing. Build the recipe first "
            f"(python -m factory build recipes/{recipe}.yaml), then run the benchmarks")
    return json.loads(path.read_text())
