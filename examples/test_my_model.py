"""Checking your own model in your own pytest suite with normfold.testing.assert_equivalent.

Run with ``pytest examples/test_my_model.py``. Replace ``build_model`` with your
model (trained weights loaded). ``assert_equivalent`` returns the checker's
report when every check passes, and raises ``AssertionError`` with the full
report (stage blamed, first diverging layer, the tolerance that would have
passed) when one fails.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import normfold as nf
from normfold.testing import assert_equivalent, randomize_batchnorm


def build_model() -> torch.nn.Module:
    model = torchvision.models.resnet18()  # yours: load your trained weights here
    randomize_batchnorm(model)  # stands in for trained statistics in this example only
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    # real samples are better than random ones when you have them: torch.load("tests/data/batch.pt")
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def test_folded_model_is_the_model(model, batch) -> None:
    folded = nf.fold_batchnorm(model, example_inputs=batch).module
    assert_equivalent(model, folded, batch)  # PyTorch vs PyTorch, with the batch-independence probe


def test_onnx_export_is_the_model(model, batch, tmp_path) -> None:
    folded = nf.fold_batchnorm(model, example_inputs=batch).module
    path = tmp_path / "model.onnx"
    nf.export_onnx(folded, batch, path)
    report = assert_equivalent(model, path, batch)  # the file you will ship, in onnxruntime
    print(report.provider_note)  # which provider really ran (CUDA only if it started)


def test_a_model_left_in_training_mode_is_caught(model, batch) -> None:
    broken = nf.fold_batchnorm(model, example_inputs=batch).module
    broken.train()  # the classic deployment bug
    with pytest.raises(AssertionError, match="training mode"):
        assert_equivalent(model, broken, batch)
