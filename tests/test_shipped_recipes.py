"""Every shipped recipe built in full, compared with its committed report (golden numbers)."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.data]

# The main job first, so it is never the one a CI deadline leaves out.
RECIPES = sorted((REPO / "recipes").glob("*.yaml"), key=lambda r: (r.stem != "mobilefacenet", r.stem))
# `.ci/run` sets this (seconds since the epoch) so that the slow suite runs only what time allows.
DEADLINE = os.environ.get("FACTORY_CI_DEADLINE")
# How much slower than the machine that committed a report the CI machine may be.
SLOWDOWN = 1.6


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_full_build_passes_its_gates_and_reproduces_the_committed_report(recipe: Path, tmp_path: Path,
                                                                         faces_root: Path) -> None:
    committed = json.loads((REPO / "reports" / recipe.stem / "report.json").read_text())
    if DEADLINE:
        expected = SLOWDOWN * sum(stage["seconds"] for stage in committed["stages"])
        left = float(DEADLINE) - time.time()
        if expected > left:
            pytest.skip(f"CI time: the {recipe.stem} build took {expected / SLOWDOWN / 60:.0f} min when its report was "
                        f"committed and {left / 60:.0f} min are left; run `make test-slow` without "
                        "FACTORY_CI_DEADLINE to build it")
    out = tmp_path / recipe.stem
    result = subprocess.run([sys.executable, "-m", "factory", "build", str(recipe), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert report["evaluation"]["pairs"] == 6000 and report["evaluation"]["parity_images"] >= 1000
    # The fp32 reference is deterministic: its LFW accuracy must match the committed model card.
    assert report["reference"]["lfw_accuracy"] == pytest.approx(committed["reference"]["lfw_accuracy"], abs=0.002)
    built = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    for artifact in committed["artifacts"]:
        now = built[(artifact["format"], artifact["precision"])]
        if artifact["parity"] is not None:
            assert now["parity"]["cosine_mean"] == pytest.approx(artifact["parity"]["cosine_mean"], abs=0.002)
    # Reproducible builds: with the same inputs (recipe, weights, faces, tool versions, CPU model) the rebuilt
    # artifacts are the committed bytes exactly. Reports committed before builds recorded their inputs, or built
    # on another CPU model, are held to the tolerances above only, and the run says so.
    if committed.get("inputs") == report["inputs"]:
        assert {key: a["sha256"] for key, a in built.items()} == {
            (a["format"], a["precision"]): a["sha256"] for a in committed["artifacts"]}
    else:
        differing = sorted(key for key in report["inputs"] if (committed.get("inputs") or {}).get(key)
                           != report["inputs"][key])
        warnings.warn(f"{recipe.stem}: artifact digests not compared exactly; inputs differ from the committed "
                      f"report's in {differing}", stacklevel=1)
    # The training ablation's weights are scored by the same deterministic reference.
    for row, before in zip(report.get("ablation", []), committed.get("ablation", []), strict=True):
        assert (row["label"], row["sha256"]) == (before["label"], before["sha256"])
        assert row["lfw_accuracy"] == pytest.approx(before["lfw_accuracy"], abs=0.002)
    # Pipeline recipes (LEFV): the detector's PyTorch scores are deterministic, its artifacts' parity close.
    if "pipeline" in committed:
        detector, before = report["pipeline"]["detector"], committed["pipeline"]["detector"]
        assert detector["reference"]["recall"] == pytest.approx(before["reference"]["recall"], abs=1e-9)
        assert detector["reference"]["iou_mean"] == pytest.approx(before["reference"]["iou_mean"], abs=1e-4)
        rows = {(a["format"], a["precision"]): a for a in detector["artifacts"]}
        for artifact in before["artifacts"]:
            now = rows[(artifact["format"], artifact["precision"])]
            assert now["parity"]["agreement"] == pytest.approx(artifact["parity"]["agreement"], abs=0.03)
        pytorch = {(row["photos_set"], row.get("normalised", False)): row
                   for row in report["pipeline"]["end_to_end"]["rows"] if row["runtime"] == "PyTorch fp32"}
        for row in committed["pipeline"]["end_to_end"]["rows"]:
            if row["runtime"] == "PyTorch fp32":
                now = pytorch[(row["photos_set"], row.get("normalised", False))]
                assert now["cosine_mean"] == pytest.approx(row["cosine_mean"], abs=1e-3)
        if "normaliser" in committed["pipeline"]:
            # The normaliser's PyTorch identity scores are deterministic, its artifacts' parity close.
            normaliser, before = report["pipeline"]["normaliser"], committed["pipeline"]["normaliser"]
            for key in ("identity_cosine_mean", "accuracy_with", "accuracy_without"):
                assert normaliser["identity"][key] == pytest.approx(before["identity"][key], abs=1e-3), key
            rows = {(a["format"], a["precision"]): a for a in normaliser["artifacts"]}
            for artifact in before["artifacts"]:
                now = rows[(artifact["format"], artifact["precision"])]["parity"]
                assert now["embedding_cosine_mean"] == pytest.approx(artifact["parity"]["embedding_cosine_mean"],
                                                                     abs=0.003)
