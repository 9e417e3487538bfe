"""normfold.testing.assert_equivalent: passes quietly, fails with the checker's report."""

from __future__ import annotations

import copy

import pytest
import torch

import normfold as nf
from normfold.testing import assert_equivalent, randomize_batchnorm
from tests.check._models import inputs, plant_net


def test_assert_equivalent_module_and_onnx() -> None:
    m, x = plant_net(), inputs()
    folded = nf.fold_batchnorm(m, example_inputs=x).module
    report = assert_equivalent(m, folded, x, threads=1)
    assert report.passed and report.check("outputs[onnx]").status == "skipped"  # no export unless asked
    proto = nf.export_onnx(folded, x).model_proto
    report = assert_equivalent(m, proto, x, threads=1)
    assert report.check("outputs[onnx]").status == "passed"


def test_assert_equivalent_fails_with_the_same_report() -> None:
    m, x = plant_net(), inputs()
    bad = nf.fold_batchnorm(m, example_inputs=x).module
    with torch.no_grad():
        bad.conv2.weight.mul_(1.001)
    with pytest.raises(AssertionError) as info:
        assert_equivalent(m, bad, x, threads=1)
    text = str(info.value)
    expected = nf.check(m, candidate=bad, inputs=x, export=False, threads=1).to_text()
    assert text.splitlines()[-1] == expected.splitlines()[-1]
    assert text.splitlines()[-1].startswith("FAILED") and "conv2" in text
    with pytest.raises(TypeError, match="nn.Module or an ONNX model"):
        assert_equivalent(m, 42, x)


def test_randomize_batchnorm_makes_statistics_non_trivial() -> None:
    m = randomize_batchnorm(copy.deepcopy(plant_net()), seed=3)
    assert not torch.allclose(m.bn1.running_var, torch.ones(16))
    assert (m.bn1.running_var > 0).all() and (m.bn1.weight > 0).all()
