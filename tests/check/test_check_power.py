"""Power: the checker fails on each planted bug and names its cause; it passes the clean pipeline.

Planted bugs (issue 3): a BatchNorm left in training mode before export, an
eps changed tenfold in a folded layer, one conv weight perturbed by 1e-3, a
dropout left in training mode, a model exported with a fixed batch of 1.
Each is planted in the eager candidate and, where an exporter can carry it,
in the ONNX file; each test asserts which check fails, which stage is blamed
and which layer or node is named.
"""

from __future__ import annotations

import copy
import io
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper

import normfold as nf
from normfold.check.report import FAILED, PASSED, SKIPPED
from tests.check._models import inputs, plant_net

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model():
    return plant_net()


@pytest.fixture(scope="module")
def x():
    return inputs()


@pytest.fixture(scope="module")
def folded(model, x):
    return nf.fold_batchnorm(model, example_inputs=x).module


@pytest.fixture(scope="module")
def clean_report(model, folded, x):
    return nf.check(model, candidate=folded, inputs=x, threads=1)


@pytest.fixture(scope="module")
def clean_onnx(folded, x):
    return nf.export_onnx(folded, x).model_proto


def _status(report, name):
    return report.check(name).status


def test_clean_fold_and_export_pass_every_check(clean_report) -> None:
    r = clean_report
    assert r.passed, r.to_text()
    assert r.blamed_stage is None and r.divergence is None
    for name in ("provider", "export", "outputs[candidate]", "outputs[onnx]", "training_mode[eager]",
                 "batch_independence[eager]", "training_mode[onnx]", "dynamic_batch[onnx]", "norm_lint[onnx]",
                 "batch_independence[onnx]"):
        assert _status(r, name) == PASSED, f"{name}: {r.check(name).message}"
    assert r.to_text().splitlines()[-1].startswith("PASSED: ")
    assert r.provider == "CPUExecutionProvider"  # no GPU here: the fallback is what ran, and it is reported


def test_clean_reference_equals_candidate_margin(clean_report) -> None:
    """The clean pipeline is far inside the tolerance, so the planted bugs below are not borderline."""
    worst = max(c.scaled_error for r in clean_report.checks if r.group == "outputs" for c in r.comparisons)
    assert worst < clean_report.scale_tol / 10


# -- a BatchNorm left in training mode before export ------------------------------------------------------


def test_batchnorm_left_in_training_mode(model, x) -> None:
    cand = copy.deepcopy(model)
    cand.bn2.train()  # "forgot model.eval()" for one layer
    before = {k: v.clone() for k, v in cand.state_dict().items()}
    r = nf.check(model, candidate=cand, inputs=x, threads=1)
    assert not r.passed
    assert r.blamed_stage == "candidate"
    assert _status(r, "outputs[candidate]") == FAILED
    tm = r.check("training_mode[eager]")
    assert tm.status == FAILED and "bn2" in tm.message and "BatchNorm2d" in tm.message
    assert _status(r, "batch_independence[eager]") == FAILED  # batch statistics depend on the batch-mates
    assert r.divergence is not None and r.divergence.path == "bn2"
    # the exported model is exported in eval: the ONNX stage matches, so the blame stays on the candidate
    assert _status(r, "outputs[onnx]") == PASSED
    # the caller's model is untouched: no running statistics updated by the checker's forwards
    assert cand.bn2.training
    assert all(torch.equal(before[k], v) for k, v in cand.state_dict().items())


def test_batchnorm_exported_in_training_mode(model, x) -> None:
    """The TorchScript exporter with training=PRESERVE writes BatchNormalization(training_mode=1)."""
    bad = copy.deepcopy(model)
    bad.bn2.train()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bad, x, buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    r = nf.check(model, onnx=buf.getvalue(), inputs=x, threads=1)
    assert r.blamed_stage == "onnx"
    tm = r.check("training_mode[onnx]")
    assert tm.status == FAILED and "training_mode=1" in tm.message and "bn2" in tm.message
    assert _status(r, "batch_independence[onnx]") == FAILED
    assert _status(r, "outputs[onnx]") == FAILED
    assert r.divergence is not None and r.divergence.path == "bn2"


# -- an eps changed tenfold in a folded layer --------------------------------------------------------------


def test_eps_changed_tenfold_in_a_folded_layer(model, x) -> None:
    bad = copy.deepcopy(model)
    bad.bn2.eps *= 10  # folded with the wrong eps: conv2 now computes a slightly different bn2
    cand = nf.fold_batchnorm(bad, example_inputs=x).module
    r = nf.check(model, candidate=cand, inputs=x, export=False, threads=1)
    assert not r.passed and r.blamed_stage == "candidate"
    assert _status(r, "outputs[candidate]") == FAILED
    d = r.divergence
    assert d is not None and d.path == "conv2" and "bn2" in d.note  # the conv bn2 was folded into
    assert "conv2" in r.check("outputs[candidate]").message
    assert "(conv2)" in r.final_line()
    # nothing else is wrong with it
    assert _status(r, "training_mode[eager]") == PASSED and _status(r, "batch_independence[eager]") == PASSED


# -- one conv weight perturbed by 1e-3 ---------------------------------------------------------------------


