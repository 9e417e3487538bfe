"""onnxruntime providers: what was asked, what started, why CUDA did not (this machine has no GPU)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import normfold as nf
from normfold.check.runtime import create_session, resolve_providers, short_provider
from normfold.errors import ModelLoadError, UsageError
from tests.check._models import inputs, plant_net


def _relu_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _cuda_really_runs() -> bool:
    rt = create_session(_relu_model(), ("cuda",))
    return rt.provider == "CUDAExecutionProvider"


def test_resolve_providers() -> None:
    assert resolve_providers(("cuda", "cpu")) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # CPU always last
    assert resolve_providers(["TensorrtExecutionProvider"]) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert short_provider("CUDAExecutionProvider") == "cuda"
    with pytest.raises(UsageError, match="unknown onnxruntime provider 'cdua'"):
        resolve_providers(["cdua"])


def test_used_provider_comes_from_the_session_and_a_failed_cuda_says_why() -> None:
    if _cuda_really_runs():
        pytest.skip("CUDA starts on this machine: the fallback path cannot be observed here")
    # onnxruntime-gpu lists CUDA as available even where it cannot start ...
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    rt = create_session(_relu_model(), ("cuda", "cpu"))
    # ... the session says what really runs
    assert rt.used == ["CPUExecutionProvider"] and rt.provider == "CPUExecutionProvider"
    reason = rt.not_started["CUDAExecutionProvider"]
    assert reason and "did not start" not in reason  # onnxruntime's own words, e.g. libcuda.so.1 missing
    assert "CUDAExecutionProvider requested but did not start" in rt.describe()
    out = rt.run([torch.tensor([[-1.0, 0.5, 2.0]])])[0]
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 2.0]]))


def test_require_cuda_fails_with_the_reason_when_cuda_did_not_start() -> None:
    if _cuda_really_runs():
        pytest.skip("CUDA starts on this machine")
    m, x = plant_net(), inputs()
    r = nf.check(m, inputs=x, require_provider="cuda", threads=1)
    prov = r.check("provider")
    assert prov.status == "failed"
    assert prov.message.startswith("cuda was required but onnxruntime ran on CPUExecutionProvider: ")
    assert r.provider == "CPUExecutionProvider" and "CUDAExecutionProvider" in r.provider_note
    assert not r.passed and "provider" in r.final_line()
    # the numbers themselves were fine
    assert r.check("outputs[onnx]").status == "passed"
    # asking for CPU only: the provider check passes and says so
    r = nf.check(m, inputs=x, providers=("cpu",), require_provider="cpu", export=True, probes=False, threads=1)
    assert r.check("provider").status == "passed" and r.provider == "CPUExecutionProvider"


def test_unloadable_models() -> None:
    with pytest.raises(ModelLoadError, match="no such ONNX file"):
        create_session("/nonexistent/model.onnx")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        create_session(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="no such ONNX file"):
        nf.check(plant_net(), onnx="/nonexistent/model.onnx", inputs=inputs())
