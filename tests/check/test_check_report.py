"""The report: JUnit XML that parses and counts right, JSON that round-trips, one final PASSED/FAILED line."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest
import torch

import normfold as nf
from normfold.check.report import FAILED, PASSED, SKIPPED, CheckReport
from tests.check._models import inputs, plant_net


@pytest.fixture(scope="module")
def reports():
    m, x = plant_net(), inputs()
    folded = nf.fold_batchnorm(m, example_inputs=x).module
    good = nf.check(m, candidate=folded, inputs=x, threads=1)  # with an export: every kind of check
    bad_model = copy.deepcopy(folded)
    bad_model.drop.train()
    with torch.no_grad():
        bad_model.conv3.bias[0] += 1.0
    bad = nf.check(m, candidate=bad_model, inputs=x, export=False, threads=1)  # failures and skips
    return good, bad


def _junit(report: CheckReport) -> ET.Element:
    root = ET.fromstring(report.to_junit_xml())
    assert root.tag == "testsuites"
    return root


def test_junit_xml_parses_and_counts_right(reports) -> None:
    for report in reports:
        root = _junit(report)
        suites = root.findall("testsuite")
        assert len(suites) == 1
        suite = suites[0]
        cases = suite.findall("testcase")
        assert len(cases) == len(report.checks) == int(suite.get("tests")) == int(root.get("tests"))
        failed = [c for c in cases if c.find("failure") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        assert len(failed) == int(suite.get("failures")) == sum(c.status == FAILED for c in report.checks)
        assert len(skipped) == int(suite.get("skipped")) == sum(c.status == SKIPPED for c in report.checks)
        assert int(suite.get("errors")) == 0
        assert [c.get("name") for c in cases] == [c.name for c in report.checks]
        for case, check in zip(cases, report.checks):
            assert case.get("classname") == f"normfold.check.{check.group}"
            assert float(case.get("time")) >= 0
            if check.status == FAILED:
                f = case.find("failure")
                assert f.get("message") == check.message and f.text
        props = {p.get("name"): p.get("value") for p in suite.find("properties")}
        assert props["seed"] == "0" and "env.onnxruntime" in props


def test_junit_of_the_failing_report_names_the_failures(reports) -> None:
    _, bad = reports
    suite = _junit(bad).find("testsuite")
    failed = {c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None}
    assert failed == {"outputs[candidate]", "training_mode[eager]", "batch_independence[eager]"}
    skipped = {c.get("name") for c in suite.findall("testcase") if c.find("skipped") is not None}
    assert {"provider", "outputs[onnx]", "batch_independence[onnx]"} <= skipped


def test_json_round_trips(reports) -> None:
    for report in reports:
        text = report.to_json()
        data = json.loads(text)  # standard JSON: no bare NaN
        assert "NaN" not in text.replace('"NaN"', "")
        back = CheckReport.from_json(text)
        assert back.to_json() == text
        assert back.passed == report.passed == data["passed"]
        assert back.final_line() == report.final_line() == data["final_line"]
        assert [(c.name, c.status) for c in back.checks] == [(c.name, c.status) for c in report.checks]
        assert back.to_text() == report.to_text()


def test_text_ends_in_one_verdict_line(reports) -> None:
    good, bad = reports
    for report, word in ((good, "PASSED"), (bad, "FAILED")):
        lines = report.to_text().splitlines()
        assert lines[-1].startswith(f"{word}: ")
        assert sum(line.startswith(("PASSED", "FAILED")) for line in lines) == 1
        assert "seed 0" in lines[-1] and "tolerance: |a - b| <=" in report.to_text()
    assert good.passed and all(c.status == PASSED for c in good.checks)
    assert "first mismatch at stage candidate" in bad.final_line()
    assert "conv3" in bad.final_line()  # the divergence is named on the verdict line
