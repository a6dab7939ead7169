"""report.json is the serialisation of the report types: every committed report reads and writes back as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, synthetic_artifact, synthetic_report, write_report

from factory.errors import FactoryError
from factory.report_schema import BuildReport, ReportSchemaError, from_data, read_report, to_data

BUILDS = sorted(p.parent for p in (REPO / "reports").glob("*/report.json") if "model" in json.loads(p.read_text()))


@pytest.mark.parametrize("folder", BUILDS, ids=[p.name for p in BUILDS])
def test_every_committed_report_reads_into_the_types_and_writes_back_unchanged(folder: Path) -> None:
    report = read_report(folder)
    assert isinstance(report, BuildReport) and report.recipe == folder.name and report.passed
    assert to_data(report) == json.loads((folder / "report.json").read_text())
    assert all(gate.passed for artifact in report.artifacts for gate in artifact.gates)
    assert {a.label for a in report.artifacts} >= {"tflite int8", "executorch int8"}


def test_a_report_of_another_shape_is_refused_with_its_json_path(tmp_path: Path) -> None:
    report = synthetic_report("net", 0.9, [synthetic_artifact("tflite", "int8", 0.89)])
    assert from_data(BuildReport, report).artifacts[0].parity["lfw_accuracy"] == 0.89
    report["artifacts"][0]["io"]["input"]["colour"] = "RGB"
    with pytest.raises(ReportSchemaError, match=r"report\.artifacts\[0\]\.io\.input: unknown key\(s\) colour"):
        from_data(BuildReport, report)
    del report["artifacts"][0]["io"]["input"]["colour"]
    del report["reference"]["threshold"]
    with pytest.raises(ReportSchemaError, match=r"report\.reference\.threshold: missing.*rebuild it"):
        from_data(BuildReport, report)
    report["reference"]["threshold"] = "high"
    with pytest.raises(ReportSchemaError, match=r"report\.reference\.threshold: expected float, got str 'high'"):
        from_data(BuildReport, report)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{")
    with pytest.raises(FactoryError, match="not valid JSON"):
        read_report(tmp_path / "bad")
    with pytest.raises(FactoryError, match=r"no build report at .*python -m factory build"):
        read_report(tmp_path / "none")
    report["reference"]["threshold"] = 0.3
    assert read_report(write_report(tmp_path / "good", report)).reference.threshold == 0.3


def test_a_pipeline_kind_section_reads_into_its_own_types_and_refuses_a_stray_key() -> None:
    from factory.lefv.schema import LEFVSection

    data = json.loads((REPO / "reports" / "lefv" / "report.json").read_text())["pipeline"]
    section = from_data(LEFVSection, data, "pipeline")
    assert section.kind == "lefv" and section.detector.reference.teacher_faces > 0
    assert len(section.detector.artifacts) == len(section.normaliser.artifacts) == 7
    assert {row.runtime for row in section.end_to_end.rows} >= {"PyTorch fp32", "tflite int8"}
    data["detector"]["reference"]["recal"] = 1.0
    with pytest.raises(ReportSchemaError, match=r"pipeline\.detector\.reference: unknown key\(s\) recal"):
        from_data(LEFVSection, data, "pipeline")
    del data["detector"]["reference"]["recal"], data["end_to_end"]["rows"][0]["threshold"]
    with pytest.raises(ReportSchemaError, match=r"pipeline\.end_to_end\.rows\[0\]\.threshold: missing"):
        from_data(LEFVSection, data, "pipeline")