@pytest.mark.parametrize("conv", ["conv1", "conv3"])
def test_one_conv_weight_perturbed_by_1e_3(model, folded, x, conv) -> None:
    cand = copy.deepcopy(folded)
    with torch.no_grad():
        getattr(cand, conv).weight[0, 0, 1, 1] += 1e-3  # one element of one filter
    r = nf.check(model, candidate=cand, inputs=x, export=False, threads=1)
    assert not r.passed and r.blamed_stage == "candidate"
    assert r.divergence is not None and r.divergence.path == conv


def test_one_conv_weight_perturbed_by_1e_3_in_the_onnx_file(model, clean_onnx, x) -> None:
    bad = copy.deepcopy(clean_onnx)
    # the folded conv3's weight initializer (the exporter keeps the parameter's name)
    init = next(i for i in bad.graph.initializer if i.name == "conv3.weight")
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 1, 1] += 1e-3
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    r = nf.check(model, onnx=bad, inputs=x, threads=1)
    assert not r.passed and r.blamed_stage == "onnx"
    assert _status(r, "outputs[onnx]") == FAILED
    assert r.divergence is not None and r.divergence.path == "conv3", r.to_text()
    # the graph itself is fine: only the numbers are wrong
    for name in ("training_mode[onnx]", "dynamic_batch[onnx]", "norm_lint[onnx]", "batch_independence[onnx]"):
        assert _status(r, name) == PASSED


# -- a dropout left in training mode -----------------------------------------------------------------------


def test_dropout_left_in_training_mode(model, folded, x) -> None:
    cand = copy.deepcopy(folded)
    cand.drop.train()
    r = nf.check(model, candidate=cand, inputs=x, export=False, threads=1)
    assert not r.passed and r.blamed_stage == "candidate"
    tm = r.check("training_mode[eager]")
    assert tm.status == FAILED and "drop" in tm.message and "Dropout" in tm.message
    assert _status(r, "outputs[candidate]") == FAILED
    assert _status(r, "batch_independence[eager]") == FAILED


def test_dropout_exported_in_training_mode(model, folded, x) -> None:
    """The dynamo exporter writes Dropout(training_mode=True); onnxruntime drops it silently, other runtimes may not."""
    bad = copy.deepcopy(folded)
    bad.drop.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(bad, x, dynamo=True, verbose=False,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    r = nf.check(model, onnx=prog.model_proto, inputs=x, threads=1)
    assert not r.passed
    tm = r.check("training_mode[onnx]")
    assert tm.status == FAILED and "Dropout" in tm.message and "drop" in tm.message
    # what onnxruntime computes happens to be right: only the graph probe sees the bug
    assert _status(r, "outputs[onnx]") == PASSED


# -- a model exported with a fixed batch of 1 --------------------------------------------------------------


@pytest.fixture(scope="module")
def batch1_onnx(folded, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(folded, (x[0][:1],), dynamo=True, verbose=False).model_proto


def test_fixed_batch_of_one(model, batch1_onnx, x) -> None:
    r = nf.check(model, onnx=batch1_onnx, inputs=x, threads=1)  # the check's inputs have a batch of 4
    assert not r.passed and r.blamed_stage == "onnx"
    db = r.check("dynamic_batch[onnx]")
    assert db.status == FAILED and "fixed to 1" in db.message
    assert _status(r, "outputs[onnx]") == FAILED  # onnxruntime refuses a batch of 4
    bi = r.check("batch_independence[onnx]")
    assert bi.status == FAILED and "batch 2" in bi.message


def test_fixed_batch_of_one_even_with_inputs_of_batch_one(model, batch1_onnx, x) -> None:
    r = nf.check(model, onnx=batch1_onnx, inputs=(x[0][:1],), threads=1)
    assert _status(r, "outputs[onnx]") == PASSED  # the one batch size it was traced at works...
    assert _status(r, "dynamic_batch[onnx]") == FAILED  # ...and the probes still catch it
    assert _status(r, "batch_independence[onnx]") == FAILED
    assert not r.passed


# -- stage blame: the export, not the transformation ------------------------------------------------------


def test_candidate_fine_onnx_wrong_blames_onnx(model, folded, clean_onnx, x) -> None:
    bad = copy.deepcopy(clean_onnx)
    init = next(i for i in bad.graph.initializer if i.name == "fc.bias")
    b = numpy_helper.to_array(init).copy()
    b += 0.01
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    r = nf.check(model, candidate=folded, onnx=bad, inputs=x, threads=1)
    assert _status(r, "outputs[candidate]") == PASSED
    assert _status(r, "outputs[onnx]") == FAILED and r.blamed_stage == "onnx"
    assert "differs from the candidate too" in r.check("outputs[onnx]").message
    assert r.divergence is not None and r.divergence.path == "fc"


def test_no_onnx_and_no_export_skips_the_onnx_checks(model, folded, x) -> None:
    r = nf.check(model, candidate=folded, inputs=x, export=False, threads=1)
    assert r.passed
    for name in ("provider", "outputs[onnx]", "training_mode[onnx]", "batch_independence[onnx]"):
        assert _status(r, name) == SKIPPED
    assert "skipped" in r.final_line()
