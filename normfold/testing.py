"""Helpers for users' own test suites: ``assert_equivalent`` and friends.

::

    from normfold.testing import assert_equivalent

    def test_folded_model_is_the_model():
        model = build_model().eval()
        folded = normfold.fold_batchnorm(model).module
        assert_equivalent(model, folded, torch.randn(4, 3, 224, 224))          # PyTorch vs PyTorch
        assert_equivalent(model, "model.onnx", torch.randn(4, 3, 224, 224))    # PyTorch vs onnxruntime

A failure raises ``AssertionError`` whose message is the checker's full report
(the same text ``normfold check`` prints), so pytest shows which check
failed, by how much, on which stage and at which layer.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from normfold.check.checker import check
from normfold.check.probes import DEFAULT_BATCH_SIZES
from normfold.check.report import CheckReport

__all__ = ["assert_equivalent", "randomize_batchnorm"]


def assert_equivalent(reference: nn.Module, candidate_or_onnx: Any, inputs: Any, *, atol: float | None = None,
                      rtol: float | None = None, scale_tol: float | None = None, export: bool = False, probes: bool = True,
                      providers: Sequence[str] | str = ("cuda", "cpu"), require_provider: str | None = None,
                      batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, seed: int = 0,
                      threads: int | None = None) -> CheckReport:
    """Assert that ``candidate_or_onnx`` computes what ``reference`` computes in eval mode.

    ``candidate_or_onnx`` is a transformed ``nn.Module`` (compared in PyTorch;
    ``export=True`` also exports it and runs it in onnxruntime) or an ONNX model
    (a path, ``onnx.ModelProto`` or bytes, run in onnxruntime). ``inputs`` is a
    tensor, a tuple of tensors or a .pt/.npy/.npz file. The probes (batch
    independence, training mode, batch dimension, norm ops) run unless
    ``probes=False``. Outputs are judged by normfold's one rule (the rule of
    :func:`normfold.verify`, :data:`normfold.tolerances.POLICY`: ``max |a - b|
    <= tol[dtype] * max |ref|`` per output, measured per dtype); ``atol``,
    ``rtol``, ``scale_tol`` replace it. Returns the
    :class:`~normfold.check.report.CheckReport` when every check passes;
    raises ``AssertionError`` with the report's text otherwise.
    """
    if isinstance(candidate_or_onnx, nn.Module):
        kw: dict[str, Any] = {"candidate": candidate_or_onnx, "export": export}
    elif isinstance(candidate_or_onnx, (str, os.PathLike, bytes, bytearray)) or hasattr(candidate_or_onnx,
                                                                                         "SerializeToString"):
        kw = {"onnx": candidate_or_onnx}
    else:
        raise TypeError(f"candidate_or_onnx must be an nn.Module or an ONNX model (path, ModelProto, bytes), "
                        f"not {type(candidate_or_onnx).__name__}")
    report = check(reference, inputs=inputs, atol=atol, rtol=rtol, scale_tol=scale_tol, probes=probes,
                   providers=providers, require_provider=require_provider, batch_sizes=batch_sizes, seed=seed,
                   threads=threads, **kw)
    if not report.passed:
        raise AssertionError(report.to_text())
    return report


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place; returns ``model``).

    A freshly built model has mean 0, variance 1, weight 1 and bias 0, which
    hides most folding mistakes; trained models do not. Useful to test a
    rewrite of a model whose trained weights a test cannot download.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_((torch.rand(n, generator=g, dtype=torch.float64) - 0.5).to(m.running_mean))
                m.running_var.copy_((torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(m.running_var))
            if m.weight is not None:
                m.weight.copy_((torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(m.weight))
                m.bias.copy_((torch.rand(n, generator=g, dtype=torch.float64) - 0.5).to(m.bias))
    return model
